"""Issue 14.4, audit: tampering with an audit file the REAL daemon wrote is caught by
`botwarden audit verify`, which names the first bad sequence number and exits 1.

The daemon (`botwarden run`, a real PostgreSQL 15 and OpenBao) records a few bot sessions
(allowed, blocked and masked statements), then stops. Each case tampers with a copy of its state
directory the way someone with write access to the file would: update a row, delete a row,
append a forged row (its hash recomputed, so the chain itself fits), cut the tail off. The
daemon then starts again on the untouched original, which still verifies, and serves bots.
Store-level cases (every kind of tampering, property-tested) are in tests/test_audit_integrity.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

import analytics
from analytics.chain import canonical, row_hash
from tests.daemon_fixtures import ROOT, DaemonProcess, fresh_setup, new_port, psql, seed_orders, write_config

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def recorded(pg_server, bao_server, tmp_path_factory):
    """A state directory the daemon wrote and left cleanly; the daemon (stopped) to start again."""
    workdir = tmp_path_factory.mktemp("adversarial-audit")
    seed_orders(pg_server)
    setup = fresh_setup(bao_server, pg_server, workdir)
    port = new_port()
    config = write_config(workdir / "botwarden.toml", workdir=workdir, pg=pg_server, bao=setup, listen_port=port)
    daemon = DaemonProcess(config, workdir / "run" / "control.sock").start()
    try:
        for _ in range(3):
            res = psql(port, setup.mint_token(), "SELECT count(*) FROM orders", "DROP TABLE orders",
                       "SELECT email FROM customers")
            assert "no-drops" in res.stderr, res.stderr
    finally:
        assert daemon.stop() == 0
    state = workdir / "state"
    assert analytics.verify(state / "audit.duckdb").clean
    yield type("Recorded", (), {"state": state, "daemon": daemon, "port": port, "bao": setup, "pg": pg_server})


def tampered_copy(recorded, tmp_path: Path) -> Path:
    copy = tmp_path / "state"
    shutil.copytree(recorded.state, copy, ignore=shutil.ignore_patterns("*.lock", "*.pid"))
    return copy / "audit.duckdb"


def verify_cli(path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(tmp_path / "none.toml"),
                           "--socket", str(tmp_path / "no-daemon.sock"), "audit", "--path", str(path), "verify"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _one(con, sql: str, params=()) -> tuple:
    return con.execute(sql, list(params)).fetchone()


def update_a_row(con) -> tuple[int, str]:
    seq = _one(con, "SELECT chain_seq FROM requests WHERE decision = 'block' ORDER BY chain_seq LIMIT 1")[0]
    con.execute("UPDATE requests SET decision = 'allow' WHERE chain_seq = ?", [seq])
    return seq, f"modified  requests seq {seq}: "


def delete_a_row(con) -> tuple[int, str]:
    seq = _one(con, "SELECT chain_seq FROM requests ORDER BY chain_seq LIMIT 1 OFFSET 3")[0]
    con.execute("DELETE FROM requests WHERE chain_seq = ?", [seq])
    return seq, f"deleted   ? seq {seq}: "


def append_a_forged_row(con) -> tuple[int, str]:
    """A copy of an allowed request, chained after the head with a correct hash: only the writer
    epochs (it lies after the last writer_stop) and the high-water file can tell."""
    head, head_hash = _one(con, "SELECT chain_seq, chain_hash FROM chain ORDER BY chain_seq DESC LIMIT 1")
    model = _one(con, "SELECT chain_seq FROM requests WHERE decision = 'allow' ORDER BY chain_seq LIMIT 1")[0]
    con.execute("INSERT INTO requests SELECT * REPLACE (? AS chain_seq, ? AS chain_prev, 'forged' AS request_id, "
                "'DELETE FROM orders' AS text) FROM requests WHERE chain_seq = ?", [head + 1, bytes(head_hash), model])
    cols = [r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'requests' "
                                      "ORDER BY column_index").fetchall()]
    names = [c for c in cols if c not in analytics.schema.CHAIN_COLUMNS]
    row = _one(con, f"SELECT {', '.join(f'epoch_us({n})' if n == 'ts' else f'{n}' for n in names)} FROM requests "
                    "WHERE chain_seq = ?", [head + 1])
    con.execute("UPDATE requests SET chain_hash = ? WHERE chain_seq = ?",
                [row_hash(bytes(head_hash), "requests", canonical(names, row, frozenset())), head + 1])
    return head + 1, (f"inserted  ? seq {head + 1}: 1 row(s) lie after epoch 1's writer_stop (seq {head}) "
                      "outside any writer epoch")


def truncate_the_tail(con) -> tuple[int, str]:
    head = _one(con, "SELECT max(chain_seq) FROM chain")[0]
    first_cut = head - 4
    for table in analytics.schema.CHAINED_TABLES:
        con.execute(f"DELETE FROM {table} WHERE chain_seq >= ?", [first_cut])
    return first_cut, f"At least 5 committed row(s) after it are gone: seq {first_cut}..{head}"


@pytest.mark.parametrize("tamper", [update_a_row, delete_a_row, append_a_forged_row, truncate_the_tail],
                         ids=lambda f: f.__name__)
def test_tampering_with_the_daemons_audit_file_is_caught_naming_the_first_bad_seq(recorded, tmp_path, tamper):
    path = tampered_copy(recorded, tmp_path)
    con = duckdb.connect(str(path))
    try:
        first_bad, says = tamper(con)
    finally:
        con.close()
    res = verify_cli(path, tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout.startswith("FAILED"), res.stdout
    assert says in res.stdout, res.stdout
    # The first row blamed is the first bad one (a problem line, or the gap's first missing seq).
    blamed = [int(m) for m in re.findall(r"^  \w+ +\S+ seq (\d+):", res.stdout, re.M)]
    blamed += [int(m) for m in re.findall(r"are gone: seq (\d+)\.\.", res.stdout)]
    assert min(blamed) == first_bad, res.stdout


def test_the_daemon_starts_again_on_the_untouched_file_which_still_verifies(recorded, tmp_path):
    daemon = recorded.daemon.start()
    try:
        res = psql(recorded.port, recorded.bao.mint_token(), "SELECT count(*) FROM orders")
        assert res.returncode == 0 and res.stdout.strip() == "20", res.stderr
        doc = daemon.client().post("/v1/audit/verify", {"allow_gaps": False}, timeout=120)
        assert doc["ok"] and doc["clean"], doc
    finally:
        daemon.stop()
