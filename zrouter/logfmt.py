"""Log output for the broker and the worker: ``--log-format text`` (the default) or ``json``.

JSON lines are one object per line with stable keys, for log shippers (Loki, Elasticsearch,
CloudWatch) to index without parsing prose::

    {"ts": "2026-11-30T14:42:07.123Z", "level": "info", "logger": "zrouter.broker",
     "event": "worker echo-a joined service 'echo' (capacity 8, weight 1)",
     "service": "echo", "instance": "echo-a"}

- ``ts``: UTC, RFC 3339 with milliseconds; ``level``: lower case; ``event``: the message;
  ``logger``: the logger's name. Always present.
- ``service``, ``instance``, ``rid``: where relevant, from (in order of precedence) the log
  call's ``extra=``, the ``context()`` hook (the worker's: the request a handler is serving), and
  the process-wide ``static`` fields (a worker's own service and instance).
- ``exc``: the formatted traceback, when the call logged one.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, Final

__all__ = ["FORMATS", "JsonFormatter", "TEXT_FORMAT", "configure_logging"]

FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS: Final = ("service", "instance", "rid")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring). ``static`` may be changed later
    (a worker learns its instance id after logging is set up)."""

    def __init__(
        self,
        static: Mapping[str, Any] | None = None,
        context: Callable[[], Mapping[str, Any] | None] | None = None,
    ) -> None:
        super().__init__()
        self.static: dict[str, Any] = dict(static or {})
        self.context = context

    def format(self, record: logging.LogRecord) -> str:
        ms = int(record.msecs)
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{ms:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        ctx = self.context() if self.context is not None else None
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is None and ctx:
                value = ctx.get(key)
            if value is None:
                value = self.static.get(key)
            if value is not None:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps(doc, ensure_ascii=False, default=str)


def configure_logging(
    level: str | int = "INFO",
    fmt: str = "text",
    *,
    static: Mapping[str, Any] | None = None,
    context: Callable[[], Mapping[str, Any] | None] | None = None,
    stream: IO[str] | None = None,
) -> JsonFormatter | None:
    """Set up the root logger for a command (replacing its handlers); returns the JSON formatter
    (to add ``static`` fields later), or None for text. ValueError for an unknown ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter: JsonFormatter | None = None
    if fmt == "json":
        formatter = JsonFormatter(static, context)
        handler.setFormatter(formatter)
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return formatter
