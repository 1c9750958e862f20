"""Logging set-up for the CLI: text (default) or ``--log-format json`` for the daemons.

``JsonFormatter`` writes one JSON object per line: ``time`` (ISO 8601, UTC, milliseconds),
``level``, ``logger``, ``message`` (the %-formatted text), ``exc`` (a formatted traceback, if
any) and every extra field passed as ``log.info(..., extra={...})`` (values that JSON cannot
hold are written as their ``repr``). The standard library has no JSON formatter; this is the
whole of ours.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

__all__ = ["FORMATS", "JsonFormatter", "setup"]

FORMATS = ("text", "json")
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        return json.dumps(out, default=repr, ensure_ascii=False)


def setup(level: int, fmt: str = "text") -> None:
    """Configure the root logger once (what ``logging.basicConfig`` does), in ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT))
    logging.basicConfig(level=level, handlers=[handler])
