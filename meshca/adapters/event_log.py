"""One log line per signing request, from the record ``CertificateService`` committed.

``certificate-issued`` (``jwt-svid-issued`` for JWT-SVIDs) is INFO and ``request-refused``
is WARNING: ``--log-level warning``
keeps every refusal and drops the per-certificate lines. The lines carry the record's
SPIFFE ID, serial, reason, API and peer, and how long the request took; never its token
or CSR, which an ``AuditRecord`` does not hold.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from meshca.core.audit import AuditRecord, Outcome

__all__ = ["EVENTS_LOGGER", "EVENT_ISSUED", "EVENT_JWT_ISSUED", "EVENT_REFUSED", "OutcomeLog"]

EVENTS_LOGGER = "meshca.events"
EVENT_ISSUED = "certificate-issued"
EVENT_REFUSED = "request-refused"
EVENT_JWT_ISSUED = "jwt-svid-issued"


class OutcomeLog:
    """An ``OutcomeObserver`` that logs each request's outcome; never raises on its own."""

    def __init__(self, logger: logging.Logger | None = None, *, jwt_svids: bool = False) -> None:
        """``jwt_svids``: the records are JWT-SVIDs (``serial`` is the ``jti``)."""
        self._log = logger or logging.getLogger(EVENTS_LOGGER)
        self._issued = (
            (EVENT_JWT_ISSUED, "JWT-SVID issued")
            if jwt_svids
            else (
                EVENT_ISSUED,
                "certificate issued",
            )
        )

    def __call__(self, record: AuditRecord, duration: timedelta) -> None:
        if record.outcome is Outcome.ISSUED:
            level, event = logging.INFO, self._issued[0]
        else:
            level, event = logging.WARNING, EVENT_REFUSED
        # Checked first: with the level off, a request costs this one comparison.
        if not self._log.isEnabledFor(level):
            return
        fields = {
            "event": event,
            "spiffe_id": record.spiffe_id,
            "serial": record.serial,
            "reason": record.reason,
            "api": record.api,
            "peer": record.peer,
            "duration_ms": round(duration.total_seconds() * 1000, 3),
        }
        if level == logging.INFO:
            self._log.info(self._issued[1], extra=fields)
        else:
            # The detail is what the caller was told; errors never quote tokens or keys.
            self._log.warning("request refused: %s", record.detail, extra=fields)
