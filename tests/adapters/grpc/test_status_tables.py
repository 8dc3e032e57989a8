"""Each wire contract's error table: the same core errors, the codes its clients expect."""

from __future__ import annotations

import grpc
import pytest

from meshca.adapters.grpc.errors import LINKERD_STATUS_TABLE, STATUS_TABLE, status_for
from meshca.core import errors

CASES = [
    # error, meshca/Istio code, Linkerd code
    (errors.MalformedCsr("x"), "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
    (errors.WeakKey("x"), "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
    (errors.RequestTooLarge("x"), "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"),
    (errors.TooManyCalls("x"), "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"),
    (errors.AuthenticationFailed("x"), "UNAUTHENTICATED", "INVALID_ARGUMENT"),
    (errors.NotAuthorized("x"), "PERMISSION_DENIED", "FAILED_PRECONDITION"),
    (errors.AuthorityNotReady("x"), "UNAVAILABLE", "UNAVAILABLE"),
    (errors.BackendUnavailable("x"), "UNAVAILABLE", "UNAVAILABLE"),
    (errors.IssuedCertificateInvalid("x"), "INTERNAL", "INTERNAL"),
    (errors.UnsafeChange("x"), "INTERNAL", "INTERNAL"),
]


@pytest.mark.parametrize(("error", "ours", "linkerd"), CASES, ids=lambda v: type(v).__name__)
def test_codes_per_contract(error: errors.MeshcaError, ours: str, linkerd: str) -> None:
    assert status_for(error) == status_for(error, STATUS_TABLE) == getattr(grpc.StatusCode, ours)
    assert status_for(error, LINKERD_STATUS_TABLE) == getattr(grpc.StatusCode, linkerd)


def test_the_tables_cover_the_same_errors() -> None:
    assert [kind for kind, _ in STATUS_TABLE] == [kind for kind, _ in LINKERD_STATUS_TABLE]
