"""Log output: the usual text lines, or one JSON object per line (``[logging] format = "json"``).

JSON lines suit journald (each line is one entry) and log shippers. A line carries what the
text line carries — time, level, logger, pid, message, traceback — and nothing more: the
project's rule that no secret, token or unmasked value reaches a log message holds for both.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="microseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "thread": record.threadName,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def use_format(fmt: str) -> None:
    """Switch every handler of the root logger to ``fmt`` ("text" or "json"); Python warnings
    go through logging too, so nothing else writes free text among the JSON lines."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    for handler in root.handlers:
        handler.setFormatter(formatter(fmt))
    logging.captureWarnings(True)


__all__ = ["JsonFormatter", "TEXT_FORMAT", "formatter", "use_format"]
