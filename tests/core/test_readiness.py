"""Readiness verdicts from probe results, and the signature probe over real keys."""

from __future__ import annotations

from dataclasses import replace

import pytest

from meshca.core.errors import InternalError
from meshca.core.readiness import ProbeResults, Readiness, assess, probe_signature
from tests.core.builders import build_pki, signer_key

OK = ProbeResults(signing=None, database=None, writer=None, write_failures=3)
READY = Readiness(None, write_failures=3)


@pytest.mark.parametrize(
    ("previous", "probes", "problem"),
    [
        pytest.param(READY, OK, None, id="ok/all-probes-pass"),
        pytest.param(Readiness("not checked yet", 3), OK, None, id="ok/first-round-after-start"),
        pytest.param(Readiness("database: down", 3), OK, None, id="ok/recovers-without-restart"),
        pytest.param(
            Readiness("record writer: records were not committed since the last check", 3),
            OK,
            None,
            id="ok/old-write-failures-count-once",
        ),
        pytest.param(
            READY,
            replace(OK, signing="no active intermediate CA"),
            "cannot sign: no active intermediate CA",
            id="fail/no-issuer",
        ),
        pytest.param(
            READY,
            replace(OK, database="OperationalError: connection refused"),
            "database: OperationalError: connection refused",
            id="fail/database-down",
        ),
        pytest.param(
            READY,
            replace(OK, writer="the host's record writer is gone"),
            "record writer: the host's record writer is gone",
            id="fail/writer-gone",
        ),
        pytest.param(
            READY,
            replace(OK, write_failures=4),
            "record writer: records were not committed since the last check",
            id="fail/write-failed-since-last-round",
        ),
        pytest.param(
            READY,
            replace(OK, signing="no answer within 5s", database="down", write_failures=9),
            "cannot sign: no answer within 5s; database: down; "
            "record writer: records were not committed since the last check",
            id="fail/every-problem-is-named",
        ),
    ],
)
def test_assess(previous: Readiness, probes: ProbeResults, problem: str | None) -> None:
    verdict = assess(previous, probes)
    assert verdict.problem == problem
    assert verdict.ready is (problem is None)
    assert verdict.write_failures == probes.write_failures


@pytest.mark.parametrize("kind", ["ec-p256", "ec-p384", "rsa-2048", "ed25519"])
def test_probe_signature_signs_with_every_issuer_key_kind(kind: str) -> None:
    probe_signature(build_pki(intermediate_kind=kind).authority, b"probe")


def test_probe_signature_fails_when_the_key_is_not_the_certificates() -> None:
    authority = build_pki().authority
    other = replace(authority, signer=signer_key("ec-p256", 7))
    with pytest.raises(InternalError, match="does not match its certificate"):
        probe_signature(other, b"probe")


def test_probe_signature_fails_when_the_key_kinds_differ() -> None:
    authority = build_pki().authority
    other = replace(authority, signer=signer_key("ed25519", 7))
    with pytest.raises(InternalError, match="not of its certificate's key type"):
        probe_signature(other, b"probe")
