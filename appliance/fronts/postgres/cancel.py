"""Cancel keys: the bot gets our secret for the backend, and its CancelRequest is mapped back."""

from __future__ import annotations

import asyncio
import logging
import os
import struct

from appliance.protocols.postgres import messages as m


log = logging.getLogger(__name__)


class CancelForwarding:
    """The front's side: a CancelRequest forwarded to the upstream that owns the key."""

    async def cancel(self, req: m.CancelRequest) -> None:
        """Forward a bot's CancelRequest to the upstream that owns (pid, our secret)."""
        found = self.cancel_keys.get((req.pid, req.secret))
        if found is None:
            forward = getattr(self.services, "forward_cancel", None)
            if forward is not None:  # appliance.workers > 1: the key may be another worker's
                await forward(req)
                return
            log.info("cancel request for an unknown key ignored (pid %s)", req.pid)
            return
        for session in list(self.sessions):
            if session.cancel_key == (req.pid, req.secret) and (session.withdraw_hold() or session.withdraw_paced()):
                if not session.busy_upstream:
                    # The held (or paced) statement never reached the server; a cancel forwarded
                    # now could hit the bot's next statement instead.
                    return
        await self.cancel_upstream(req.pid, *found)

    async def cancel_upstream(self, pid: int, secret: int, host: str, port: int) -> None:
        """Deliver the cancel and return only once the server has closed its end: PostgreSQL
        closes a CancelRequest connection after it has signalled the backend, and clients
        (asyncpg's timeouts) wait for that close before sending their next statement. The
        bot's own cancel connection is closed after this returns, keeping that order."""
        writer = None
        try:
            opened = (asyncio.open_unix_connection(host) if self.settings.upstream_unix
                      else asyncio.open_connection(host, port))
            reader, writer = await asyncio.wait_for(opened, self.settings.connect_timeout)
            writer.write(m.CancelRequest(pid, secret).encode())
            await writer.drain()
            await asyncio.wait_for(reader.read(), self.settings.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            log.warning("could not forward a cancel request to %s:%s: %s", host, port, e)
        finally:
            if writer is not None:
                writer.close()


class CancelKeyMixin:
    """The session's side: BackendKeyData with our own secret (part of :class:`Session`)."""

    def _remap_key(self, pid: int, secret: int) -> bytes:
        """BackendKeyData with the real pid and our own secret (the real one stays here)."""
        ours = struct.unpack("!i", os.urandom(4))[0]
        if self.cancel_key is not None:
            self.front.cancel_keys.pop(self.cancel_key, None)
        self.cancel_key = (pid, ours)
        self.backend_pid = pid
        self.front.cancel_keys[self.cancel_key] = (secret, self.settings.upstream_host, self.settings.upstream_port)
        return m.BackendKeyData(pid, ours).encode()

    def _on_backend_key(self, buf, s, e):
        msg = m.BackendKeyData.decode(bytes(buf[s + 5:e]))
        return self._remap_key(msg.pid, msg.secret)
