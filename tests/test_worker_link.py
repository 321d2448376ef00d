"""The supervisor–worker link (appliance.worker.Link) over a real socket pair: order, calls,
cancellation with its reason, and a closed link failing what waits on it."""

from __future__ import annotations

import asyncio
import socket

import pytest

from appliance.worker import LAZY_FLUSH_S, Link, LinkClosed, RemoteError, open_link


async def pair(methods_b=None, on_b=None, on_a=None):
    sa, sb = socket.socketpair()
    a = await open_link(sa, methods={}, on_message=on_a or (lambda m: None), peer="a's peer")
    b = await open_link(sb, methods=methods_b or {}, on_message=on_b or (lambda m: None), peer="b's peer")
    tasks = [asyncio.ensure_future(a.run()), asyncio.ensure_future(b.run())]
    return a, b, tasks


def test_lazy_messages_keep_their_order_with_calls_sent_after_them():
    async def main():
        seen: list = []

        async def echo(_call, value):
            seen.append(("call", value))
            return value * 2

        a, b, tasks = await pair({"echo": echo}, on_b=lambda m: seen.append(m))
        a.send(("audit", 1), lazy=True)
        a.send(("audit", 2), lazy=True)
        assert await a.call("echo", 21) == 42  # flushes the lazy ones first, in order
        a.send(("audit", 3), lazy=True)
        await asyncio.sleep(LAZY_FLUSH_S * 4)  # the lazy timer sends it without any later message
        assert seen == [("audit", 1), ("audit", 2), ("call", 21), ("audit", 3)]
        a.close()
        b.close()
        for t in tasks:
            t.cancel()

    asyncio.run(main())


def test_cancelling_a_call_cancels_the_remote_task_with_the_reason():
    async def main():
        reasons: list = []
        started = asyncio.Event()

        async def hold(_call):
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError as e:
                reasons.append(e.args[0] if e.args else None)
                raise

        a, b, tasks = await pair({"hold": hold})
        events: list = []
        waiting = asyncio.ensure_future(a.call("hold", on_event=events.append))
        await started.wait()
        waiting.cancel(msg="the client withdrew the request")
        with pytest.raises(asyncio.CancelledError):
            await waiting
        for _ in range(50):
            if reasons:
                break
            await asyncio.sleep(0.01)
        assert reasons == ["the client withdrew the request"]
        a.close()
        b.close()
        for t in tasks:
            t.cancel()

    asyncio.run(main())


def test_a_failing_call_raises_remote_error_and_a_dead_peer_fails_waiting_calls():
    async def main():
        async def boom(_call):
            raise ValueError("no such thing")

        async def forever(_call):
            await asyncio.Event().wait()

        a, b, tasks = await pair({"boom": boom, "forever": forever})
        with pytest.raises(RemoteError, match="ValueError: no such thing"):
            await a.call("boom")
        waiting = asyncio.ensure_future(a.call("forever"))
        await asyncio.sleep(0.05)
        b.close("gone")  # the peer's end closes: as when its process dies
        with pytest.raises(LinkClosed, match="a's peer closed its link"):
            await asyncio.wait_for(waiting, 5)
        with pytest.raises(LinkClosed):
            await a.call("boom")  # nothing is sent on a closed link
        for t in tasks:
            t.cancel()

    asyncio.run(main())


def test_a_flush_call_is_answered_behind_the_audit_rows_the_worker_has_not_sent(monkeypatch):
    """/v1/audit/flush with appliance.workers > 1 calls each worker's ``flush`` before flushing the
    store: the reply must reach the supervisor after every row the worker's StoreLink still holds
    (records go lazily), so the store has them when the supervisor flushes it."""
    from appliance import worker
    from appliance.worker import StoreLink
    from tests.test_audit_process import request

    monkeypatch.setattr(worker, "LAZY_FLUSH_S", 60.0)  # the lazy timer alone would not send them now

    async def main():
        frames: list = []

        async def flush(_call):  # as appliance.worker.WorkerHost._m_flush
            return True

        supervisor, in_worker, tasks = await pair({"flush": flush}, on_a=frames.append)
        store = StoreLink(in_worker)
        assert store.submit("request", request(1)) and store.submit("request", request(2))
        await asyncio.sleep(0.05)
        assert frames == []  # held in the worker
        assert await supervisor.call("flush") is True
        assert [(m[0], m[2]) for m in frames] == [("audit_frame", 2)]
        supervisor.close()
        in_worker.close()
        for t in tasks:
            t.cancel()

    asyncio.run(main())
