"""Recording a refusal and telling the outcome observers: the same steps for every door.

The caller already gets its refusal, so neither step may raise: a record that cannot be
committed is logged loudly, and a failing observer (a log line, a metric) is logged.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from meshca.core.audit import AuditRecord
from meshca.core.errors import MeshcaError
from meshca.core.ports import AuditLog, OutcomeObserver

__all__ = ["observe", "record_refusal"]

log = logging.getLogger(__name__)


async def record_refusal(audit: AuditLog, record: AuditRecord) -> None:
    """Append a refusal's ``record``; a failure is logged, never raised."""
    try:
        await audit.append(record)
    except MeshcaError:
        log.error(
            "refusal record not committed: %s %s %s", record.reason, record.api, record.spiffe_id
        )
    except Exception:
        log.exception("refusal record not committed")


def observe(observer: OutcomeObserver | None, record: AuditRecord, took: timedelta) -> None:
    """Tell ``observer`` how a request ended; a failing observer is logged, never raised."""
    if observer is None:
        return
    try:
        observer(record, took)
    except Exception:
        log.exception("an outcome observer failed")
