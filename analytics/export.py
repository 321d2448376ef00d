"""Parquet export, hive-partitioned by day: ``<out>/table=<t>/day=YYYY-MM-DD/part-0.parquet``.

Rows are read through DuckDB into Arrow and written with pyarrow (the database has
external file access disabled, so DuckDB's own COPY is not used). Days are UTC.
Exporting a day again replaces that day's file, so a periodic export of
``since=yesterday`` is idempotent. Read back with
``read_parquet('<out>/table=requests/*/*.parquet', hive_partitioning = 1)``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from . import db

log = logging.getLogger(__name__)

_BATCH_ROWS = 100_000


def export_parquet(path_or_store: Any, since: dt.date, out_dir: str | Path) -> list[Path]:
    """Export every chained table's rows with ``ts`` on or after ``since`` (UTC day)."""
    out = Path(out_dir)
    start = dt.datetime.combine(since, dt.time(), tzinfo=dt.timezone.utc)
    written: list[Path] = []
    with db.reader(path_or_store) as con:
        for table in db.existing_tables(con):
            days = [r[0] for r in con.execute(
                f"SELECT DISTINCT CAST(ts AS DATE) AS d FROM {table} WHERE ts >= ? ORDER BY d", [start]
            ).fetchall()]
            for day in days:
                lo = dt.datetime.combine(day, dt.time(), tzinfo=dt.timezone.utc)
                hi = lo + dt.timedelta(days=1)
                target = out / f"table={table}" / f"day={day.isoformat()}" / "part-0.parquet"
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".part-0.parquet.{os.getpid()}.tmp")
                reader = con.execute(
                    f"SELECT * FROM {table} WHERE ts >= ? AND ts < ? ORDER BY chain_seq", [lo, hi],
                ).fetch_record_batch(_BATCH_ROWS)
                with pq.ParquetWriter(tmp, reader.schema, compression="zstd") as w:
                    for batch in reader:
                        w.write_batch(batch)
                os.replace(tmp, target)
                written.append(target)
    log.info("exported %d Parquet files to %s", len(written), out)
    return written
