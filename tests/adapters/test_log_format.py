"""Log lines: JSON is one object per line with the stable keys; text keeps its look."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshca.adapters.event_log import EVENT_ISSUED, EVENT_JWT_ISSUED, EVENT_REFUSED, OutcomeLog
from meshca.adapters.log_format import (
    STABLE_KEYS,
    JsonFormatter,
    TextFormatter,
    configure_logging,
    redact,
)
from meshca.core.audit import AuditRecord, Outcome

PEM_KEY = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n"
    "-----END PRIVATE KEY-----"
)
JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2lnbmF0dXJlLWJ5dGVz"


def _record(
    msg: object = "hello %s",
    args: Any = ("world",),
    level: int = logging.INFO,
    extra: dict[str, Any] | None = None,
    exc_info: Any = None,
) -> logging.LogRecord:
    logger = logging.getLogger("meshca.test")
    return logger.makeRecord(
        "meshca.test", level, __file__, 1, msg, args, exc_info, extra=extra or None
    )


def _json_line(record: logging.LogRecord) -> dict[str, Any]:
    text = JsonFormatter().format(record)
    assert "\n" not in text and "\r" not in text
    assert text.isascii()
    parsed: dict[str, Any] = json.loads(text)
    return parsed


def test_free_text_line_has_every_stable_key_null_when_unknown() -> None:
    line = _json_line(_record())
    assert list(line)[: len(STABLE_KEYS)] == list(STABLE_KEYS)
    assert line["event"] == "log"
    assert line["level"] == "info"
    assert line["message"] == "hello world"
    assert line["logger"] == "meshca.test"
    assert line["process"] == "MainProcess"
    assert all(line[key] is None for key in STABLE_KEYS[3:])
    assert "exception" not in line


def test_time_is_rfc3339_utc_with_milliseconds() -> None:
    record = _record()
    record.created = datetime(2026, 3, 4, 5, 6, 7, 891_500, tzinfo=UTC).timestamp()
    assert _json_line(record)["time"] == "2026-03-04T05:06:07.891Z"
    # The cached second is not reused across seconds.
    formatter = JsonFormatter()
    for second in (7, 8):
        record.created = datetime(2026, 3, 4, 5, 6, second, 5000, tzinfo=UTC).timestamp()
        assert json.loads(formatter.format(record))["time"] == f"2026-03-04T05:06:0{second}.005Z"


def test_structured_fields_fill_their_keys() -> None:
    fields = {
        "event": "certificate-issued",
        "spiffe_id": "spiffe://example.org/ns/a/sa/b",
        "serial": "1f",
        "reason": "ok",
        "api": "meshca.v1.Sign",
        "peer": "ipv4:127.0.0.1:4242",
        "duration_ms": 1.5,
    }
    line = _json_line(_record("certificate issued", (), extra=fields))
    assert {key: line[key] for key in fields} == fields


def test_exception_is_inside_the_line() -> None:
    try:
        raise ValueError("first line\nsecond line")
    except ValueError:
        record = _record("failed", (), level=logging.ERROR, exc_info=sys.exc_info())
    line = _json_line(record)
    assert line["level"] == "error"
    assert "ValueError: first line\nsecond line" in line["exception"]


def test_a_bad_format_string_still_gives_a_line() -> None:
    line = _json_line(_record("count %d", ("not a number",)))
    assert "count %d" in line["message"] and "not a number" in line["message"]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(PEM_KEY, id="pem-key"),
        pytest.param(PEM_KEY[:60], id="pem-cut-off"),
        pytest.param(
            "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----",
            id="pem-csr",
        ),
        pytest.param(JWT, id="jwt"),
    ],
)
def test_pem_blocks_and_jwts_are_redacted_everywhere(text: str) -> None:
    try:
        raise RuntimeError(f"quoted {text}")
    except RuntimeError:
        record = _record(
            "got %s", (text,), extra={"reason": text, "event": "x"}, exc_info=sys.exc_info()
        )
    line = _json_line(record)
    assert "[redacted" in line["message"] and "[redacted" in line["exception"]
    assert "[redacted" in line["reason"]
    for part in ("BEGIN", "MIGHAgEA", "MIIB", "eyJhbGci", "c2lnbmF0dXJl"):
        assert part not in json.dumps(line)
    assert "MIGHAgEA" not in TextFormatter().format(record)
    assert "eyJhbGci" not in TextFormatter().format(record)


def test_redact_leaves_ordinary_text_alone() -> None:
    text = "serial 1f for spiffe://example.org/ns/a/sa/b: token has expired"
    assert redact(text) == text


def test_text_format_keeps_its_look_and_adds_fields() -> None:
    formatter = TextFormatter()
    plain = formatter.format(_record())
    assert plain.endswith(" INFO MainProcess meshca.test: hello world")
    event = formatter.format(
        _record(
            "request refused: %s",
            ("token has expired",),
            level=logging.WARNING,
            extra={"event": "request-refused", "reason": "token-expired", "api": "meshca.v1.Sign"},
        )
    )
    assert event.endswith(
        " WARNING MainProcess meshca.test: request refused: token has expired "
        "[event=request-refused reason=token-expired api=meshca.v1.Sign]"
    )


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


class _Opaque:
    def __str__(self) -> str:
        return "opaque\nthing"


@given(
    message=st.text(),
    args=st.lists(st.text() | st.integers() | st.binary(), max_size=3),
    extra=st.dictionaries(
        st.sampled_from(["event", *STABLE_KEYS[3:], "other"]),
        _json_values | st.builds(_Opaque) | st.binary(),
        max_size=5,
    ),
    level=st.sampled_from([logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR]),
)
def test_any_message_and_fields_give_one_line_of_json(
    message: str, args: list[object], extra: dict[str, Any], level: int
) -> None:
    line = _json_line(_record(message, tuple(args), level=level, extra=extra))
    assert set(STABLE_KEYS) <= set(line)
    assert line["level"] == logging.getLevelName(level).lower()
    text_line = TextFormatter().format(_record(message, tuple(args), level=level, extra=extra))
    assert isinstance(text_line, str)


@pytest.fixture
def events() -> Iterator[tuple[OutcomeLog, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("meshca.test.events")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield OutcomeLog(logger), stream
    finally:
        logger.removeHandler(handler)


NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_an_issued_certificate_is_one_info_event(events: tuple[OutcomeLog, io.StringIO]) -> None:
    observe, stream = events
    observe(
        AuditRecord(
            time=NOW,
            outcome=Outcome.ISSUED,
            api="istio.v1.auth.CreateCertificate",
            reason="ok",
            spiffe_id="spiffe://example.org/ns/a/sa/b",
            serial="abc",
            peer="ipv4:127.0.0.1:1",
            csr_sha256="00" * 32,
        ),
        timedelta(milliseconds=2.5),
    )
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["event"] == EVENT_ISSUED and line["level"] == "info"
    assert line["spiffe_id"] == "spiffe://example.org/ns/a/sa/b"
    assert (line["serial"], line["reason"], line["peer"]) == ("abc", "ok", "ipv4:127.0.0.1:1")
    assert line["api"] == "istio.v1.auth.CreateCertificate"
    assert line["duration_ms"] == 2.5


def test_an_issued_jwt_svid_is_its_own_event() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("meshca.test.jwt-events")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        OutcomeLog(logger, jwt_svids=True)(
            AuditRecord(
                time=NOW,
                outcome=Outcome.ISSUED,
                api="meshca.v1.SignJwtSvid",
                reason="ok",
                spiffe_id="spiffe://example.org/ns/a/sa/b",
                serial="41a2",
            ),
            timedelta(milliseconds=1),
        )
    finally:
        logger.removeHandler(handler)
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["event"] == EVENT_JWT_ISSUED and line["message"] == "JWT-SVID issued"
    assert line["serial"] == "41a2"


def test_a_refusal_is_a_warning_with_its_reason(events: tuple[OutcomeLog, io.StringIO]) -> None:
    observe, stream = events
    refused = AuditRecord(
        time=NOW,
        outcome=Outcome.REFUSED,
        api="meshca.v1.Sign",
        reason="token-expired",
        detail="token has expired",
    )
    observe(refused, timedelta(microseconds=100))
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert (line["event"], line["level"], line["reason"]) == (
        EVENT_REFUSED,
        "warning",
        "token-expired",
    )
    assert line["message"] == "request refused: token has expired"
    assert line["spiffe_id"] is None and line["serial"] is None


def test_warning_level_drops_issued_lines_and_keeps_refusals(
    events: tuple[OutcomeLog, io.StringIO],
) -> None:
    observe, stream = events
    logging.getLogger("meshca.test.events").setLevel(logging.WARNING)
    issued = AuditRecord(time=NOW, outcome=Outcome.ISSUED, api="a", reason="ok", serial="1")
    observe(issued, timedelta(0))
    assert stream.getvalue() == ""
    observe(AuditRecord(time=NOW, outcome=Outcome.REFUSED, api="a", reason="r"), timedelta(0))
    assert json.loads(stream.getvalue())["event"] == EVENT_REFUSED


def test_configure_logging_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="text or json"):
        configure_logging("info", "xml")
