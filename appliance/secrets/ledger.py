"""The leases botwarden has not revoked yet, kept on disk so that no failure forgets them.

A dynamic database user lives until its lease is revoked. If the daemon is killed (kill -9,
power loss) or Vault cannot be reached when a session ends, the lease would only end at its
TTL. ``<state_dir>/leases.json`` lists every lease botwarden holds and has not yet revoked:
written before the credential is used, removed once Vault confirms the revocation, and read
at start-up to revoke what the last run left behind (issue 26.3).

It holds lease ids only, never a credential: a lease id lets botwarden (with its own Vault
token) renew or revoke the lease, nothing more. Written atomically (a temporary file in the
same directory, fsync, rename), mode 0600.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from appliance.errors import BotwardenError

log = logging.getLogger(__name__)

FILE_NAME = "leases.json"


class LeaseLedger:
    """A durable set of lease ids. Blocking (file I/O): call it from a worker thread."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._ids: dict[str, None] = dict.fromkeys(self._read())

    @classmethod
    def in_state_dir(cls, state_dir: str | Path) -> "LeaseLedger":
        return cls(Path(state_dir) / FILE_NAME)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._ids)

    def add(self, lease_id: str) -> None:
        with self._lock:
            if lease_id in self._ids:
                return
            self._ids[lease_id] = None
            self._write()

    def remove(self, *lease_ids: str) -> None:
        with self._lock:
            gone = [lid for lid in lease_ids if lid in self._ids]
            if not gone:
                return
            for lid in gone:
                del self._ids[lid]
            self._write()

    def _read(self) -> list[str]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise BotwardenError(f"cannot read the lease ledger {self.path}: {e.strerror}") from None
        try:
            doc = json.loads(text)
            leases = doc["leases"]
            if not isinstance(leases, list) or not all(isinstance(x, str) for x in leases):
                raise ValueError("leases must be a list of strings")
        except (ValueError, KeyError, TypeError) as e:
            # Refusing to start would keep every orphan alive; say so loudly and start empty.
            log.error("lease ledger %s is not valid (%s); leases it listed end at their TTL", self.path, e)
            return []
        return leases

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        data = json.dumps({"leases": list(self._ids)}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power loss
        finally:
            os.close(dir_fd)
