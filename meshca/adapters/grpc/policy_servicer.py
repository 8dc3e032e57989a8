"""``meshca.v1.PolicyService``: Check, Explain and Status over the authorization service.

Every call is first checked by the ``CallerGuard`` (policy admins only): the policy set
is never revealed to anyone else, not even in an error.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from google.protobuf import timestamp_pb2

from meshca.adapters.grpc._gen.meshca.v1 import policy_pb2, policy_pb2_grpc
from meshca.adapters.grpc.errors import error_mapped
from meshca.adapters.grpc.gate import CallGate
from meshca.adapters.grpc.guard import admit
from meshca.core.policy import AuthzRequest, Decision, PolicyRef
from meshca.service.access import CallerGuard
from meshca.service.authz import AuthorizationService

__all__ = ["API_NAME", "SERVICE_NAME", "PolicyServicer", "add_to_server", "decision_to_proto"]

API_NAME = "meshca.v1.PolicyService"
SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name
_CHECK, _EXPLAIN, _STATUS = (f"{SERVICE_NAME}/{m}" for m in ("Check", "Explain", "Status"))


def _ref(ref: PolicyRef | None) -> Any:
    if ref is None:
        return None
    return policy_pb2.PolicyRef(
        namespace=ref.namespace or "", name=ref.name, file=ref.file, line=ref.line
    )


def decision_to_proto(decision: Decision) -> Any:
    return policy_pb2.PolicyDecision(
        allowed=decision.allowed,
        reason=decision.reason.value,
        policy=_ref(decision.policy),
        rule=decision.rule if decision.rule is not None else -1,
        version=decision.version,
        audit=[_ref(p) for p in decision.audit],
        detail=decision.detail,
        normalized_path=decision.path or "",
    )


def _request(message: Any) -> AuthzRequest:
    return AuthzRequest(
        source_principal=message.source_principal or None,
        destination_principal=message.destination_principal or None,
        method=message.method,
        path=message.path or "/",
        host=message.host,
        headers={k.lower(): v for k, v in message.headers.items()},
        source_ip=message.source_ip or None,
        destination_ip=message.destination_ip or None,
        destination_port=message.destination_port or None,
        sni=message.sni or None,
    )


def _timestamp(value: datetime | None) -> Any:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    """``record_counters`` gives the decision log's (failed, dropped) counts, if any."""

    def __init__(
        self,
        authz: AuthorizationService,
        guard: CallerGuard,
        record_counters: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self._authz = authz
        self._guard = guard
        self._record_counters = record_counters

    async def Check(self, request: Any, context: Any) -> Any:
        await admit(self._guard, _CHECK, context)
        return decision_to_proto(self._authz.check(_request(request), api=API_NAME))

    async def Explain(self, request: Any, context: Any) -> Any:
        await admit(self._guard, _EXPLAIN, context)
        explanation = self._authz.explain(_request(request))
        return policy_pb2.PolicyExplanation(
            decision=decision_to_proto(explanation.decision),
            selected=[_ref(p) for p in explanation.selected],
            steps=[
                policy_pb2.RuleStep(
                    policy=_ref(step.policy),
                    action=step.action.value,
                    rule=step.rule if step.rule is not None else -1,
                    matched=step.matched,
                    detail=step.detail,
                )
                for step in explanation.steps
            ],
            text=explanation.render(),
        )

    async def Status(self, request: Any, context: Any) -> Any:
        await admit(self._guard, _STATUS, context)
        status = self._authz.status()
        failed, dropped = self._record_counters() if self._record_counters else (0, 0)
        return policy_pb2.PolicyStatus(
            version=status.version or "",
            policies=status.policies,
            loaded_at=_timestamp(status.loaded_at),
            last_attempt_at=_timestamp(status.last_attempt_at),
            healthy=status.healthy,
            last_error=status.last_error or "",
            reloads=status.reloads,
            reload_failures=status.reload_failures,
            allowed=status.allowed,
            denied=status.denied,
            records_failed=failed,
            records_dropped=dropped,
        )


def add_to_server(
    authz: AuthorizationService,
    guard: CallerGuard,
    server: Any,
    record_counters: Callable[[], tuple[int, int]] | None = None,
    gate: CallGate | None = None,
) -> None:
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(
        error_mapped(PolicyServicer(authz, guard, record_counters), gate), server
    )
