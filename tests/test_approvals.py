"""The approval broker on its own, against a real audit store and a real local HTTP server.

What a held request carries, N-of-M, approval windows by statement shape, expiry, operators
mapped to the identity, the Slack-compatible webhook (retries, no statement text), the
start-up sweep of approvals an unclean stop left undecided, and audit schema v3. The
daemon end to end (psql, psycopg, the CLI) is in tests/test_approvals_daemon.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

import analytics
from analytics import AuditStore, db, schema
from appliance.approvals import ApprovalBroker, ApprovalError, Operator
from appliance.policy import PolicyEngine
from tests.approvals_fixtures import Hook, wait_until

UTC = dt.timezone.utc
ALICE = Operator("alice", 1001)
BOB = Operator("bob", 1002)
SECRET_VALUE = "ada@example.com"
STATEMENT = f"DELETE FROM customers WHERE email = '{SECRET_VALUE}'"


@pytest.fixture
def store(tmp_path):
    s = AuditStore(tmp_path / "audit.duckdb", strict=True, flush_interval=0.02)
    s.start()
    try:
        yield s
    finally:
        s.close()


def events(store: AuditStore, approval_id: str) -> list[dict]:
    store.flush()
    cols, rows = store.query("SELECT * EXCLUDE (chain_seq, chain_prev, chain_hash) FROM approvals "
                             "WHERE approval_id = ? ORDER BY chain_seq", [approval_id])
    return [dict(zip(cols, r)) for r in rows]


def hold(broker: ApprovalBroker, *, text: str = STATEMENT, identity: str = "ci-bot", target: str = "pg-prod",
         excluded: frozenset[int] = frozenset(), notices: list | None = None) -> asyncio.Task:
    return asyncio.ensure_future(broker.hold(
        session_id="s1", identity=identity, target=target, protocol="postgres", text=text,
        rule="deletes-need-approval", shape=PolicyEngine.shape_of(text), request_id="r-" + text[:8],
        process={"pid": 4242, "uid": 1000, "exe": "/usr/bin/psql", "comm": "psql"},
        excluded_uids=excluded, notify=(notices.append if notices is not None else None)))


async def pending_id(broker: ApprovalBroker, before: set[str] | None = None) -> str:
    for _ in range(500):
        new = set(broker.pending) - (before or set())
        if new:
            return new.pop()
        await asyncio.sleep(0.01)
    raise AssertionError("nothing was held")


# -- what a held request carries ---------------------------------------------------------------


def test_held_request_carries_everything_an_operator_decides_on(store):
    async def scenario():
        broker = ApprovalBroker(timeout_s=300, audit=store.submit)
        notices: list[str] = []
        task = hold(broker, notices=notices)
        approval_id = await pending_id(broker)
        listed = broker.list()
        broker.deny(approval_id, ALICE, "not now")
        return approval_id, listed, notices, await task

    approval_id, listed, notices, outcome = asyncio.run(scenario())
    assert notices == [approval_id]  # the front was told the id at once (its NoticeResponse)
    (item,) = listed
    assert item["approval_id"] == approval_id and item["identity"] == "ci-bot" and item["target"] == "pg-prod"
    assert item["request"] == STATEMENT and item["rule"] == "deletes-need-approval"
    assert item["process"] == {"pid": 4242, "uid": 1000, "exe": "/usr/bin/psql", "comm": "psql"}
    created, expires = (dt.datetime.fromisoformat(item[k]) for k in ("created", "expires"))
    assert expires - created == dt.timedelta(seconds=300)
    assert not outcome.approved and outcome.state == "denied" and "alice: not now" in outcome.reason
    rows = events(store, approval_id)
    assert [r["event"] for r in rows] == ["requested", "denied"]
    assert rows[1]["operator"] == "alice" and rows[1]["operator_uid"] == 1001 and rows[1]["reason"] == "not now"
    assert rows[1]["waited_ms"] > 0 and rows[0]["request_id"] == rows[1]["request_id"] == "r-DELETE F"


def test_a_denial_needs_a_reason_and_unknown_ids_are_404(store):
    async def scenario():
        broker = ApprovalBroker(timeout_s=300, audit=store.submit)
        task = hold(broker)
        approval_id = await pending_id(broker)
        with pytest.raises(ApprovalError) as empty:
            broker.deny(approval_id, ALICE, "  ")
        with pytest.raises(ApprovalError) as unknown:
            broker.approve("nope", ALICE)
        broker.approve(approval_id, ALICE)
        with pytest.raises(ApprovalError) as again:
            broker.deny(approval_id, BOB, "too late")
        return empty.value, unknown.value, again.value, await task

    empty, unknown, again, outcome = asyncio.run(scenario())
    assert empty.status == 400 and "reason" in empty.message
    assert unknown.status == 404 and "no pending approval 'nope'" in unknown.message
    assert again.status == 404  # decided already
    assert outcome.approved and outcome.decided_by == "alice" and outcome.state == "approved"


def test_operator_mapped_to_the_identity_may_not_approve_its_request(store):
    async def scenario():
        broker = ApprovalBroker(timeout_s=300, audit=store.submit)
        task = hold(broker, excluded=frozenset({ALICE.uid}))
        approval_id = await pending_id(broker)
        with pytest.raises(ApprovalError) as refused:
            broker.approve(approval_id, ALICE)
        still_pending = approval_id in broker.pending
        broker.approve(approval_id, BOB)
        return approval_id, refused.value, still_pending, await task

    approval_id, refused, still_pending, outcome = asyncio.run(scenario())
    assert refused.status == 403 and "alice" in refused.message and "ci-bot" in refused.message
    assert still_pending and outcome.approved and outcome.decided_by == "bob"
    # The refused attempt is on record (who, and why), then the decision.
    assert [(r["event"], r["operator_uid"]) for r in events(store, approval_id)] == [
        ("requested", None), ("decision_refused", ALICE.uid), ("approved", BOB.uid)]
    assert "(operator_uids)" in events(store, approval_id)[1]["reason"]


# -- N-of-M ---------------------------------------------------------------------------------------


def test_two_of_m_records_the_partial_approval_then_the_decision(store):
    async def scenario():
        broker = ApprovalBroker(timeout_s=300, required=2, audit=store.submit)
        task = hold(broker)
        approval_id = await pending_id(broker)
        first = broker.approve(approval_id, ALICE, reason="looks right")
        with pytest.raises(ApprovalError) as twice:
            broker.approve(approval_id, ALICE)
        waiting = not task.done()
        second = broker.approve(approval_id, BOB)
        return approval_id, first, twice.value, waiting, second, await task

    approval_id, first, twice, waiting, second, outcome = asyncio.run(scenario())
    assert first == {"approval_id": approval_id, "state": "pending", "approvals": 1, "required": 2}
    assert twice.status == 409 and waiting
    assert second["state"] == "approved" and outcome.approved and outcome.decided_by == "alice,bob"
    rows = events(store, approval_id)
    assert [(r["event"], r["operator"], r["operator_uid"]) for r in rows] == [
        ("requested", None, None), ("approved_partial", "alice", 1001), ("approved", "bob", 1002)]
    assert rows[1]["reason"] == "looks right"


# -- expiry, abandon, shutdown ------------------------------------------------------------------------


def test_expiry_denies_and_is_recorded(store):
    async def scenario():
        broker = ApprovalBroker(timeout_s=0.3, audit=store.submit)
        return await hold(broker)

    outcome = asyncio.run(scenario())
    assert not outcome.approved and outcome.state == "expired" and "timed out after 0.3s" in outcome.reason
    rows = events(store, outcome.approval_id)
    assert [r["event"] for r in rows] == ["requested", "expired"]
    assert rows[1]["operator"] is None and rows[1]["waited_ms"] >= 300


def test_a_cancelled_hold_is_abandoned_and_shutdown_cancels_the_rest(store):
    async def scenario():
        broker = ApprovalBroker(timeout_s=300, audit=store.submit)
        gone = hold(broker)
        gone_id = await pending_id(broker)
        stays = hold(broker, text="DELETE FROM orders")
        stays_id = await pending_id(broker, {gone_id})
        gone.cancel()  # what the front does when the bot hangs up
        with pytest.raises(asyncio.CancelledError):
            await gone
        await broker.shutdown("botwarden is restarting")
        after = await broker.hold(session_id="s2", identity="ci-bot", target="pg-prod", protocol="postgres",
                                  text="DELETE FROM t", rule=None, shape="x")
        return gone_id, stays_id, await stays, after, broker.list()

    gone_id, stays_id, stayed, after, left = asyncio.run(scenario())
    assert [r["event"] for r in events(store, gone_id)] == ["requested", "abandoned"]
    assert not stayed.approved and stayed.state == "cancelled_restart" and "restarting" in stayed.reason
    rows = events(store, stays_id)
    assert [r["event"] for r in rows] == ["requested", "cancelled_restart"]
    assert rows[1]["reason"] == "botwarden is restarting"
    # Once stopping, nothing new is held, and that is recorded too.
    assert not after.approved and after.state == "cancelled_restart"
    assert [r["event"] for r in events(store, after.approval_id)] == ["requested", "cancelled_restart"]
    assert left == []


# -- approval windows -----------------------------------------------------------------------------------


def test_shape_is_the_pglast_fingerprint():
    shape = PolicyEngine.shape_of
    assert shape("DELETE FROM t") == shape("delete  from T") == shape("DELETE\nFROM t")
    assert shape("DELETE FROM t WHERE id = 1") == shape("delete from t where id = 2")
    assert shape("DELETE FROM t") != shape("DELETE FROM u")
    assert shape("DELETE FROM t WHERE id = 1") != shape("DELETE FROM t WHERE note = 'x'")
    assert shape("not sql at all") != shape("not sql at all!") and shape("not sql").startswith("text:")


def test_window_lets_the_same_shape_through_until_it_ends(store):
    async def scenario():
        broker = ApprovalBroker(timeout_s=300, audit=store.submit)
        first = hold(broker, text="DELETE FROM t")
        first_id = await pending_id(broker)
        broker.approve(first_id, ALICE, window_s=1, reason="cleanup")
        await first
        same = await asyncio.wait_for(hold(broker, text="delete  from T"), 2)  # not held
        held = {}
        for name, kw in (("other_identity", {"identity": "other-bot", "text": "DELETE FROM t"}),
                         ("other_target", {"target": "pg-staging", "text": "DELETE FROM t"}),
                         ("other_shape", {"text": "DELETE FROM u"})):
            before = set(broker.pending)
            task = hold(broker, **kw)
            held[name] = await pending_id(broker, before)
            broker.deny(held[name], BOB, "not in the window")
            await task
        await asyncio.sleep(1.1)  # the 1 s window ends
        before = set(broker.pending)
        late = hold(broker, text="DELETE FROM t")
        late_id = await pending_id(broker, before)
        broker.deny(late_id, BOB, "window over")
        await late
        return first_id, same, held, late_id

    first_id, same, held, late_id = asyncio.run(scenario())
    assert same.approved and same.decided_by == "alice" and first_id in same.reason
    rows = events(store, same.approval_id)
    assert [(r["event"], r["operator"], r["operator_uid"], r["window_s"]) for r in rows] == [
        ("approved", "alice", 1001, 1)]
    assert first_id in rows[0]["reason"] and rows[0]["waited_ms"] == 0
    assert events(store, first_id)[-1]["window_s"] == 1
    assert len(set(held.values())) == 3 and late_id not in held.values()


# -- the webhook -------------------------------------------------------------------------------------------


def test_webhook_retries_and_never_carries_the_statement(store):
    with Hook(fail=1) as hook:
        async def scenario():
            broker = ApprovalBroker(timeout_s=300, audit=store.submit, webhook_url=hook.url, webhook_backoff_s=0.05)
            task = hold(broker)
            approval_id = await pending_id(broker)
            await asyncio.to_thread(wait_until, lambda: len(hook.attempts(approval_id)) == 2)
            await asyncio.to_thread(wait_until, lambda: any(
                r["event"] == "notified" and "webhook" in r["reason"] for r in events(store, approval_id)))
            broker.approve(approval_id, ALICE)
            await task
            return approval_id

        approval_id = asyncio.run(scenario())
        raw = [b for b in hook.bodies]
    first, second = hook.attempts(approval_id)
    assert first == second  # the retry sends the same payload
    assert isinstance(first["text"], str) and approval_id in first["text"] and "ci-bot" in first["text"]
    assert first["blocks"][0]["type"] == "section"  # Slack Block Kit, with `text` as the fallback
    assert first["botwarden"]["identity"] == "ci-bot" and first["botwarden"]["target"] == "pg-prod"
    for body in raw:  # neither the statement nor its values leave through the webhook
        assert SECRET_VALUE.encode() not in body and b"DELETE" not in body and b"customers" not in body
    notified = [r for r in events(store, approval_id) if r["event"] == "notified"]
    assert len(notified) == 1 and "HTTP 200" in notified[0]["reason"] and "attempt 2" in notified[0]["reason"]


def test_a_webhook_failing_every_retry_is_recorded_and_the_hold_goes_on(store):
    with Hook(fail=99, status=500) as hook:
        async def scenario():
            broker = ApprovalBroker(timeout_s=300, audit=store.submit, webhook_url=hook.url, webhook_retries=3,
                                    webhook_backoff_s=0.02)
            task = hold(broker)
            approval_id = await pending_id(broker)
            await asyncio.to_thread(wait_until, lambda: any(
                r["event"] == "notify_failed" for r in events(store, approval_id)))
            still = not task.done()
            broker.approve(approval_id, BOB)
            return approval_id, still, await task

        approval_id, still, outcome = asyncio.run(scenario())
    assert len(hook.attempts(approval_id)) == 3
    assert still and outcome.approved  # a failed notification does not decide anything
    rows = events(store, approval_id)
    assert [r["event"] for r in rows] == ["requested", "notify_failed", "approved"]
    assert "3 time(s)" in rows[1]["reason"] and "HTTP 500" in rows[1]["reason"]


def test_shutdown_stops_a_webhook_waiting_to_retry(store):
    with Hook(fail=99, status=502) as hook:
        async def scenario():
            broker = ApprovalBroker(timeout_s=300, audit=store.submit, webhook_url=hook.url, webhook_retries=3,
                                    webhook_backoff_s=600)  # the retry would come in ten minutes
            task = hold(broker)
            approval_id = await pending_id(broker)
            await asyncio.to_thread(wait_until, lambda: len(hook.attempts(approval_id)) == 1)
            await broker.shutdown("botwarden is stopping")
            await task
            await asyncio.to_thread(wait_until, lambda: any(
                r["event"] == "notify_failed" for r in events(store, approval_id)), 20)
            return approval_id

        approval_id = asyncio.run(scenario())
    assert len(hook.attempts(approval_id)) == 1
    failed = [r for r in events(store, approval_id) if r["event"] == "notify_failed"]
    assert "failed 1 time(s)" in failed[0]["reason"] and "not retried: botwarden is stopping" in failed[0]["reason"]


def test_watchers_get_the_request_at_once_and_that_is_recorded(store):
    async def scenario():
        broker = ApprovalBroker(timeout_s=300, audit=store.submit)
        queue = broker.subscribe()
        task = hold(broker)
        message = await asyncio.wait_for(queue.get(), 5)
        broker.deny(message["approval"]["approval_id"], ALICE, "no")
        await task
        decided = await asyncio.wait_for(queue.get(), 5)
        return message, decided

    message, decided = asyncio.run(scenario())
    assert message["event"] == "requested" and message["approval"]["request"] == STATEMENT
    assert decided["event"] == "denied" and "no" in decided["reason"]
    rows = events(store, message["approval"]["approval_id"])
    assert [r["event"] for r in rows] == ["requested", "notified", "denied"]
    assert "1 watcher" in rows[1]["reason"]


# -- after an unclean stop ---------------------------------------------------------------------------------


def test_startup_sweep_records_undecided_approvals_as_cancelled_restart(store):
    t0 = dt.datetime.now(UTC) - dt.timedelta(seconds=30)
    for approval_id, evs in (("lost", ["requested", "notified"]), ("partial", ["requested", "approved_partial"]),
                             ("done", ["requested", "approved"]), ("window", ["approved"])):
        for ev in evs:
            store.submit("approval", {"approval_id": approval_id, "ts": t0, "event": ev, "identity": "ci-bot",
                                      "session_id": "s-old", "target": "pg-prod", "rule": "r"})
    store.flush()
    broker = ApprovalBroker(timeout_s=300, audit=store.submit)
    assert sorted(broker.record_orphans(store.query)) == ["lost", "partial"]
    for approval_id in ("lost", "partial"):
        last = events(store, approval_id)[-1]
        assert last["event"] == "cancelled_restart" and "did not shut down cleanly" in last["reason"]
        assert last["session_id"] == "s-old" and last["waited_ms"] >= 30_000
    assert [r["event"] for r in events(store, "done")] == ["requested", "approved"]
    assert broker.record_orphans(store.query) == []  # once recorded, never again


# -- audit schema v3 -------------------------------------------------------------------------------------


def test_schema_v3_adds_credential_stale_s_to_a_v2_file(tmp_path):
    path = tmp_path / "v2.duckdb"
    con = db.connect(path, read_only=False)
    for version in (1, 2):  # the tables exactly as schema version 2 left them
        for stmt in schema.MIGRATIONS[version][1]:
            con.execute(stmt)
        con.execute("INSERT INTO schema_version VALUES (?, now(), 'old')", [version])
    assert "credential_stale_s" not in {r[0] for r in con.execute("DESCRIBE session_starts").fetchall()}
    con.close()
    now = dt.datetime.now(UTC)
    with AuditStore(path, strict=True) as s:
        assert s.migrations == [(v - 1, v) for v in range(3, schema.SCHEMA_VERSION + 1)]  # from 2 to the latest
        s.submit("session_start", {"session_id": "fresh", "ts": now, "target": "db", "protocol": "postgres"})
        s.submit("session_start", {"session_id": "stale", "ts": now, "target": "db", "protocol": "postgres",
                                   "credential_stale_s": 42.5})
        for ev in ("approved_partial", "notify_failed"):  # the broker's events are accepted
            s.submit("approval", {"approval_id": "a1", "ts": now, "event": ev})
        s.flush()
        _, rows = s.query("SELECT session_id, credential_stale_s FROM sessions ORDER BY session_id")
        assert rows == [("fresh", None), ("stale", 42.5)]
        _, rows = s.query("SELECT event FROM approvals ORDER BY chain_seq")
        assert rows == [("approved_partial",), ("notify_failed",)]
    assert analytics.verify(path).clean
    with pytest.raises(analytics.AuditRecordError):
        schema.normalize(schema.KINDS["approval"], {"approval_id": "a", "ts": now, "event": "approved_maybe"})



# -- the runtime's wiring: process facts, operators mapped to the identity, config ----------------------

RUNTIME_CONFIG = """\
[appliance]
state_dir = "/tmp/bw-approvals-unused"

[approvals]
timeout_s = 120
approvers_required = 1

[[targets]]
name = "orders"
protocol = "postgres"
address = "127.0.0.1:5432"
authentication = "attestation"
[targets.credential]
source = "static"
username = "app"
password_file = "/nonexistent/orders.pw"

[[identities]]
name = "orders-bot"
operator_uids = [1001]
[identities.process]
uid = 1000

[[rules]]
name = "deletes-need-approval"
action = "approve"
[rules.sql]
kinds = ["DELETE"]
"""


def test_runtime_hold_carries_process_facts_and_excludes_the_mapped_operator(store):
    from types import SimpleNamespace

    from appliance.config import parse_config
    from appliance.fronts.services import ConnectionContext, Credential, SessionGrant
    from appliance.runtime import LiveSession, Runtime
    from probes import Attribution

    cfg = parse_config(RUNTIME_CONFIG, "bw.toml")
    runtime = Runtime(cfg, SimpleNamespace(audit=store))
    runtime.engine = PolicyEngine(cfg.policy, cfg.targets, cfg.identities)
    facts = Attribution(pid=4242, tgid=4242, uid=1000, gid=1000, cgroup_id=77, cgroup_path="/botwarden.bots/ci",
                        comm="psql", start_time_ns=1, exe_inode=2, exe_dev=3, exe_path="/usr/bin/psql",
                        original_dst=("10.0.0.5", 5432), source="ebpf")
    grant = SessionGrant("sess-1", "orders-bot", (), None, Credential("app", "pw"), {})
    runtime.live["sess-1"] = LiveSession(grant, "orders", ConnectionContext(("127.0.0.1", 40000), ("127.0.0.1", 6432),
                                                                            False, facts), dt.datetime.now(UTC))
    verdict = runtime.engine.decide_sql("orders-bot", (), "orders", "DELETE FROM t")
    assert verdict.action == "approve"

    async def scenario():
        task = asyncio.ensure_future(runtime.hold(grant, "orders", "DELETE FROM t", verdict, lambda _id: None,
                                                  request_id="req-1"))
        approval_id = await pending_id(runtime.approvals)
        listed = runtime.approvals.list()
        with pytest.raises(ApprovalError) as mapped:
            runtime.approvals.approve(approval_id, Operator("ci-owner", 1001))
        runtime.approvals.approve(approval_id, BOB)
        return listed, mapped.value, await task

    (item,), mapped, outcome = asyncio.run(scenario())
    assert item["process"] == {"pid": 4242, "uid": 1000, "gid": 1000, "exe": "/usr/bin/psql", "comm": "psql",
                               "cgroup": "/botwarden.bots/ci", "attribution": "ebpf", "client": "127.0.0.1:40000"}
    assert item["identity"] == "orders-bot" and item["rule"] == "deletes-need-approval"
    assert item["request_id"] == "req-1" and item["protocol"] == "postgres"
    assert mapped.status == 403 and outcome.approved and outcome.decided_by == "bob"


@pytest.mark.parametrize("setting, message", [
    ("timeout_s = 0", "approvals.timeout_s: must be greater than zero"),
    ("approvers_required = 0", "approvals.approvers_required: must be at least 1"),
    ('webhook_url = "file:///etc/shadow?token=s3cr3t"', "approvals.webhook_url: must be an http"),
])
def test_approval_settings_are_checked_at_start(setting, message):
    from appliance.config import parse_config
    from appliance.errors import ConfigError

    text = RUNTIME_CONFIG.replace("timeout_s = 120\napprovers_required = 1\n", setting + "\n")
    with pytest.raises(ConfigError) as err:
        parse_config(text, "bw.toml")
    assert message in str(err.value) and "s3cr3t" not in str(err.value)


def test_an_audit_record_that_cannot_be_submitted_is_counted_logged_once_and_raised(store, caplog):
    """Issue 13.5: an audit failure for a request cannot pass silently: the caller gets the error
    (the front refuses the request in strict mode), `status` counts it, the log says it once."""
    from types import SimpleNamespace

    from appliance.config import parse_config
    from appliance.runtime import Runtime

    runtime = Runtime(parse_config(RUNTIME_CONFIG, "bw.toml"), SimpleNamespace(audit=store))
    bad = {"request_id": "r1", "session_id": "s1", "ts": dt.datetime.now(UTC), "protocol": "postgresql",
           "kind": "query", "text": "SELECT 1", "decision": "allow", "not_a_field": 1}
    for _ in range(3):
        with pytest.raises(Exception, match="unknown fields"):
            runtime.audit("request", bad)
    assert runtime.status()["audit_record_failures"] == {"request": 3}
    assert sum("could not be submitted" in r.getMessage() for r in caplog.records) == 1
