"""The audit stream for SIEMs and JSON logs (issue 21.6), received by a real rsyslogd.

Each test starts its own ``rsyslogd -n`` (Debian's rsyslog) with a config of its own: a Unix
datagram socket and a UDP port on loopback in a temp dir, every message written to a file as
``facility severity app-name msgid structured-data msg``. The daemon (a subprocess running
`botwarden run` against a real PostgreSQL 15 and OpenBao) streams through the Unix socket and
to a file; the UDP path and the shortening of long events are driven from an audit store
opened in the test.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from analytics import AuditStore
from appliance.auditstream import start_stream
from appliance.sandbox import free_port
from tests.approvals_fixtures import cli
from tests.daemon_fixtures import ROOT, DaemonProcess, fresh_setup, new_port, psql, seed_orders, write_config
from tests.probes_fixtures import wait_for
from tests.test_audit_integrity import _rechain_from

pytestmark = pytest.mark.root  # rsyslogd binds its sockets as root here

LINE = re.compile(r'^(\S+) (\S+) (\S+) (\S+) \[meta sequenceId="(\d+)"\] (\{.*\})$')


class Rsyslogd:
    """A real rsyslogd in the foreground with its own config, sockets and output file."""

    def __init__(self, directory: Path, *, max_message_size: str | None = "64k"):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "work").mkdir(exist_ok=True)
        self.socket = self.dir / "log.sock"
        self.udp_port = free_port()
        self.output = self.dir / "received.log"
        size = f' maxMessageSize="{max_message_size}"' if max_message_size else ""  # default: 8k
        self.conf = self.dir / "rsyslog.conf"
        self.conf.write_text(f"""
global(workDirectory="{self.dir / 'work'}"{size})
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{self.socket}" UseSpecialParser="off" ParseHostname="on")
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{self.udp_port}")
template(name="line" type="string"
         string="%syslogfacility-text% %syslogseverity-text% %app-name% %msgid% %structured-data% %msg%\\n")
action(type="omfile" file="{self.output}" template="line")
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Rsyslogd":
        assert shutil.which("rsyslogd"), "Debian package rsyslog (vagrant/provision.sh installs it)"
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(["rsyslogd", "-n", "-f", str(self.conf), "-i", str(self.dir / "rsyslogd.pid")],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        ready = wait_for(lambda: self.socket.exists() or self.proc.poll() is not None, timeout=15)
        assert ready and self.proc.poll() is None, self.proc.stdout.read().decode(errors="replace")
        time.sleep(0.3)  # imudp binds in its own thread
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)

    def received(self) -> list[dict]:
        """Every message, parsed: facility, severity, app, msgid, sequence id, event (the JSON)."""
        if not self.output.exists():
            return []
        out = []
        for line in self.output.read_text(errors="replace").splitlines():
            m = LINE.match(line)
            assert m, f"not an RFC 5424 message with a sequenceId and a JSON event: {line[:300]!r}"
            facility, severity, app, msgid, seq, body = m.groups()
            out.append({"facility": facility, "severity": severity, "app": app, "msgid": msgid,
                        "sequence_id": int(seq), "event": json.loads(body)})
        return out

    def sequences(self) -> list[int]:
        return [m["event"]["metadata"]["sequence"] for m in self.received()]


@pytest.fixture
def rsyslog(tmp_path):
    server = Rsyslogd(tmp_path / "rsyslog").start()
    try:
        yield server
    finally:
        server.stop()


def file_events(path: Path) -> list[dict]:
    files = sorted(path.parent.glob(path.name + "*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def store_chain(daemon: DaemonProcess) -> dict[int, str]:
    rows = daemon.audit_sql('SELECT chain_seq, hex(chain_hash) AS h FROM chain ORDER BY chain_seq')
    return {r["chain_seq"]: r["h"].lower() for r in rows}


def test_every_committed_event_reaches_rsyslog_in_sequence_without_secrets(pg_server, bao_server, tmp_path, rsyslog):
    seed_orders(pg_server)
    setup = fresh_setup(bao_server, pg_server, tmp_path)
    stream_file = tmp_path / "stream" / "audit.jsonl"
    port = new_port()
    extra = f"""
[audit.stream]
file = "{stream_file}"
syslog = "unix:{rsyslog.socket}"
syslog_facility = "local3"

[logging]
format = "json"
"""
    config = write_config(tmp_path / "botwarden.toml", workdir=tmp_path, pg=pg_server, bao=setup, listen_port=port,
                          extra=extra)
    daemon = DaemonProcess(config, tmp_path / "run" / "control.sock").start()
    tokens = []
    try:
        tokens.append(setup.mint_token())
        res = psql(port, tokens[-1], "SELECT count(*) FROM orders", "DROP TABLE orders",
                   "SELECT name, email FROM customers ORDER BY id")
        assert "no-drops" in res.stderr and "ada@example.com" not in res.stdout, res.stdout + res.stderr
        chain = store_chain(daemon)
        head = max(chain)
        assert wait_for(lambda: max(rsyslog.sequences(), default=0) >= head, timeout=20), rsyslog.sequences()

        got = rsyslog.received()
        seqs = [m["event"]["metadata"]["sequence"] for m in got]
        assert seqs == list(range(1, head + 1))  # every committed row, once, in chain order, from the first
        for m in got:
            ev = m["event"]
            assert m["sequence_id"] == ev["metadata"]["sequence"]  # RFC 5424 [meta sequenceId]
            assert m["msgid"] == ev["metadata"]["log_name"] and m["app"] == "botwarden"
            assert m["facility"] == "local3"
            assert ev["chain_hash"] == chain[ev["metadata"]["sequence"]]  # the committed row itself
        by_table = {}
        for m in got:
            by_table.setdefault(m["msgid"], []).append(m)
        (logon,) = [m["event"] for m in by_table["session_starts"]]
        assert (logon["class_uid"], logon["activity_name"], logon["status"]) == (3002, "Logon", "Success")
        assert logon["user"]["name"] == "orders-bot"
        blocked = [m for m in by_table["requests"] if m["event"]["unmapped"].get("rule") == "no-drops"]
        assert len(blocked) == 1 and blocked[0]["severity"] == "warning"
        ev = blocked[0]["event"]
        assert (ev["class_uid"], ev["disposition"], ev["status"], ev["api"]["operation"]) == (
            6003, "Blocked", "Failure", "query")
        masked = [m["event"] for m in by_table["requests"] if m["event"]["unmapped"].get("decision") == "mask"]
        assert masked and masked[0]["unmapped"]["masked"] == {"email": 2}
        (logoff,) = [m["event"] for m in by_table["session_ends"]]
        assert logoff["activity_name"] == "Logoff" and logoff["session"]["uid"] == logon["session"]["uid"]

        # The audit process was started with its stream: a reload that changes it is refused, and says why.
        good = config.read_text()
        try:
            config.write_text(good.replace('syslog_facility = "local3"', 'syslog_facility = "local4"'))
            res = subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(config), "config", "reload"],
                                 capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert res.returncode != 0 and "audit.stream cannot change on reload" in res.stderr, res.stderr
        finally:
            config.write_text(good)

        # The receiver goes away: the file keeps up, syslog catches up when it is back, nothing is lost.
        rsyslog.stop()
        tokens.append(setup.mint_token())
        assert psql(port, tokens[-1], "SELECT 1").returncode == 0
        head2 = max(store_chain(daemon))
        assert head2 > head
        assert wait_for(lambda: max((e["metadata"]["sequence"] for e in file_events(stream_file)), default=0) >= head2,
                        timeout=20)
        rsyslog.start()
        assert wait_for(lambda: max(rsyslog.sequences(), default=0) >= head2, timeout=40), rsyslog.sequences()
        assert rsyslog.sequences() == list(range(1, head2 + 1))

        # A restart resumes where the stream stopped: the old epoch's stop row and the new start rows follow.
        assert daemon.stop() == 0
        daemon = DaemonProcess(config, tmp_path / "run" / "control.sock").start()
        tokens.append(setup.mint_token())
        assert psql(port, tokens[-1], "SELECT 2").returncode == 0
        chain = store_chain(daemon)
        head3 = max(chain)
        assert wait_for(lambda: max(rsyslog.sequences(), default=0) >= head3, timeout=20)
        got = rsyslog.received()
        # Every row once, in order, from the first (rows committed since head3 was read may follow).
        seqs = [m["event"]["metadata"]["sequence"] for m in got]
        assert seqs == list(range(1, len(seqs) + 1)) and seqs[-1] >= head3
        assert "writer_stop" in {m["event"]["unmapped"].get("event") for m in got}
        in_file = [e["metadata"]["sequence"] for e in file_events(stream_file)]
        assert in_file == list(range(1, len(in_file) + 1)) and in_file[-1] >= head3
        chain = store_chain(daemon)   # now holding every row streamed so far
        assert all(m["event"]["chain_hash"] == chain[m["event"]["metadata"]["sequence"]] for m in got)

        # What the receiver holds is an off-host copy of the chain: `audit verify --anchors` (through
        # the running daemon) compares every position in it with the store.
        res = cli("--config", str(config), "audit", "verify", "--anchors", str(rsyslog.output))
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"{len(got)} off-host chain position(s) match the store, the last at seq {len(got)}" in res.stdout
    finally:
        daemon.stop()

    # Someone with root rewrites a request row of the stopped daemon's file and recomputes every
    # later hash: the chain alone verifies, the syslog receiver's copy does not.
    store = tmp_path / "state" / "audit.duckdb"
    con = duckdb.connect(str(store))
    forged = con.execute("SELECT chain_seq FROM requests WHERE rule = 'no-drops'").fetchone()[0]
    con.execute("UPDATE requests SET decision = 'allow', rule = NULL WHERE chain_seq = ?", [forged])
    _rechain_from(con, forged)
    con.close()
    res = cli("--config", str(config), "audit", "--path", str(store), "verify")
    assert res.returncode == 0 and res.stdout.startswith("OK"), res.stdout + res.stderr
    res = cli("--config", str(config), "audit", "--path", str(store), "verify", "--anchors", str(rsyslog.output),
              "--anchors", str(stream_file))
    assert res.returncode == 1 and res.stdout.startswith("FAILED"), res.stdout + res.stderr
    assert f"modified  requests seq {forged}: its hash is " in res.stdout
    assert "the chain was rewritten (hashes recomputed) after the copy was made" in res.stdout

    # No secret anywhere: tokens, the AppRole secret id, unmasked values.
    secret_id = Path(setup.secret_id_file).read_text().strip()
    for text in (rsyslog.output.read_text(), "\n".join(map(json.dumps, file_events(stream_file))), daemon.output()):
        for secret in (*tokens, secret_id, "ada@example.com", "4111111111111111"):
            assert secret not in text
    # [logging] format = "json": every line the daemon and its audit process wrote is one JSON object.
    lines = [line for line in daemon.output().splitlines() if line.strip()]
    assert lines
    for line in lines:
        doc = json.loads(line)
        assert {"ts", "level", "logger", "pid", "msg"} <= doc.keys(), doc
    loggers = {json.loads(line)["logger"] for line in lines}
    assert "appliance.daemon" in loggers and "appliance.auditstream" in loggers  # the audit process's too


def test_udp_and_events_longer_than_the_receivers_limit(tmp_path):
    """Over UDP to an rsyslogd with its default 8 KiB message limit: a 20 KB statement arrives
    as valid JSON, its text shortened and ``truncated`` set; the file has it whole."""
    rsyslog = Rsyslogd(tmp_path / "rsyslog", max_message_size=None).start()
    store = AuditStore(tmp_path / "audit.duckdb", flush_interval=0.05)
    store.start()
    stream = None
    try:
        stream = start_stream(store, {"file": str(tmp_path / "audit.jsonl"), "file_max_bytes": 10**7,
                                      "file_backups": 1, "syslog": f"udp:127.0.0.1:{rsyslog.udp_port}",
                                      "syslog_facility": "authpriv", "syslog_max_bytes": 8000})
        now = dt.datetime.now(dt.timezone.utc)
        long_text = "SELECT " + ", ".join(f"col_{i}" for i in range(2500)) + " FROM wide"
        store.submit("session_start", {"session_id": "s1", "ts": now, "target": "db", "protocol": "postgres",
                                       "identity": "bot"})
        store.submit("request", {"request_id": "r1", "session_id": "s1", "ts": now, "protocol": "postgres",
                                 "kind": "SELECT", "text": long_text, "decision": "allow"})
        store.flush()
        head = store.stats()["head_seq"]
        assert wait_for(lambda: max(rsyslog.sequences(), default=0) >= head, timeout=20), rsyslog.sequences()
        got = rsyslog.received()
        assert [m["event"]["metadata"]["sequence"] for m in got] == list(range(1, head + 1))
        assert all(m["facility"] == "authpriv" and m["sequence_id"] == m["event"]["metadata"]["sequence"] for m in got)
        (req,) = [m["event"] for m in got if m["msgid"] == "requests"]
        assert len(long_text) > 8192 and req["truncated"] is True
        assert long_text.startswith(req["unmapped"]["text"].removesuffix("…[cut]"))
        assert req["activity_name"] == "SELECT" and req["disposition"] == "Allowed"
        whole = [e for e in file_events(tmp_path / "audit.jsonl") if e["metadata"]["log_name"] == "requests"]
        assert whole[0]["unmapped"]["text"] == long_text and "truncated" not in whole[0]
    finally:
        if stream is not None:
            stream.close()
        store.close()
        rsyslog.stop()
