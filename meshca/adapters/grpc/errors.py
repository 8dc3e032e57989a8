"""The single mapping from meshca errors to gRPC status codes, applied by one interceptor."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from meshca.core import errors

__all__ = ["ErrorMappingInterceptor", "status_for"]

log = logging.getLogger(__name__)

_STATUS_TABLE: tuple[tuple[type[errors.MeshcaError], grpc.StatusCode], ...] = (
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.RequestTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.AuthenticationFailed, grpc.StatusCode.UNAUTHENTICATED),
    (errors.NotAuthorized, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.InternalError, grpc.StatusCode.INTERNAL),
)


def status_for(error: errors.MeshcaError) -> grpc.StatusCode:
    for kind, code in _STATUS_TABLE:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: BaseException) -> None:
    if isinstance(error, errors.MeshcaError) and not isinstance(error, errors.InternalError):
        await context.abort(status_for(error), error.message)
    # Internal failures get an opaque message; the log id ties it to the server log.
    log_id = uuid.uuid4().hex[:12]
    log.error("internal error (log id %s)", log_id, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (log id {log_id})")


def _wrap_unary(
    behavior: Callable[[Any, Any], Awaitable[Any]],
) -> Callable[[Any, Any], Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(request, context)
        except Exception as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            await _abort(context, error)

    return wrapped


def _wrap_stream(
    behavior: Callable[[Any, Any], AsyncIterator[Any]],
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def wrapped(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            async for item in behavior(request, context):
                yield item
        except Exception as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            await _abort(context, error)

    return wrapped


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns a MeshcaError raised by any servicer into its gRPC status."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
