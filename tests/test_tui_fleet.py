"""The console's Audit tab on the fleet lake (Textual Pilot, in this process): two real daemons
ship their audit to one DuckLake whose catalog is a real PostgreSQL 15 (tests/test_fleet.py's
fixtures), and the console queries it read-only with the *operator's own* settings — a catalog
role that can only SELECT, from the operator's 0600 file or the environment — never the
daemons' catalog connection string.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input

from tests.daemon_fixtures import psql
from tests.test_fleet import bastions, catalog_server, lake  # noqa: F401  (module fixtures: 2 daemons, 1 lake)
from tests.test_tui import make_app, table_rows, text_of, until
from tui.app import BotwardenApp
from tui.fleet import CATALOG_ENV, DATA_PATH_ENV

pytestmark = [pytest.mark.timeout(300)]

QUERY = "SELECT bastion, count(*) AS n FROM requests GROUP BY bastion ORDER BY bastion"


@pytest.fixture
def operator(bastions, tmp_path, monkeypatch):  # noqa: F811
    """The operator's own catalog role (SELECT only on the lake's catalog tables) and a home for
    their settings; no fleet settings in the environment to start with."""
    lake = bastions.lake
    role, password = f"auditor_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    lake.server.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    lake.server.psql(f"GRANT CONNECT ON DATABASE {lake.dbname} TO {role}")
    lake.server.psql(f"GRANT USAGE ON SCHEMA public TO {role}; GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}",
                     db=lake.dbname)
    for name in (CATALOG_ENV, DATA_PATH_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return type("Operator", (), {"dsn": lake.server.dsn(user=role, password=password, db=lake.dbname),
                                 "data_path": str(lake.data_path), "config": tmp_path / "config" / "botwarden",
                                 "role": role, "password": password})


async def run_on_fleet(pilot, app: BotwardenApp, sql: str) -> None:
    """Type a query in the Audit tab's box and run it."""
    field = app.query_one("#sql", Input)
    field.value = ""
    await pilot.press(*sql, "enter")


def write_settings(operator: Any, mode: int) -> Path:
    operator.config.mkdir(parents=True, exist_ok=True)
    path = operator.config / "fleet.toml"
    path.write_text(f'catalog = "{operator.dsn}"\ndata_path = "{operator.data_path}"\n')
    path.chmod(mode)
    return path


def test_audit_tab_switched_to_the_fleet_shows_both_bastions_as_the_operator(bastions, operator):  # noqa: F811
    a, b = bastions.a, bastions.b
    token = bastions.bao.mint_token()
    assert psql(a.port, token, *["SELECT count(*) FROM orders"] * 2).returncode == 0
    assert psql(b.port, token, *["SELECT id FROM orders WHERE id = 1"] * 3).returncode == 0
    a.wait_shipped()
    b.wait_shipped()
    local = {x.name: x.daemon.audit_sql("SELECT count(*) AS n FROM requests")[0]["n"] for x in (a, b)}
    write_settings(operator, 0o644)  # readable by others: refused until it is 0600

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        app = make_app(str(a.daemon.socket))
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f3")
            await pilot.press("ctrl+f")
            seen["loose_file"] = text_of(app, "#audit-msg")
            await pilot.press("ctrl+f")  # back to this bastion
            (operator.config / "fleet.toml").chmod(0o600)
            await pilot.press("ctrl+f")
            seen["tab"] = str(app._tabs.get_tab("audit").label)
            seen["msg_on"] = text_of(app, "#audit-msg")
            seen["focus"] = app.focused.id
            await run_on_fleet(pilot, app, QUERY)
            await until(pilot, lambda: len(table_rows(app, "#audit-table")) == 2, "both bastions' rows", 90)
            seen["columns"] = [str(c.label) for c in app.query_one("#audit-table").ordered_columns]
            seen["rows"] = table_rows(app, "#audit-table")
            seen["msg"] = text_of(app, "#audit-msg")
            # What the attached lake says about its own connection: the operator's, not the daemons'.
            await run_on_fleet(pilot, app, "SELECT path FROM duckdb_databases() WHERE database_name = 'lake'")
            await until(pilot, lambda: "fleet: SELECT path" in text_of(app, "#audit-msg"), "the lake's path", 90)
            seen["attached"] = " ".join(" ".join(r) for r in table_rows(app, "#audit-table"))
            # Read-only: the lake cannot be written from the console.
            await run_on_fleet(pilot, app, "DELETE FROM requests")
            await until(pilot, lambda: "DELETE FROM requests" in text_of(app, "#audit-msg"), "the refusal", 90)
            seen["delete"] = text_of(app, "#audit-msg")
            await pilot.press("ctrl+f")
            seen["msg_off"] = text_of(app, "#audit-msg")
            await run_on_fleet(pilot, app, "SELECT count(*) AS n FROM requests")
            await until(pilot, lambda: "SELECT count(*) AS n FROM requests" in text_of(app, "#audit-msg")
                        and not text_of(app, "#audit-msg").startswith("running"), "this bastion's answer", 30)
            seen["local"] = (text_of(app, "#audit-msg"), table_rows(app, "#audit-table"))
        return seen

    seen = asyncio.run(scenario())
    assert "is readable or writable by others (mode 0644); chmod 600 it" in seen["loose_file"]
    assert seen["tab"] == "F3 Audit (fleet)" and seen["focus"] == "sql"
    assert f"as you (settings: {operator.config / 'fleet.toml'})" in seen["msg_on"]
    assert seen["columns"] == ["bastion", "n"]
    # Rows of both bastions, each as many as that bastion's own store has (all shipped).
    assert {r[0]: int(r[1]) for r in seen["rows"]} == local and set(local) == {"bastion-a", "bastion-b"}
    assert seen["msg"].startswith("fleet: SELECT bastion") and "2 rows" in seen["msg"]
    assert f"user={operator.role}" in seen["attached"]
    assert bastions.lake.server.password not in seen["attached"] and "user=postgres" not in seen["attached"]
    assert seen["delete"].startswith("fleet: DELETE FROM requests") and "refused: DELETE statement" in seen["delete"]
    assert "This bastion's audit store" in seen["msg_off"]
    msg, rows = seen["local"]
    # Back on this bastion: its own store over the control socket, no bastion column.
    assert not msg.startswith("fleet:") and len(rows) == 1 and rows[0] == [str(local["bastion-a"])], seen["local"]


def test_audit_tab_on_the_fleet_without_settings_or_with_an_unreachable_catalog_says_so(
        bastions, operator, monkeypatch):  # noqa: F811
    from appliance.sandbox import free_port

    a = bastions.a

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        app = make_app(str(a.daemon.socket))
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f3", "ctrl+f")
            seen["none"] = text_of(app, "#audit-msg")
            seen["none_error"] = app.query_one("#audit-msg").has_class("error")
            # A query anyway: the same message, the console goes on.
            await run_on_fleet(pilot, app, QUERY)
            await until(pilot, lambda: text_of(app, "#audit-msg").startswith("fleet: SELECT"), "the answer", 30)
            seen["none_query"] = text_of(app, "#audit-msg")
            # Only one of the two variables.
            monkeypatch.setenv(CATALOG_ENV, operator.dsn)
            await run_on_fleet(pilot, app, QUERY)
            await until(pilot, lambda: DATA_PATH_ENV in text_of(app, "#audit-msg"), "the missing variable", 30)
            seen["half"] = text_of(app, "#audit-msg")
            # A catalog nobody listens on.
            dead = f"host=127.0.0.1 port={free_port()} dbname=lake user={operator.role} password={operator.password}"
            monkeypatch.setenv(CATALOG_ENV, dead)
            monkeypatch.setenv(DATA_PATH_ENV, operator.data_path)
            await run_on_fleet(pilot, app, QUERY)
            await until(pilot, lambda: "cannot attach" in text_of(app, "#audit-msg"), "the unreachable lake", 60)
            seen["dead"] = text_of(app, "#audit-msg")
            seen["dead_error"] = app.query_one("#audit-msg").has_class("error")
            seen["notices"] = list(app.notices)
            seen["running"] = app.is_running
        return seen

    seen = asyncio.run(scenario())
    path = operator.config / "fleet.toml"
    for text in (seen["none"], seen["none_query"]):
        assert f"no lake configured for you. Set {CATALOG_ENV}" in text and str(path) in text, text
    assert seen["none_error"]
    assert f"{DATA_PATH_ENV} is not set" in seen["half"]
    assert "cannot attach the fleet lake" in seen["dead"] and seen["dead_error"], seen["dead"]
    # The operator's password is not repeated on screen either.
    assert operator.password not in seen["dead"]
    assert not any(operator.password in n for n in seen["notices"])
    assert seen["running"]


def test_operator_settings_come_from_the_environment_or_the_operators_own_private_file(tmp_path):
    from tui.fleet import FleetUnavailable, OperatorLake

    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    with pytest.raises(FleetUnavailable, match="no lake configured for you"):
        OperatorLake.find(env)
    found = OperatorLake.find({**env, CATALOG_ENV: "dbname=lake user=alice", DATA_PATH_ENV: "/mnt/lake"})
    assert (found.source, found.settings.catalog, found.settings.data_path) == ("environment", "dbname=lake user=alice",
                                                                                "/mnt/lake")
    path = tmp_path / "botwarden" / "fleet.toml"
    path.parent.mkdir()
    path.write_text('catalog = "dbname=lake user=bob password=s3cret"\ndata_path = "/mnt/lake"\n')
    for mode in (0o640, 0o604, 0o620):
        path.chmod(mode)
        with pytest.raises(FleetUnavailable, match=f"mode {mode:04o}") as e:
            OperatorLake.find(env)
        assert "s3cret" not in str(e.value)
    path.chmod(0o600)
    found = OperatorLake.find(env)
    assert found.source == str(path) and found.settings.catalog == "dbname=lake user=bob password=s3cret"
    os.chown(path, 65534, -1)  # someone else's file, even 0600
    with pytest.raises(FleetUnavailable, match="is not yours"):
        OperatorLake.find(env)
    path.write_text('catalog = "dbname=lake"\n')
    os.chown(path, os.getuid(), -1)
    with pytest.raises(FleetUnavailable, match="needs catalog"):
        OperatorLake.find(env)
