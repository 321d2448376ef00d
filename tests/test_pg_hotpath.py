"""Large results through the PostgreSQL front on the hot paths of appliance/hotpath (issue 20):
an unmasked result is relayed without Python per message, a masked one in runs of rows, and
both give the bot exactly what the row-by-row path gives."""

from __future__ import annotations

import psycopg
import pytest

from appliance.fronts.postgres import masking as front_masking
from appliance.fronts.postgres import session as front_session
from appliance.fronts.services import Credential, DefaultServices
from appliance.hotpath import reference
from appliance.policy.masking import ColumnAction, DetectorSettings, RowMasker, Strategy
from appliance.policy.types import Verdict
from tests.pg_front_fixtures import APP_PASSWORD, APP_USER, FrontThread, plain_settings, setup_roles

ROWS = 20_000
PLAIN = f"SELECT g AS id, 'person' || g || '@example.com' AS email, md5(g::text) AS note FROM generate_series(1, {ROWS}) g"
MASKED = PLAIN + " -- masked"


class PartialMaskServices(DefaultServices):
    """MASKED gets the policy engine's RowMasker with a partial rule on email and note."""

    def __init__(self):
        super().__init__(Credential(APP_USER, APP_PASSWORD))

    def decide_sql(self, grant, target, sql, phase, **kw):
        return Verdict("mask", "pii", "two columns") if sql == MASKED else super().decide_sql(grant, target, sql, phase)

    def mask_plan(self, grant, target, verdict, columns):
        return RowMasker([ColumnAction(c.name, c.type_oid, c.format, Strategy("partial", 4))
                          if c.name in ("email", "note") else None for c in columns], DetectorSettings())


@pytest.fixture(scope="module")
def front(pg_server):
    setup_roles(pg_server)
    ft = FrontThread(plain_settings(pg_server), PartialMaskServices())
    yield ft
    ft.stop()


def counting(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def wrapper(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_unmasked_result_is_relayed_without_python_per_row(front, pg_server, monkeypatch):
    skips = counting(monkeypatch, front_session, "_skip_unhandled")
    with psycopg.connect(pg_server.dsn(user=APP_USER, password=APP_PASSWORD), autocommit=True) as direct:
        expected = direct.execute(PLAIN).fetchall()
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        for binary in (False, True):
            assert conn.cursor(binary=binary).execute(PLAIN).fetchall() == expected
    # One call steps over every DataRow of a server read: far fewer calls than rows.
    assert 0 < len(skips) < ROWS // 20, len(skips)


def test_masked_result_in_runs_equals_row_by_row(front, pg_server, monkeypatch):
    runs = counting(monkeypatch, front_masking, "mask_rows")
    with psycopg.connect(pg_server.dsn(user=APP_USER, password=APP_PASSWORD), autocommit=True) as direct:
        plain = direct.execute(PLAIN).fetchall()
    expected = [(i, reference.partial(e, 4), reference.partial(n, 4)) for i, e, n in plain]
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        assert conn.cursor().execute(MASKED, prepare=False).fetchall() == expected  # simple protocol
        assert conn.cursor().execute(MASKED, prepare=True).fetchall() == expected   # extended
    assert 0 < len(runs) < ROWS // 20, len(runs)
    recs = [r for r in front.services.of_kind("request") if r["text"] == MASKED]
    assert len(recs) == 2 and all(r["masked"] == {"email": ROWS, "note": ROWS} for r in recs), recs


def test_row_descriptions_are_decoded_once_and_a_malformed_one_still_fails():
    """A masked statement's RowDescription (or its portal's, each Execute) is decoded once per
    distinct description (wire.columns_of): the same columns as decoding it, each time, and a
    bad one raises each time (failures are not cached)."""
    from appliance.fronts.postgres.wire import _columns, columns_of
    from appliance.protocols.postgres import messages as m
    from appliance.protocols.postgres.errors import RemoteProtocolError

    desc = m.RowDescription(tuple(m.FieldDescription(n, 16384, i + 1, 25, -1, -1, i % 2)
                                  for i, n in enumerate(["id", "email", "ssn"])))
    body = desc.encode()[5:]
    columns_of.cache_clear()
    first = columns_of(bytes(body))
    assert list(first) == _columns(m.RowDescription.decode(body))
    assert columns_of(bytes(body)) is first and columns_of.cache_info().hits == 1
    bad = body[:-2] + b"\x00\x07"  # format code 7
    for _ in range(2):
        with pytest.raises(RemoteProtocolError, match="unknown format code 7"):
            columns_of(bad)
