"""The fleet lake for tests: a PostgreSQL 15 of its own as DuckLake's catalog (tests kill and
restart it) and a temporary shared data path."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from analytics.fleet import LakeSettings
from appliance.sandbox import PG_BIN, PostgresServer


@dataclass
class Lake:
    server: PostgresServer
    data_path: Path
    dbname: str

    @property
    def catalog(self) -> str:
        return self.server.dsn(db=self.dbname)

    def settings(self, bastion: str, **over) -> LakeSettings:
        return LakeSettings(catalog=self.catalog, data_path=str(self.data_path), bastion=bastion, **over)

    def toml(self, bastion: str, extra: str = "") -> str:
        return (f'\n[fleet]\ncatalog = "{self.catalog}"\ndata_path = "{self.data_path}"\n'
                f'bastion = "{bastion}"\ninterval = 0.2\n{extra}\n')

    def kill(self) -> None:
        """Stop the catalog's PostgreSQL at once (as a crash would)."""
        self.server._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.server.datadir), "-m", "immediate",
                                  "-w", "stop"])

    def restart(self) -> None:
        self.server._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.server.datadir), "-l",
                                  str(self.server._tmp / "log"), "-w", "-t", "30", "start"])


def new_lake(server: PostgresServer) -> Lake:
    """A fresh lake (its own catalog database, its own data path) on ``server``."""
    name = f"lake_{uuid.uuid4().hex[:8]}"
    server.psql(f"CREATE DATABASE {name}")
    data = Path(tempfile.mkdtemp(prefix="bw-lake-"))
    return Lake(server, data, name)


def remove_lake(lake: Lake) -> None:
    shutil.rmtree(lake.data_path, ignore_errors=True)
