"""How log lines look: today's text, or one JSON object per line (``--log-format json``).

Structured events pass their fields as ``extra`` (``log.info(..., extra={"event": ...,
"spiffe_id": ...})``). JSON lines always carry every key of ``STABLE_KEYS`` (null when
the line does not know it) plus ``message``, ``logger`` and ``process``; ``exception``
is added only to lines that carry a traceback. Free-text lines have the event ``log``.

Both formats pass what they write through ``redact`` (JSON: each text value; text: the
finished line): whatever a message or a traceback quotes, PEM blocks (keys, CSRs,
certificates) and JWTs never reach the log. meshca's own messages never quote them in
the first place; this is the net under a library's exception text.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from typing import Any

__all__ = [
    "FREE_TEXT_EVENT",
    "LOG_FORMATS",
    "STABLE_KEYS",
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "redact",
]

#: Keys every JSON line has, in this order; null when unknown.
STABLE_KEYS = (
    "time",
    "level",
    "event",
    "spiffe_id",
    "serial",
    "reason",
    "api",
    "peer",
    "duration_ms",
)
#: The fields a call may pass in ``extra`` (all of ``STABLE_KEYS`` the record does not set).
FIELDS = STABLE_KEYS[3:]
#: The event of a line logged without one.
FREE_TEXT_EVENT = "log"
LOG_FORMATS = ("text", "json")

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"

# A PEM block, whole or cut off, and anything shaped like a JWS (a base64url JSON header,
# "eyJ", then two more dot-separated parts).
_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]*-----.*?(?:-----END [A-Z0-9 ]*-----|\Z)", re.DOTALL)
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")


def redact(text: str) -> str:
    """``text`` with PEM blocks and JWTs replaced by ``[redacted ...]``; cheap when absent."""
    if "-----BEGIN" in text:
        text = _PEM.sub("[redacted PEM]", text)
    if "eyJ" in text:
        text = _JWT.sub("[redacted JWT]", text)
    return text


def _message(record: logging.LogRecord) -> str:
    """The record's message; a bad format string or argument never loses the line."""
    try:
        return record.getMessage()
    except Exception:
        return f"{record.msg!s} (unformattable arguments: {record.args!r})"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, ASCII only (no raw newline can split it)."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._second_text = ""

    def _time(self, created: float) -> str:
        # RFC 3339 in UTC with milliseconds; the seconds part is reused within a second.
        second = int(created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__
        line: dict[str, Any] = {
            "time": self._time(record.created),
            "level": record.levelname.lower(),
            "event": fields.get("event") or FREE_TEXT_EVENT,
        }
        for key in FIELDS:
            value = fields.get(key)
            line[key] = redact(value) if isinstance(value, str) else value
        line["message"] = redact(_message(record))
        line["logger"] = record.name
        line["process"] = record.processName
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = redact(record.exc_text)
        if record.stack_info:
            line["stack"] = redact(self.formatStack(record.stack_info))
        # Values are redacted one by one: a cut-off PEM block must not eat the JSON's end.
        return _encode(line)


def _fallback(value: object) -> str:
    # An ``extra`` value json cannot encode is logged as its (redacted) text.
    try:
        return redact(str(value))
    except Exception:
        return f"<unprintable {type(value).__name__}>"


# Built once: json.dumps with any option builds a new encoder on every call.
_encode = json.JSONEncoder(separators=(",", ":"), default=_fallback).encode


class TextFormatter(logging.Formatter):
    """Today's text lines; a structured event's fields follow as ``[event=... key=value]``."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.message = _message(record)
        fields = record.__dict__
        event = fields.get("event")
        if event:
            pairs = "".join(
                f" {key}={fields[key]}" for key in FIELDS if fields.get(key) is not None
            )
            record.message = f"{record.message} [event={event}{pairs}]"
        record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        return redact(text)


def configure_logging(level: str, log_format: str) -> None:
    """Log at ``level`` and above to stderr in ``log_format`` (``text`` or ``json``).

    Like ``logging.basicConfig``, this does nothing when the root logger already has a
    handler (a test runner's). With JSON, Python's warnings, uncaught exceptions (of any
    thread) and unraisable ones become log lines too, so that stderr holds nothing but
    JSON from Python; gRPC's C core still writes its own lines (``E1127 12:00:00...``).
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be text or json, not {log_format!r}")
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    if log_format == "json":
        logging.captureWarnings(True)
        _log_uncaught_exceptions()


def _log_uncaught_exceptions() -> None:
    log = logging.getLogger("meshca.uncaught")

    def uncaught(kind: type[BaseException], error: BaseException, tb: Any) -> None:
        log.critical("uncaught exception", exc_info=(kind, error, tb))

    def in_thread(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None:
            name = args.thread.name if args.thread else "?"
            exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
            log.critical("uncaught exception in thread %s", name, exc_info=exc_info)

    def unraisable(args: Any) -> None:
        where = args.err_msg or "Exception ignored in"
        exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
        log.warning("%s: %r", where, args.object, exc_info=exc_info)

    sys.excepthook = uncaught
    threading.excepthook = in_thread
    sys.unraisablehook = unraisable
