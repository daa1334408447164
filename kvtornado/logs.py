"""Logging set-up for every entry point (SPEC §11): ``--log-format text`` (the default) or ``json``, one object
a line with ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message`` and, for a request, ``request_id``."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            doc["request_id"] = request_id
        if record.exc_info:  # a bug's traceback, kept inside the one line
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup(level: str, fmt: str) -> None:
    """Configure the root logger on stderr (replacing any handler set before)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))


def refuse(message: str) -> None:
    """A start-up refusal: the one line itself in text mode, a JSON object (level ERROR) in json mode."""
    root = logging.getLogger()
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        logging.getLogger("kvtornado.server").error("%s", message)
    else:
        print(message, file=sys.stderr)
