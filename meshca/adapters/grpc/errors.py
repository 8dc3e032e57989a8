"""The single mapping from meshca errors to gRPC status codes, applied to every servicer.

One table per wire contract: ours (and Istio's) in ``STATUS_TABLE``; Linkerd's identity
API, whose clients expect its own codes, in ``LINKERD_STATUS_TABLE``.
"""

from __future__ import annotations

import inspect
import logging
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from meshca.adapters.grpc.gate import DRAINING, CallGate
from meshca.adapters.log_format import redact
from meshca.core import errors

if TYPE_CHECKING:
    from meshca.adapters.grpc.limits import MethodCap

__all__ = [
    "LINKERD_STATUS_TABLE",
    "MAX_DETAIL_CHARS",
    "STATUS_TABLE",
    "StatusTable",
    "bounded_detail",
    "error_mapped",
    "status_for",
]

log = logging.getLogger(__name__)

StatusTable = tuple[tuple[type[errors.MeshcaError], grpc.StatusCode], ...]

STATUS_TABLE: StatusTable = (
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.RequestTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.AuthenticationFailed, grpc.StatusCode.UNAUTHENTICATED),
    (errors.NotAuthorized, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.InternalError, grpc.StatusCode.INTERNAL),
)

#: Linkerd's identity contract (linkerd2 ``pkg/identity/service.go``): a bad token or CSR
#: is INVALID_ARGUMENT, an identity the token does not prove is FAILED_PRECONDITION.
#: An oversized CSR or token is a bad one there too.
LINKERD_STATUS_TABLE: StatusTable = (
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.RequestTooLarge, grpc.StatusCode.INVALID_ARGUMENT),
    # Over --issuance-rate or an API's cap: not a bad request, so the proxy's back-off
    # applies as for any other status; Linkerd's contract names no code for it.
    (errors.LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.AuthenticationFailed, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotAuthorized, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.InternalError, grpc.StatusCode.INTERNAL),
)

#: A status detail says what was wrong, not what was sent: messages quote at most a short
#: excerpt of an input, and this cut is the last net for any that would quote more.
MAX_DETAIL_CHARS = 400


def bounded_detail(message: str) -> str:
    """``message`` as a client may see it: tokens and PEM blocks redacted, length capped."""
    text = redact(message)
    if len(text) > MAX_DETAIL_CHARS:
        text = text[: MAX_DETAIL_CHARS - 1] + "…"
    return text


def status_for(error: errors.MeshcaError, table: StatusTable = STATUS_TABLE) -> grpc.StatusCode:
    for kind, code in table:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], error: BaseException, table: StatusTable
) -> None:
    if isinstance(error, errors.MeshcaError) and not isinstance(error, errors.InternalError):
        await context.abort(status_for(error, table), bounded_detail(error.message))
    # Internal failures get an opaque message; the log id ties it to the server log.
    log_id = uuid.uuid4().hex[:12]
    log.error(
        "internal error (log id %s)", log_id, exc_info=error, extra={"event": "internal-error"}
    )
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (log id {log_id})")


async def _refuse(cap: MethodCap, context: Any, refusal: errors.MeshcaError) -> None:
    """Record ``refusal`` where the API records refusals, then raise it."""
    try:
        await cap.refused(context, refusal)
    except Exception:
        log.exception("a refusal over a per-API cap was not recorded")
    raise refusal


def _wrap_unary(
    behavior: Callable[[Any, Any], Awaitable[Any]],
    gate: CallGate | None,
    table: StatusTable,
    cap: MethodCap | None,
) -> Callable[[Any, Any], Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if gate is not None and not gate.admit():
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)
        try:
            if cap is None:
                return await behavior(request, context)
            refusal = cap.enter(request)
            if refusal is not None:
                await _refuse(cap, context, refusal)
            try:
                return await behavior(request, context)
            finally:
                cap.leave()
        except Exception as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            await _abort(context, error, table)
        finally:
            if gate is not None:
                gate.release()

    return wrapped


def _wrap_stream(
    behavior: Callable[[Any, Any], AsyncIterator[Any]],
    gate: CallGate | None,
    table: StatusTable,
    cap: MethodCap | None,
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def wrapped(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        if gate is not None and not gate.admit_stream():
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)
        entered = False
        try:
            if cap is not None:
                refusal = cap.enter(request)
                if refusal is not None:
                    await _refuse(cap, context, refusal)
                entered = True
            items = behavior(request, context)
            if gate is not None:
                items = gate.until_closed(items)
            async for item in items:
                yield item
        except Exception as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            await _abort(context, error, table)
        finally:
            if entered and cap is not None:
                cap.leave()
        if gate is not None and gate.closed:
            # Ended by the drain, not by its own end: the client should reconnect.
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)

    return wrapped


def error_mapped(
    servicer: object, gate: CallGate | None = None, table: StatusTable = STATUS_TABLE
) -> Any:
    """An object with ``servicer``'s RPC methods, each turning a raised error into its status
    by ``table`` (the servicer's wire contract).

    With ``gate``, each method also comes through it: refused with UNAVAILABLE once it
    is closed, and counted (unary) or ended at the close (streams). With the gate's
    ``limits``, each call then meets its API's cap (``limits.ApiCaps``): over it, the
    refusal (RESOURCE_EXHAUSTED) is recorded by the API's recorder and nothing runs.

    Pass it to the generated ``add_..._to_server``, which only looks the methods up. The
    wrapping happens once, at registration: an interceptor would wrap the handler again
    on every call, on the issuance hot path. Unary methods (coroutine functions) and
    server-streaming ones (async generators) are wrapped; anything else, such as a
    generated base class's UNIMPLEMENTED default, is passed through as it is.
    """
    mapped = types.SimpleNamespace()
    limits = None if gate is None else gate.limits
    for name in dir(servicer):
        if name.startswith("_"):
            continue
        method = getattr(servicer, name)
        cap = None if limits is None else limits.cap_for(servicer, name)
        if inspect.isasyncgenfunction(method):
            method = _wrap_stream(method, gate, table, cap)
        elif inspect.iscoroutinefunction(method):
            method = _wrap_unary(method, gate, table, cap)
        setattr(mapped, name, method)
    return mapped
