"""The fleet lake for real: two daemons (two state dirs, two bots cgroups) ship their audit to
one DuckLake whose catalog is a PostgreSQL 15 of its own, started here (and killed here).

Order matters inside the module: the tamper test writes into the lake, so it runs last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from analytics import fleet
from appliance.sandbox import PostgresServer
from tests.daemon_fixtures import ROOT, DaemonProcess, fresh_setup, new_port, psql, seed_orders, write_config
from tests.fleet_fixtures import Lake, new_lake, remove_lake
from tests.test_metrics import scrape_socket


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


class Bastion:
    def __init__(self, name: str, config: Path, daemon: DaemonProcess, port: int):
        self.name, self.config, self.daemon, self.port = name, config, daemon, port

    def status(self) -> dict:
        return self.daemon.client().get("/v1/status")

    def head(self) -> int:
        return self.daemon.audit_sql("SELECT max(chain_seq) AS head FROM chain")[0]["head"]

    def wait_shipped(self, timeout: float = 90) -> int:
        """Wait until everything committed so far is in the lake; returns that head."""
        head = self.head()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()["fleet"]
            if st["lake"] == "up" and (st.get("shipped_seq") or 0) >= head:
                return head
            time.sleep(0.2)
        raise AssertionError(f"bastion {self.name} did not ship up to seq {head}: {self.status()['fleet']}")

    def fleet(self, *args: str) -> subprocess.CompletedProcess:
        return cli("--config", str(self.config), "fleet", *args)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return cli("--config", str(self.config), *args)

    def wait_approvals_store(self, available: bool = True, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status()["fleet_approvals"]["available"] == available:
                return
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: fleet approvals available is not {available}: {self.status()}")


@pytest.fixture(scope="module")
def catalog_server():
    server = PostgresServer().start()   # the lake's catalog only: the tests kill and restart it
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def lake(catalog_server):
    found = new_lake(catalog_server)
    try:
        yield found
    finally:
        remove_lake(found)


@pytest.fixture(scope="module")
def bastions(pg_server, bao_server, lake: Lake, tmp_path_factory):
    seed_orders(pg_server)
    root = tmp_path_factory.mktemp("fleet")
    setup = fresh_setup(bao_server, pg_server, root)
    started: list[Bastion] = []
    try:
        for name in ("bastion-a", "bastion-b"):
            workdir = root / name
            workdir.mkdir()
            port = new_port()
            config = write_config(workdir / "botwarden.toml", workdir=workdir, pg=pg_server, bao=setup,
                                  listen_port=port, extra=lake.toml(name, "approvals = true"))
            # Each bastion watches its own bots cgroup (unique on this shared machine).
            text = config.read_text().replace('[probes]\nmode = "off"',
                                              f'[probes]\nmode = "off"\nbots_cgroup = "bw-fleet-{uuid.uuid4().hex[:8]}"')
            text = text.replace("[approvals]\ntimeout_s = 20", "[approvals]\ntimeout_s = 90")
            config.write_text(text)
            daemon = DaemonProcess(config, workdir / "run" / "control.sock").start()
            started.append(Bastion(name, config, daemon, port))
        yield type("Fleet", (), {"a": started[0], "b": started[1], "bao": setup, "pg": pg_server, "lake": lake})
    finally:
        for b in started:
            b.daemon.stop()


def lake_counts(lake: Lake, bastion: str, table: str,
                max_seq: int | None = None) -> tuple[int, int, int, int]:
    """(rows, distinct chain positions, min seq, max seq) of one bastion's table in the lake,
    up to chain position max_seq when given (the daemon may ship rows committed after a head was read)."""
    upto = "" if max_seq is None else f" AND chain_seq <= {int(max_seq)}"
    _, rows = fleet.run_sql(lake.settings(bastion), f"SELECT count(*), count(DISTINCT chain_seq), "
                                                    f"min(chain_seq), max(chain_seq) FROM {table} "
                                                    f"WHERE bastion = ?{upto}", [bastion])
    return tuple(rows[0])


def test_both_bastions_ship_and_fleet_sql_counts_each(bastions):
    a, b = bastions.a, bastions.b
    token = bastions.bao.mint_token()
    res = psql(a.port, token, *["SELECT count(*) FROM orders"] * 3)
    assert res.returncode == 0, res.stderr
    res = psql(b.port, token, *["SELECT id FROM orders WHERE id = 1"] * 5)
    assert res.returncode == 0, res.stderr
    a.wait_shipped()
    b.wait_shipped()
    local = {x.name: x.daemon.audit_sql("SELECT count(*) AS n FROM requests")[0]["n"] for x in (a, b)}
    assert local["bastion-a"] >= 3 and local["bastion-b"] >= 5

    res = a.fleet("sql", "SELECT bastion, count(*) AS n FROM requests GROUP BY bastion ORDER BY bastion",
                  "--format", "json")
    assert res.returncode == 0, res.stderr
    assert {r["bastion"]: r["n"] for r in json.loads(res.stdout)} == local
    # The other bastion's CLI sees the same lake.
    res = b.fleet("sql", "SELECT count(DISTINCT bastion) AS bastions FROM session_starts", "--format", "json")
    assert json.loads(res.stdout) == [{"bastions": 2}]

    st = a.status()["fleet"]
    assert st["bastion"] == "bastion-a" and st["lake"] == "up" and st["backlog"] == 0
    # The catalog's password never shows in a command line any local user can read.
    audit_pid = a.status()["audit"]["pid"]
    assert bastions.lake.server.password not in Path(f"/proc/{audit_pid}/cmdline").read_text()
    assert bastions.lake.server.password not in a.daemon.output()
    res = cli("--config", str(a.config), "status")
    assert "fleet: bastion bastion-a, lake up" in res.stdout
    _, metrics = scrape_socket(a.daemon.socket)
    assert "botwarden_fleet_backlog_rows 0.0" in metrics and "botwarden_fleet_lake_up 1.0" in metrics


def test_fleet_report_has_a_bastion_column(bastions):
    a, b = bastions.a, bastions.b
    token = bastions.bao.mint_token()
    for x in (a, b):
        res = psql(x.port, token, "SELECT * FROM vault_secrets")   # blocked by no-secrets-table
        assert "no-secrets-table" in res.stderr
        x.wait_shipped()
    res = a.fleet("report", "blocked_attempts", "--format", "json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert {r["bastion"] for r in rows if r["rule"] == "no-secrets-table"} == {"bastion-a", "bastion-b"}
    local = a.daemon.audit_sql("SELECT count(*) AS n FROM requests WHERE rule = 'no-secrets-table'")[0]["n"]
    assert sum(r["attempts"] for r in rows if r["bastion"] == "bastion-a" and r["rule"] == "no-secrets-table") == local


def test_catalog_killed_mid_shipping_no_gap_no_duplicate_bots_unaffected(bastions):
    a, lake = bastions.a, bastions.lake
    token = bastions.bao.mint_token()
    results: list[subprocess.CompletedProcess] = []
    stop = threading.Event()

    def bot() -> None:
        while not stop.is_set():
            results.append(psql(a.port, token, *["SELECT count(*) FROM orders"] * 20))

    t = threading.Thread(target=bot)
    t.start()
    try:
        # Shipping is under way (the bot keeps adding rows), then the catalog dies at once.
        deadline = time.monotonic() + 60
        start_seq = a.status()["fleet"]["shipped_seq"]
        while a.status()["fleet"]["shipped_seq"] == start_seq and time.monotonic() < deadline:
            time.sleep(0.1)
        lake.kill()
        before_outage = len(results)
        deadline = time.monotonic() + 60
        while a.status()["fleet"]["lake"] != "down" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert a.status()["fleet"]["lake"] == "down"
        # Bot traffic goes on while the lake is down, and the backlog grows visibly.
        deadline = time.monotonic() + 60
        while len(results) < before_outage + 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        st = a.status()["fleet"]
        assert st["lake"] == "down" and st["backlog"] > 0 and st["last_error"]
        assert "password" not in st["last_error"].lower() or "***" in st["last_error"]
        lake.restart()
    finally:
        stop.set()
        t.join(120)
    assert len(results) > before_outage + 3
    for r in results:
        assert r.returncode == 0 and r.stdout.split() == ["20"] * 20, r.stderr
    head = a.wait_shipped(timeout=120)
    # No gap, no duplicate: every chain position 1..head is in the lake exactly once.
    total = distinct = 0
    for table in ("session_starts", "session_ends", "requests", "request_starts", "approvals", "probes",
                  "recordings", "audit_losses", "writer_events"):
        n, d, _, hi = lake_counts(lake, "bastion-a", table)
        total += n
        distinct += d
        assert hi is None or hi <= head
    assert total == distinct
    lake_head = fleet.run_sql(lake.settings("x"), "SELECT max(seq_hi) FROM fleet_batches WHERE bastion = 'bastion-a'")
    assert total == lake_head[1][0][0]
    local = a.daemon.audit_sql("SELECT count(*) AS n FROM chain WHERE chain_seq <= ?", [lake_head[1][0][0]])[0]["n"]
    assert local == total
    res = a.fleet("verify")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK: 2 bastion(s)" in res.stdout


def test_restarted_daemon_resumes_from_the_lake_without_duplicates(bastions):
    b, lake = bastions.b, bastions.lake
    token = bastions.bao.mint_token()
    assert psql(b.port, token, "SELECT 1").returncode == 0
    before = b.wait_shipped()
    b.daemon.stop()
    b.daemon.start()
    res = psql(b.port, token, *["SELECT 2"] * 4)
    assert res.returncode == 0, res.stderr
    head = b.wait_shipped()
    assert head > before
    total = distinct = 0
    for table in ("session_starts", "session_ends", "requests", "approvals", "writer_events"):
        n, d, _, _ = lake_counts(lake, "bastion-b", table)
        assert n == d, table  # no chain position twice, shipped after the head or not
        n, d, _, _ = lake_counts(lake, "bastion-b", table, max_seq=head)
        total, distinct = total + n, distinct + d
    assert total == distinct
    local = b.daemon.audit_sql("SELECT count(*) AS n FROM chain WHERE \"table\" IN ('session_starts', "
                               "'session_ends', 'requests', 'approvals', 'writer_events') AND chain_seq <= ?",
                               [head])[0]["n"]
    assert local == total


def test_reload_refuses_a_changed_fleet_section(bastions):
    b = bastions.b
    text = b.config.read_text()
    try:
        b.config.write_text(text.replace('bastion = "bastion-b"', 'bastion = "bastion-b2"'))
        res = b.cli("config", "reload")
        assert res.returncode == 1 and "[fleet] cannot change on reload" in res.stderr
        assert b.status()["fleet"]["bastion"] == "bastion-b"
    finally:
        b.config.write_text(text)


def hold_on(bastion: Bastion, token: str, table: str, pg) -> tuple[threading.Thread, dict]:
    """A bot on ``bastion`` runs a DELETE without WHERE (held by mass-delete-needs-approval)."""
    pg.psql(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int); INSERT INTO {table} VALUES (1), (2)")
    result: dict = {}

    def bot() -> None:
        result["res"] = psql(bastion.port, token, f"DELETE FROM {table}", f"SELECT count(*) FROM {table}",
                             timeout=120)

    t = threading.Thread(target=bot)
    t.start()
    return t, result


def wait_listed(on: Bastion, held_on: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = on.cli("approvals", "list", "--json")
        assert res.returncode == 0, res.stderr
        items = [i for i in json.loads(res.stdout) if i.get("bastion") == held_on]
        if items:
            return items[0]
        time.sleep(0.3)
    raise AssertionError(f"no request held on {held_on} is listed on {on.name}")


def test_request_held_on_a_is_approved_from_b_cli(bastions):
    a, b, pg = bastions.a, bastions.b, bastions.pg
    a.wait_approvals_store()
    b.wait_approvals_store()
    t, result = hold_on(a, bastions.bao.mint_token(), "fleet_scratch_1", pg)
    item = wait_listed(b, "bastion-a")
    assert item["rule"] == "mass-delete-needs-approval" and item["identity"] == "orders-bot"
    assert pg.psql("SELECT count(*) FROM fleet_scratch_1") == "2"   # nothing ran while held
    res = b.cli("approvals", "approve", item["approval_id"], "--reason", "ok from b")
    assert res.returncode == 0, res.stderr
    assert "held on bastion-a" in res.stdout
    t.join(60)
    assert result["res"].returncode == 0, result["res"].stderr
    assert result["res"].stdout.strip().splitlines()[-1] == "0"
    on_a = a.daemon.audit_sql("SELECT event, operator FROM approvals WHERE approval_id = ? ORDER BY chain_seq",
                              [item["approval_id"]])
    assert [r["event"] for r in on_a] == ["requested", "notified", "approved"]   # notified: published
    assert on_a[2]["operator"] == "root@bastion-b"
    on_b = b.daemon.audit_sql("SELECT event, operator, reason FROM approvals WHERE approval_id = ?",
                              [item["approval_id"]])
    assert [(r["event"], r["operator"]) for r in on_b] == [("approved", "root")]
    assert on_b[0]["reason"].startswith("fleet: decided for bastion-a")


def test_concurrent_decisions_from_both_bastions_exactly_one_wins(bastions):
    a, b, pg = bastions.a, bastions.b, bastions.pg
    a.wait_approvals_store()
    b.wait_approvals_store()
    t, result = hold_on(a, bastions.bao.mint_token(), "fleet_scratch_2", pg)
    approval_id = wait_listed(b, "bastion-a")["approval_id"]
    base = [sys.executable, "-m", "appliance.cli", "--config"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argvs = ([[*base, str(a.config), "approvals", "approve", approval_id]] * 3
             + [[*base, str(b.config), "approvals", "deny", approval_id, "--reason", "no from b"]] * 3)
    procs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv in argvs]
    outs = [(p.wait(120), *p.communicate()) for p in procs]
    winners = [i for i, (rc, _, _) in enumerate(outs) if rc == 0]
    assert len(winners) == 1, outs
    for i, (rc, _, err) in enumerate(outs):
        if i not in winners:
            assert "already" in err or "no pending approval" in err, err
    t.join(60)
    final = a.daemon.audit_sql("SELECT event, operator FROM approvals WHERE approval_id = ? AND event IN "
                               "('approved', 'denied')", [approval_id])
    assert len(final) == 1
    count = pg.psql("SELECT count(*) FROM fleet_scratch_2")
    if winners[0] < 3:   # approved on A
        assert final[0]["event"] == "approved" and final[0]["operator"] == "root" and count == "0"
    else:
        assert final[0]["event"] == "denied" and final[0]["operator"] == "root@bastion-b" and count == "2"
        assert "no from b" in result["res"].stderr


def test_partition_degrades_to_local_approvals_never_auto_approves(bastions):
    a, b, pg, lake = bastions.a, bastions.b, bastions.pg, bastions.lake
    a.wait_approvals_store()
    lake.kill()
    try:
        a.wait_approvals_store(available=False)
        t, result = hold_on(a, bastions.bao.mint_token(), "fleet_scratch_3", pg)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            res = a.cli("approvals", "list", "--json")
            items = json.loads(res.stdout)
            if items:
                break
            time.sleep(0.3)
        assert items and items[0]["bastion"] == "bastion-a"
        assert "fleet approvals store unreachable" in res.stderr and "nothing is approved automatically" in res.stderr
        st = cli("--config", str(a.config), "status").stdout
        assert "fleet approvals: UNAVAILABLE" in st
        time.sleep(2)
        assert t.is_alive() and pg.psql("SELECT count(*) FROM fleet_scratch_3") == "2"   # still held, not run
        res = a.cli("approvals", "approve", items[0]["approval_id"])
        assert res.returncode == 0, res.stderr
        t.join(60)
        assert result["res"].stdout.strip().splitlines()[-1] == "0"
    finally:
        lake.restart()
    a.wait_approvals_store()
    b.wait_approvals_store()


def test_fleet_compact_merges_files_and_keeps_every_row(bastions):
    a, lake = bastions.a, bastions.lake
    a.wait_shipped()
    query = "SELECT bastion, count(*) AS n, count(DISTINCT chain_seq) AS d FROM requests GROUP BY bastion ORDER BY 1"
    before = json.loads(a.fleet("sql", query, "--format", "json").stdout)
    res = a.fleet("compact", "--keep-days", "0")
    assert res.returncode == 0, res.stderr
    files = [int(x) for x in res.stdout.split("requests in ")[1].split(" file")[0].split(" -> ")]
    assert files[1] < files[0]
    assert json.loads(a.fleet("sql", query, "--format", "json").stdout) == before
    res = a.fleet("verify")
    assert res.returncode == 0, res.stdout + res.stderr



def test_audit_verify_compares_the_local_chain_with_the_heads_shipped_to_the_lake(bastions):
    """The local chain is keyless: a root on the bastion who rewrites a row and recomputes every
    later hash passes `audit verify`. The heads of the batches already in the lake are a copy off
    the host: `audit verify --anchors-from-fleet` names the rewrite. Stops bastion a: run after
    every other test of a."""
    import duckdb

    from tests.test_audit_integrity import _rechain_from

    a = bastions.a
    assert psql(a.port, bastions.bao.mint_token(), "SELECT 'shipped before the forgery'").returncode == 0
    head = a.wait_shipped()
    res = a.cli("audit", "verify", "--anchors-from-fleet")  # through the daemon
    assert res.returncode == 0, res.stdout + res.stderr
    assert "off-host chain position(s) match the store" in res.stdout, res.stdout
    a.daemon.stop()
    store = a.config.parent / "state" / "audit.duckdb"
    con = duckdb.connect(str(store))
    try:
        seq = con.execute("SELECT min(chain_seq) FROM requests").fetchone()[0]
        con.execute("UPDATE requests SET text = 'SELECT 1 -- nothing to see' WHERE chain_seq = ?", [seq])
        _rechain_from(con, seq)
    finally:
        con.close()
    res = a.cli("audit", "verify")  # the chain alone: the forger wins
    assert res.returncode == 0, res.stdout + res.stderr
    res = a.cli("audit", "verify", "--anchors-from-fleet")
    assert res.returncode == 1 and res.stdout.startswith("FAILED"), res.stdout + res.stderr
    named = [line for line in res.stdout.splitlines() if line.lstrip().startswith("modified")]
    assert named and "an off-host copy holds" in named[0], res.stdout
    first = int(named[0].split(" seq ")[1].split(":")[0])
    assert seq <= first <= head  # the first batch head at or after the rewritten row
    # A lake with nothing of this bastion says so (bastion c never shipped).
    other = a.config.with_name("c.toml")
    other.write_text(a.config.read_text().replace('bastion = "bastion-a"', 'bastion = "bastion-c"'))
    res = cli("--config", str(other), "audit", "verify", "--anchors-from-fleet")
    assert res.returncode == 2 and "holds no batch of bastion 'bastion-c'" in res.stderr, res.stdout + res.stderr

def test_tampered_lake_row_is_named_by_fleet_verify(bastions):
    b, lake = bastions.b, bastions.lake
    b.wait_shipped()
    res = b.fleet("verify")
    assert res.returncode == 0, res.stdout + res.stderr
    _, rows = fleet.run_sql(lake.settings("bastion-b"),
                            "SELECT chain_seq FROM requests WHERE bastion = 'bastion-b' ORDER BY chain_seq LIMIT 1")
    seq = rows[0][0]
    con = fleet.connect(lake.settings("bastion-b"))   # someone with write access to the lake
    try:
        con.execute("UPDATE requests SET rows = 999 WHERE bastion = 'bastion-b' AND chain_seq = ?", [seq])
    finally:
        con.close()
    res = b.fleet("verify")
    assert res.returncode == 1
    assert f"modified  bastion bastion-b requests seq {seq}:" in res.stdout, res.stdout
    assert "bastion bastion-a" not in res.stdout.split("FAILED", 1)[1].split("\n", 2)[-1]


# -- [fleet] configuration (no servers) -----------------------------------------------------

MINIMAL = '[audit]\npath = "/tmp/x.duckdb"\n'


def test_fleet_config_errors_name_the_key_and_line_and_never_echo_the_catalog():
    from appliance.config import parse_config
    from appliance.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        parse_config(MINIMAL + '[fleet]\ncatalog = "dbname=lake"\ndata_path = "/l"\nbastion = "a b"\n', "f.toml")
    assert str(e.value).startswith("f.toml:6: fleet.bastion:")
    with pytest.raises(ConfigError) as e:
        parse_config(MINIMAL + '[fleet]\ncatalog = "s3cr3t-not-a-dsn"\ndata_path = "/l"\nbastion = "a"\n', "f.toml")
    assert "fleet.catalog" in str(e.value) and "s3cr3t" not in str(e.value)
    cfg = parse_config(MINIMAL + '[fleet]\ncatalog = "dbname=lake password=pw"\ndata_path = "/l"\nbastion = "b-1"\n'
                       'approvals = true\n')
    assert cfg.fleet.lake() == fleet.LakeSettings("dbname=lake password=pw", "/l", "b-1")
    assert cfg.fleet.approvals and cfg.fleet.approvals_dsn is None


def test_lake_errors_hide_the_catalog_password(tmp_path):
    settings = fleet.LakeSettings(f"host=127.0.0.1 port={_closed_port()} dbname=x user=u password=hunter2",
                                  str(tmp_path), "a")
    with pytest.raises(fleet.FleetError) as e:
        fleet.connect(settings)
    assert "hunter2" not in str(e.value)
    assert fleet.redact_dsn("host=h password='a b' user=u") == "host=h password=*** user=u"
    # `audit verify --anchors-from-fleet` against that lake fails the command, saying why and not the password;
    # without [fleet] it is a usage error naming the section.
    config = tmp_path / "f.toml"
    config.write_text(f'[audit]\npath = "{tmp_path / "a.duckdb"}"\n[fleet]\ncatalog = "{settings.catalog}"\n'
                      f'data_path = "{tmp_path}"\nbastion = "a"\n')
    res = cli("--config", str(config), "audit", "verify", "--anchors-from-fleet")
    assert res.returncode == 1 and "cannot attach the fleet lake" in res.stderr, res.stdout + res.stderr
    assert "hunter2" not in res.stdout + res.stderr
    config.write_text(f'[audit]\npath = "{tmp_path / "a.duckdb"}"\n')
    res = cli("--config", str(config), "audit", "verify", "--anchors-from-fleet")
    assert res.returncode == 2 and "has no [fleet] section" in res.stderr, res.stdout + res.stderr


def _closed_port() -> int:
    from appliance.sandbox import free_port

    return free_port()


def test_an_unreachable_lake_leaves_the_audit_store_alone(tmp_path):
    from analytics import AuditStore
    from tests.audit_fixtures import request, session_start, sid

    store = AuditStore(tmp_path / "a.duckdb")
    store.start()
    settings = fleet.LakeSettings(f"host=127.0.0.1 port={_closed_port()} dbname=x user=u password=hunter2",
                                  str(tmp_path / "lake"), "alone", interval=0.1)
    try:
        with fleet.shipping(store, settings.__dict__) as shipper:
            s = sid()
            assert store.submit("session_start", session_start(s))
            for i in range(50):
                assert store.submit("request", request(s, seq=i + 1))
            store.flush(10)
            deadline = time.monotonic() + 30
            while shipper.progress.lake != "down" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert shipper.progress.lake == "down" and store.healthy
        progress = fleet.read_progress(store.path)
        assert progress["lake"] == "down" and progress["shipped_seq"] is None
        assert "hunter2" not in progress["last_error"] and "hunter2" not in json.dumps(progress)
    finally:
        store.close()
