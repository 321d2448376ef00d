"""botwarden probes: send bots' connections to the inspector and say who made them.

Public API (the appliance uses only these; probes never imports appliance):

- ``ProbeSettings`` / ``Target`` / ``Passthrough`` — frozen settings.
- ``attach(settings) -> ProbeHandle``; ``detach(settings)``; ``status(settings) -> ProbeStatus``.
- ``ProbeHandle.poll_events(callback, timeout_ms)`` / ``.events()`` → ``ProbeEvent``
  (``.as_record()`` is a contract §1 ``probe`` record); ``ProbeHandle.lookup(sock)``.
- ``lookup(sock) -> Attribution | None`` (contract §2), from any process.
- ``peer_uid(sock) -> int | None``: the uid owning a local client's socket (sock_diag).
- ``render_program(settings)`` — the BPF C and cflags, without loading (no root).
- ``probes.cgroups`` — bots' cgroups: ``bot_cgroup``, ``spawn``, ``exec_in``, ``run_bot``.
- ``ProbeError`` (root), ``ProbeUnavailable``.
"""

from probes.attribution import Attribution, lookup, peer_uid
from probes.errors import ProbeError, ProbeUnavailable
from probes.lifecycle import DetachResult, ProbeEvent, ProbeHandle, ProbeStatus, attach, detach, status
from probes.loader import RenderedProgram, render_program
from probes.settings import Passthrough, ProbeSettings, Target, UnixTarget

__all__ = [
    "Attribution",
    "DetachResult",
    "Passthrough",
    "ProbeError",
    "ProbeEvent",
    "ProbeHandle",
    "ProbeSettings",
    "ProbeStatus",
    "ProbeUnavailable",
    "RenderedProgram",
    "Target",
    "UnixTarget",
    "attach",
    "detach",
    "lookup",
    "peer_uid",
    "render_program",
    "status",
]
