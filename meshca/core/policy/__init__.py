"""Authorization policies: the model, path normalization, the index, evaluation and lint.

Pure: policies arrive as plain mappings (see ``schema``) and requests as values; decisions
leave as values. Files, YAML, gRPC and storage are the adapters' business.
"""

from __future__ import annotations

from meshca.core.policy.evaluate import NOT_LOADED_VERSION, evaluate, explain, headers_for_record
from meshca.core.policy.index import PolicySet, Targets
from meshca.core.policy.model import (
    Action,
    AuthzRequest,
    Decision,
    DecisionRecord,
    Explanation,
    Policy,
    PolicyProblem,
    PolicyRef,
    Reason,
    Rule,
    RuleStep,
    Selector,
)
from meshca.core.policy.paths import normalize_path
from meshca.core.policy.schema import PolicyFieldError, parse_policy

__all__ = [
    "NOT_LOADED_VERSION",
    "Action",
    "AuthzRequest",
    "Decision",
    "DecisionRecord",
    "Explanation",
    "Policy",
    "PolicyFieldError",
    "PolicyProblem",
    "PolicyRef",
    "PolicySet",
    "Reason",
    "Rule",
    "RuleStep",
    "Selector",
    "Targets",
    "evaluate",
    "explain",
    "headers_for_record",
    "normalize_path",
    "parse_policy",
]
