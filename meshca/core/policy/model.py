"""Authorization policies as values: what the files say, what a request is, what was decided.

Everything here is frozen. A ``Policy`` is the compiled form of one document: its
selector says which destination workloads it applies to, its rules say which requests
it matches. ``AuthzRequest`` is what a proxy asks about; ``Decision`` is the answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from meshca.core.policy.match import Matcher, StringMatcher

__all__ = [
    "Action",
    "AuthzRequest",
    "Constraint",
    "Decision",
    "DecisionRecord",
    "Destination",
    "Explanation",
    "Policy",
    "PolicyProblem",
    "PolicyRef",
    "Reason",
    "Rule",
    "RuleStep",
    "Selector",
    "workload_of",
]


class Action(StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"


class Reason(StrEnum):
    """Why a decision came out as it did (recorded in the decision log)."""

    ALLOWED = "allowed-by-policy"
    DENIED = "denied-by-policy"
    NO_ALLOW_MATCH = "no-allow-match"
    DEFAULT_ALLOW = "default-allow"
    DEFAULT_DENY = "default-deny"
    AMBIGUOUS_PATH = "ambiguous-path"
    NO_DESTINATION = "no-destination"
    NOT_LOADED = "policy-set-not-loaded"


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    """Why a policy document cannot be loaded, and where: file, document (1-based), line."""

    file: str
    document: int | None
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.document is not None:
            where += f", document {self.document}"
        if self.line is not None:
            where += f", line {self.line}"
        field = f"{self.field}: " if self.field else ""
        return f"{where}: {field}{self.message}"


@dataclass(frozen=True, slots=True)
class PolicyRef:
    """Names a policy: ``namespace/name`` (or ``name``), and where it was written."""

    name: str
    namespace: str | None = None
    file: str = ""
    document: int = 0
    line: int = 0

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def __str__(self) -> str:
        return self.key


_WORKLOAD_PATH = re.compile(r"/ns/([^/]+)/sa/([^/]+)")


def workload_of(principal: str) -> tuple[str, str] | None:
    """``(namespace, service account)`` of ``spiffe://td/ns/<ns>/sa/<sa>``, else None."""
    if not principal.startswith("spiffe://"):
        return None
    slash = principal.find("/", 9)
    if slash == -1:
        return None
    match = _WORKLOAD_PATH.fullmatch(principal, slash)
    return (match.group(1), match.group(2)) if match else None


@dataclass(frozen=True, slots=True)
class Destination:
    """A destination workload as the index sees it: its SPIFFE ID, namespace and account."""

    principal: str
    namespace: str | None
    service_account: str | None

    @classmethod
    def of(cls, principal: str) -> Destination:
        workload = workload_of(principal)
        return cls(principal, *(workload or (None, None)))


@dataclass(frozen=True, slots=True)
class Selector:
    """Which destination workloads a policy applies to; a None field places no limit.

    All given fields must hold. ``namespaces`` and ``service_accounts`` are exact names
    taken from the destination's ``/ns/<ns>/sa/<sa>`` SPIFFE ID path; ``spiffe_ids`` are
    SPIFFE ID patterns.
    """

    namespaces: frozenset[str] | None = None
    service_accounts: frozenset[str] | None = None
    spiffe_ids: StringMatcher | None = None

    def matches(self, destination: Destination) -> bool:
        if self.namespaces is not None and destination.namespace not in self.namespaces:
            return False
        if (
            self.service_accounts is not None
            and destination.service_account not in self.service_accounts
        ):
            return False
        return self.spiffe_ids is None or self.spiffe_ids.test(destination.principal)

    @property
    def is_mesh_wide(self) -> bool:
        return self.namespaces is None and self.service_accounts is None and self.spiffe_ids is None

    def covers(self, other: Selector) -> bool:
        """True if every workload ``other`` selects is selected here (safe under-estimate)."""
        if self.namespaces is not None and (
            other.namespaces is None or not other.namespaces <= self.namespaces
        ):
            return False
        if self.service_accounts is not None and (
            other.service_accounts is None or not other.service_accounts <= self.service_accounts
        ):
            return False
        if self.spiffe_ids is not None:
            return other.spiffe_ids is not None and self.spiffe_ids.covers(other.spiffe_ids)
        return True

    def describe(self) -> str:
        parts = []
        if self.namespaces is not None:
            parts.append("namespaces " + ", ".join(sorted(self.namespaces)))
        if self.service_accounts is not None:
            parts.append("service accounts " + ", ".join(sorted(self.service_accounts)))
        if self.spiffe_ids is not None:
            parts.append("SPIFFE IDs " + ", ".join(self.spiffe_ids.written))
        return "; ".join(parts) or "every workload in the mesh"


@dataclass(frozen=True, slots=True)
class Constraint:
    """One field of a rule: the attribute must match ``values`` and not ``not_values``.

    ``field`` is where it was written (``from[0].source.principals``); ``attribute`` names
    the request attribute (see ``RequestView``).
    """

    field: str
    attribute: str
    values: Matcher | None = None
    not_values: Matcher | None = None
    not_field: str = ""


@dataclass(frozen=True, slots=True)
class Rule:
    """Matches when any source, any operation and every condition match (empty: any)."""

    index: int
    sources: tuple[tuple[Constraint, ...], ...] = ()
    operations: tuple[tuple[Constraint, ...], ...] = ()
    conditions: tuple[Constraint, ...] = ()

    @property
    def matches_everything(self) -> bool:
        return not (self.sources or self.operations or self.conditions)


@dataclass(frozen=True, slots=True)
class Policy:
    ref: PolicyRef
    action: Action
    selector: Selector
    rules: tuple[Rule, ...]
    #: "meshca" for meshca.io/v1, "istio" for security.istio.io documents.
    dialect: str = "meshca"


@dataclass(frozen=True, slots=True)
class AuthzRequest:
    """One request a proxy asks about. Absent attributes are None (or empty).

    ``path`` is the raw request target as the proxy saw it (it may carry a query);
    ``headers`` has lower-case names.
    """

    source_principal: str | None
    destination_principal: str | None
    method: str = ""
    path: str = "/"
    host: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    source_ip: str | None = None
    destination_ip: str | None = None
    destination_port: int | None = None
    sni: str | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer: allowed or not, why, which policy and rule, under which policy set."""

    allowed: bool
    reason: Reason
    version: str
    policy: PolicyRef | None = None
    rule: int | None = None
    audit: tuple[PolicyRef, ...] = ()
    detail: str = ""
    #: The normalized path the rules saw (None if it could not be normalized).
    path: str | None = None

    @property
    def decided_by(self) -> str:
        """The deciding policy (``ns/name``) or the rule of last resort that decided."""
        if self.policy is not None:
            return self.policy.key
        return self.reason.value


@dataclass(frozen=True, slots=True)
class RuleStep:
    """One rule (or a policy without rules) looked at while explaining a decision."""

    policy: PolicyRef
    action: Action
    rule: int | None
    matched: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Explanation:
    decision: Decision
    selected: tuple[PolicyRef, ...]
    steps: tuple[RuleStep, ...]

    def render(self) -> str:
        """Human-readable: the decision, the deciding rule or why nothing matched."""
        d = self.decision
        lines = [f"decision: {'ALLOW' if d.allowed else 'DENY'} ({d.reason.value})"]
        if d.policy is not None:
            where = f"{d.policy.file}:{d.policy.line}" if d.policy.file else ""
            lines.append(
                f"decided by: {d.policy.key} rule {d.rule if d.rule is not None else '-'}"
                + (f" ({where})" if where else "")
            )
        if d.detail:
            lines.append(f"why: {d.detail}")
        if d.path is not None:
            lines.append(f"normalized path: {d.path}")
        lines.append(f"policy set version: {d.version}")
        if d.audit:
            lines.append("audited by: " + ", ".join(p.key for p in d.audit))
        if self.selected:
            lines.append("policies selecting the destination:")
            for step in self.steps:
                rule = f"rule {step.rule}" if step.rule is not None else "(no rules)"
                mark = "MATCH" if step.matched else "no match"
                lines.append(
                    f"  {step.action.value:5} {step.policy.key} {rule}: {mark}"
                    + (f" - {step.detail}" if step.detail else "")
                )
        else:
            lines.append("no policy selects the destination")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One decision as the decision log keeps it: enough to replay it (``policy diff``).

    Only headers some policy refers to are kept, and never credentials
    (``authorization``, ``cookie``, ``proxy-authorization``).
    """

    time: datetime
    api: str
    allowed: bool
    reason: str
    version: str
    policy: str | None
    rule: int | None
    source_principal: str | None
    destination_principal: str | None
    method: str
    path: str
    host: str
    headers: Mapping[str, str]
    source_ip: str | None = None
    destination_ip: str | None = None
    destination_port: int | None = None
    sni: str | None = None
    request_id: str | None = None
    audit: tuple[str, ...] = ()
    detail: str = ""

    def request(self) -> AuthzRequest:
        """The request again, for replaying through another policy set."""
        return AuthzRequest(
            source_principal=self.source_principal,
            destination_principal=self.destination_principal,
            method=self.method,
            path=self.path,
            host=self.host,
            headers=dict(self.headers),
            source_ip=self.source_ip,
            destination_ip=self.destination_ip,
            destination_port=self.destination_port,
            sni=self.sni,
            request_id=self.request_id,
        )
