"""Structured logging for the worker: one line per happening, key=value or JSON, never a payload or token."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({})))
#: The engine's one logger: every line of the worker carries this name (in JSON, "logger").
log = logging.getLogger("fp_outbox.worker")


def event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log `message` with structured fields (ids, counts, reasons), never event bodies."""
    logger.log(level, message, extra={"fields": fields})


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"ts={time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(record.created))}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"msg={_quote(record.getMessage())}",
        ]
        parts += [f"{key}={_quote(value)}" for key, value in getattr(record, "fields", {}).items()]
        if record.exc_info:
            parts.append(f"exc={_quote(_exception(record))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {"ts": record.created, "level": record.levelname.lower(), "logger": record.name,
                "msg": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            data["exc"] = _exception(record)
        return json.dumps(data, default=str)


def _exception(record: logging.LogRecord) -> str:
    """An exception a library logs, as its class and first line: a traceback of a database error would
    carry statements (and, unless hidden, their parameters) into the journal."""
    exc = record.exc_info[1]
    return f"{exc.__class__.__name__}: {first_line(exc)}" if exc else ""


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (driver errors run on for lines), or its class name."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__


def configure(log_format: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # urllib3 would log every retry with the URL; our own lines say what matters.
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def _quote(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\n'):
        return text
    return json.dumps(text)
