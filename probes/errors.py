"""Errors raised by the probes package.

``probes`` may not import ``appliance``, so its root error is its own; the
appliance wraps it (``raise BotwardenError(...) from e``) where it calls in.
"""

from __future__ import annotations


class ProbeError(Exception):
    """Root of every error the probes package raises on purpose."""


class ProbeUnavailable(ProbeError):
    """The requested redirect path cannot be used on this host; the message says why."""
