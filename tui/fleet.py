"""The Audit tab's fleet source: the lake queried in the operator's own process, as the operator.

The daemon does not serve fleet queries over its control socket, and the console never reads
the daemon's ``botwarden.toml``: a lake attached with the daemon's catalog connection string
would let any query read that string back (``duckdb_databases()``) or send statements to the
catalog server (``postgres_query``), handing the catalog's credentials to every member of the
control socket's group. Here the console attaches the lake itself, read-only, with the
operator's *own* connection string — ideally a catalog role that can only ``SELECT`` — from:

1. ``BOTWARDEN_FLEET_CATALOG`` and ``BOTWARDEN_FLEET_DATA_PATH`` in the environment, else
2. ``$XDG_CONFIG_HOME/botwarden/fleet.toml`` (default ``~/.config/botwarden/fleet.toml``) with
   ``catalog = "..."`` and ``data_path = "..."``: the operator's own file, which must not be
   readable by anyone else (mode 0600, like an SSH key) or it is refused.

What a query can see is then what the operator's own role can see; no secret of the
appliance is ever in this process. Errors never show a ``password=`` value.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analytics.fleet import FleetError, LakeSettings, redact_dsn

CATALOG_ENV = "BOTWARDEN_FLEET_CATALOG"
DATA_PATH_ENV = "BOTWARDEN_FLEET_DATA_PATH"
QUERY_TIMEOUT_S = 60.0


class FleetUnavailable(FleetError):
    """The operator has no usable fleet settings, or the lake cannot be reached (a message for the
    Audit tab; never a password)."""


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "botwarden" / "fleet.toml"


@dataclass(frozen=True)
class OperatorLake:
    """Where this operator's fleet settings came from, and the settings."""

    settings: LakeSettings
    source: str  # "environment" or the file's path

    @classmethod
    def find(cls, env: Mapping[str, str] | None = None) -> OperatorLake:
        """The operator's settings (environment first, then their own file); FleetUnavailable
        says what to set when there are none, or why the file is refused."""
        env = os.environ if env is None else env
        catalog, data_path = env.get(CATALOG_ENV, "").strip(), env.get(DATA_PATH_ENV, "").strip()
        if catalog or data_path:
            if not (catalog and data_path):
                missing = DATA_PATH_ENV if catalog else CATALOG_ENV
                raise FleetUnavailable(f"fleet: {missing} is not set (both {CATALOG_ENV} and {DATA_PATH_ENV} "
                                       "are needed)")
            return cls(_settings(catalog, data_path), "environment")
        path = config_path(env)
        raw = _read_private(path)
        if raw is None:
            raise FleetUnavailable(
                f"fleet: no lake configured for you. Set {CATALOG_ENV} (your own read-only catalog role's "
                f"connection string) and {DATA_PATH_ENV}, or write them as catalog = and data_path = in {path} "
                "(mode 0600). The daemon's configuration is never used (docs/fleet.md, \"The console on the fleet\").")
        catalog, data_path = raw.get("catalog"), raw.get("data_path")
        if not isinstance(catalog, str) or not catalog.strip() or not isinstance(data_path, str) \
                or not data_path.strip():
            raise FleetUnavailable(f"fleet: {path} needs catalog = \"...\" and data_path = \"...\" (strings)")
        return cls(_settings(catalog.strip(), data_path.strip()), str(path))

    def sql(self, sql: str, params: list[Any] | None = None) -> tuple[list[str], list[tuple]]:
        from analytics.fleet import run_sql

        return _lake_call(run_sql, self.settings, sql, params, timeout=QUERY_TIMEOUT_S)

    def report(self, name: str) -> tuple[list[str], list[tuple]]:
        from analytics.fleet import run_report

        return _lake_call(run_report, self.settings, name)


def _settings(catalog: str, data_path: str) -> LakeSettings:
    # The bastion name is what a shipper writes as; a reader writes nothing.
    return LakeSettings(catalog=catalog, data_path=data_path, bastion="console")


def _read_private(path: Path) -> dict[str, Any] | None:
    """The operator's file as TOML, None when it does not exist; refused when someone else owns
    it or can read or write it (it holds a connection string, maybe a password)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise FleetUnavailable(f"fleet: cannot open {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.getuid():
            raise FleetUnavailable(f"fleet: {path} is not yours (owner uid {st.st_uid}); it is not read")
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise FleetUnavailable(f"fleet: {path} is readable or writable by others (mode "
                                   f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it. It is not read")
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise FleetUnavailable(f"fleet: {path} is not valid TOML: {e}") from None


def _lake_call(fn: Any, *args: Any, **kw: Any) -> tuple[list[str], list[tuple]]:
    try:
        return fn(*args, **kw)
    except FleetError as e:
        raise FleetUnavailable(redact_dsn(str(e))) from None
    except Exception as e:  # a query error from DuckDB: shown in the tab, never a password
        raise FleetUnavailable(redact_dsn(f"{type(e).__name__}: {e}")) from None
