"""Decision tables: requests with the decision a policy author expects for each.

The table (``meshca policy test DIR --cases FILE``) is a mapping with ``cases`` (and an
optional ``defaults`` mapping merged into every case), or a bare list of cases::

    defaults:
      to: spiffe://cluster.local/ns/shop/sa/backend
    cases:
      - name: the frontend reads products
        from: spiffe://cluster.local/ns/shop/sa/frontend
        method: GET
        path: /api/products
        expect: ALLOW
        policy: shop/frontend-to-backend     # optional: the deciding policy
      - name: nobody reaches /admin
        from: spiffe://cluster.local/ns/shop/sa/frontend
        path: /admin
        expect: DENY
        reason: denied-by-policy             # optional: the decision's reason

Request fields: ``from``, ``to``, ``method`` (default GET), ``path`` (default /),
``host``, ``port``, ``headers``, ``sourceIp``, ``destinationIp``, ``sni``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshca.core.policy.evaluate import evaluate
from meshca.core.policy.index import PolicySet
from meshca.core.policy.model import AuthzRequest, Decision, Reason
from meshca.core.policy.schema import PolicyFieldError

__all__ = ["CaseResult", "PolicyCase", "parse_cases", "run_case"]

_FIELDS = frozenset(
    {
        "name",
        "from",
        "to",
        "method",
        "path",
        "host",
        "port",
        "headers",
        "sourceIp",
        "destinationIp",
        "sni",
        "expect",
        "policy",
        "reason",
    }
)


@dataclass(frozen=True, slots=True)
class PolicyCase:
    name: str
    request: AuthzRequest
    expect_allowed: bool
    expect_policy: str | None
    expect_reason: str | None
    field: str


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: PolicyCase
    decision: Decision
    passed: bool
    message: str


def _optional_text(case: Mapping[str, Any], key: str, field: str) -> str | None:
    if key not in case or case[key] is None:
        return None
    value = case[key]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise PolicyFieldError(f"{field}.{key}", "expected text")
    return str(value)


def _case(value: object, field: str, defaults: Mapping[str, Any]) -> PolicyCase:
    if not isinstance(value, dict):
        raise PolicyFieldError(field, "a case is a mapping")
    case = {**defaults, **value}
    for key in case:
        if key not in _FIELDS:
            raise PolicyFieldError(
                f"{field}.{key}", f"unknown field (allowed: {', '.join(sorted(_FIELDS))})"
            )
    expect = _optional_text(case, "expect", field)
    if expect is None or expect.upper() not in ("ALLOW", "DENY"):
        raise PolicyFieldError(f"{field}.expect", "required: ALLOW or DENY")
    port = case.get("port")
    if port is not None and (
        isinstance(port, bool) or not str(port).isdigit() or not 0 < int(port) < 65536
    ):
        raise PolicyFieldError(f"{field}.port", f"{port!r} is not a port number")
    headers = case.get("headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(v, str | int) and not isinstance(v, bool) for v in headers.values()
    ):
        raise PolicyFieldError(f"{field}.headers", "expected a mapping of header: text")
    reason = _optional_text(case, "reason", field)
    if reason is not None and reason not in {r.value for r in Reason}:
        raise PolicyFieldError(
            f"{field}.reason",
            f"{reason!r} is not a reason ({', '.join(r.value for r in Reason)})",
        )
    request = AuthzRequest(
        source_principal=_optional_text(case, "from", field),
        destination_principal=_optional_text(case, "to", field),
        method=_optional_text(case, "method", field) or "GET",
        path=_optional_text(case, "path", field) or "/",
        host=_optional_text(case, "host", field) or "",
        headers={str(k).lower(): str(v) for k, v in headers.items()},
        source_ip=_optional_text(case, "sourceIp", field),
        destination_ip=_optional_text(case, "destinationIp", field),
        destination_port=int(port) if port is not None else None,
        sni=_optional_text(case, "sni", field),
    )
    name = _optional_text(case, "name", field) or field
    return PolicyCase(
        name=name,
        request=request,
        expect_allowed=expect.upper() == "ALLOW",
        expect_policy=_optional_text(case, "policy", field),
        expect_reason=reason,
        field=field,
    )


def parse_cases(document: object) -> list[PolicyCase]:
    """The cases of one table document; raises ``PolicyFieldError`` naming the field."""
    defaults: Mapping[str, Any] = {}
    if isinstance(document, dict):
        unknown = set(document) - {"cases", "defaults"}
        if unknown:
            raise PolicyFieldError(sorted(unknown)[0], "unknown field (allowed: cases, defaults)")
        raw_defaults = document.get("defaults") or {}
        if not isinstance(raw_defaults, dict):
            raise PolicyFieldError("defaults", "expected a mapping")
        defaults = raw_defaults
        items = document.get("cases")
        prefix = "cases"
    else:
        items = document
        prefix = ""
    if not isinstance(items, list) or not items:
        raise PolicyFieldError(prefix, "expected a non-empty list of cases")
    return [_case(item, f"{prefix}[{i}]", defaults) for i, item in enumerate(items)]


def run_case(policy_set: PolicySet, case: PolicyCase, *, default_allow: bool) -> CaseResult:
    decision = evaluate(policy_set, case.request, default_allow=default_allow)
    problems = []
    if decision.allowed != case.expect_allowed:
        problems.append(
            f"expected {'ALLOW' if case.expect_allowed else 'DENY'}, "
            f"got {'ALLOW' if decision.allowed else 'DENY'}"
        )
    if case.expect_policy is not None and decision.decided_by != case.expect_policy:
        problems.append(f"expected policy {case.expect_policy}, decided by {decision.decided_by}")
    if case.expect_reason is not None and decision.reason.value != case.expect_reason:
        problems.append(f"expected reason {case.expect_reason}, got {decision.reason.value}")
    return CaseResult(case, decision, not problems, "; ".join(problems))
