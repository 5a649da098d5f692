"""Server interceptors: the one error boundary, authentication and authorisation of the
caller (syncplane.api.callers), the audit line of every mutating call, tracing.

Domain errors become `google.rpc.Status` with ErrorInfo (and BadRequest for
validation); anything unexpected becomes INTERNAL without internals.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from syncplane import errors, metrics
from syncplane.api.callers import VERBS, Call, Callers, SharedToken, bearer, workflow_of

log = logging.getLogger(__name__)
DOMAIN = "syncplane.io"
_CODES: dict[type[errors.SyncplaneError], int] = {
    errors.InvalidArgument: code_pb2.INVALID_ARGUMENT,
    errors.NotFound: code_pb2.NOT_FOUND,
    errors.AlreadyExists: code_pb2.ALREADY_EXISTS,
    errors.FailedPrecondition: code_pb2.FAILED_PRECONDITION,
    errors.Aborted: code_pb2.ABORTED,
    errors.Unauthenticated: code_pb2.UNAUTHENTICATED,
    errors.PermissionDenied: code_pb2.PERMISSION_DENIED,
    errors.OutOfRange: code_pb2.OUT_OF_RANGE,
    errors.Unavailable: code_pb2.UNAVAILABLE,
}
# Reachable without a token: load balancers and generic clients need them.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


# An error travels in trailing metadata (grpc-message, grpc-status-details-bin), which clients
# refuse past 8 KiB (grpc.max_metadata_size): echoed input (a name, a value) is clipped so that
# an error is never turned into RESOURCE_EXHAUSTED. Bytes of UTF-8.
MAX_MESSAGE_BYTES = 512
MAX_FIELD_BYTES = 120
MAX_DESCRIPTION_BYTES = 240
MAX_DETAILS_BYTES = 3000


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8 (on a character boundary), marked with an ellipsis."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[:limit - 3].decode(errors="ignore") + "\u2026"


def to_status(exc: BaseException) -> status_pb2.Status:
    if isinstance(exc, NotImplementedError):
        # grpc's generated servicer base for a method the servicer does not override (e.g. Health/List)
        return status_pb2.Status(code=code_pb2.UNIMPLEMENTED, message="method not implemented by this server")
    if not isinstance(exc, errors.SyncplaneError):
        return status_pb2.Status(code=code_pb2.INTERNAL, message="internal error; see the server log")
    code = next((c for t, c in _CODES.items() if isinstance(exc, t)), code_pb2.UNKNOWN)
    status = status_pb2.Status(code=code, message=clip(exc.message, MAX_MESSAGE_BYTES))
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata={
        k: clip(v, MAX_FIELD_BYTES) for k, v in exc.metadata.items()}))
    status.details.append(info)
    if isinstance(exc, errors.InvalidArgument):
        bad = error_details_pb2.BadRequest()
        for i, v in enumerate(exc.violations):
            if bad.ByteSize() > MAX_DETAILS_BYTES:
                bad.field_violations.add(field=clip(v.field, MAX_FIELD_BYTES),
                                         description=f"and {len(exc.violations) - i - 1} more violation(s)")
                break
            bad.field_violations.add(field=clip(v.field, MAX_FIELD_BYTES),
                                     description=clip(v.description, MAX_DESCRIPTION_BYTES))
        detail = any_pb2.Any()
        detail.Pack(bad)
        status.details.append(detail)
    return status


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    if not isinstance(exc, errors.SyncplaneError | NotImplementedError):
        log.exception("unexpected error in %s", method)
    await context.abort_with_status(rpc_status.to_status(to_status(exc)))


Handler = Callable[[Any, grpc.aio.ServicerContext], Any]


class _Method:
    """What an RPC's checks need of its method, worked out once per method: its name, whether it is
    public, whether its request names a workflow, and its span and metric attributes."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.name = method.rsplit("/", 1)[-1]
        self.public = method.startswith(PUBLIC_PREFIXES)
        self.names_workflow = self.name in VERBS
        self.attrs = _attrs(method)
        self._metric_attrs: dict[int, dict[str, Any]] = {}

    def metric_attrs(self, code: int) -> dict[str, Any]:
        attrs = self._metric_attrs.get(code)
        if attrs is None:
            attrs = self._metric_attrs[code] = {**self.attrs, "rpc.grpc.status_code": code}
        return attrs


class _Call:
    """One RPC's :class:`~syncplane.api.callers.Call` (public methods: none), its token from the metadata."""

    __slots__ = ("call",)

    def __init__(self, callers: Callers, method: _Method, request: Any) -> None:
        self.call = None if method.public else Call(
            callers, method.name, workflow_of(request) if method.names_workflow else None)

    async def check(self, context: grpc.aio.ServicerContext) -> None:
        if self.call is not None:
            await self.call.check(bearer(context.invocation_metadata()))

    def done(self, exc: BaseException | None = None) -> None:
        if self.call is not None:
            self.call.done("OK" if exc is None else code_pb2.Code.Name(to_status(exc).code))


class ServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Auth, tracing, audit and error mapping around every RPC."""

    def __init__(self, callers: Callers | None = None, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._callers = callers or SharedToken(None)
        self._tracer = trace.get_tracer("syncplane.api", tracer_provider=tracer_provider)
        # The wrapped handler per method, with the handler it wraps: grpc hands the same registered
        # handler for a method on every call, so the wrapping is done once, not per call.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def _start_span(self, method: _Method) -> trace.Span:
        # Status is set from the domain error; the abort that follows must not overwrite it.
        return self._tracer.start_span(method.method, kind=SpanKind.SERVER, attributes=method.attrs,
                                       record_exception=False, set_status_on_exception=False)

    @staticmethod
    def _current(span: trace.Span) -> Any:
        # Like _start_span: the status comes from the domain error, not from the exception passing by.
        return trace.use_span(span, record_exception=False, set_status_on_exception=False)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped_handler = handler
        for shape, streaming, factory in _SHAPES:
            behavior = getattr(handler, shape)
            if behavior is not None:
                wrapped = (self._streaming if streaming else self._unary)(_Method(method), behavior)
                wrapped_handler = factory(wrapped, request_deserializer=handler.request_deserializer,
                                          response_serializer=handler.response_serializer)
                break
        self._wrapped[method] = (handler, wrapped_handler)
        return wrapped_handler

    def _unary(self, method: _Method, behavior: Handler) -> Handler:
        """A single response: the behaviour is a coroutine function (or a plain function)."""

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            rpc = _Call(self._callers, method, request)
            started = time.perf_counter()
            code = code_pb2.OK
            # The span by hand rather than start_as_current_span (the same steps, without its
            # context-manager layers on every call). Its status comes from the domain error.
            span = self._start_span(method)
            token = context_api.attach(trace.set_span_in_context(span))
            try:
                await rpc.check(context)
                result = behavior(request, context)
                response = (await result) if inspect.isawaitable(result) else result
            except grpc.aio.AbortError:
                code = code_pb2.UNKNOWN  # the behaviour aborted with its own status
                raise
            except Exception as exc:
                code = to_status(exc).code
                rpc.done(exc)
                _record(span, exc)
                await _abort(context, exc, method.method)
            else:
                rpc.done()
                return response
            finally:
                context_api.detach(token)
                span.end()
                metrics.rpc_server_duration.record(time.perf_counter() - started, method.metric_attrs(code))

        return call

    def _streaming(self, method: _Method, behavior: Handler) -> Handler:
        """A response stream. The behaviour may be an async generator (ours, reflection) or a
        coroutine writing with `context.write` (grpc's health Watch), or a plain generator.

        The span is made current only around each step of the behaviour, never across a
        `yield`: a stream a client cancels is closed from wherever grpc finalises it, and a
        context attached across the yield would be detached in another context (OpenTelemetry's
        "Failed to detach context")."""

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            span = self._start_span(method)
            try:
                with self._current(span):
                    await _Call(self._callers, method, request).check(context)
                    result = behavior(request, context)
                    if inspect.isawaitable(result):
                        await result
                        return
                if hasattr(result, "__anext__"):
                    while True:
                        with self._current(span):
                            try:
                                item = await result.__anext__()
                            except StopAsyncIteration:
                                return
                        yield item
                else:
                    for item in result:
                        yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                _record(span, exc)
                await _abort(context, exc, method.method)
            finally:
                span.end()

        return stream


# Each RPC shape: the handler attribute, whether responses stream, the handler factory.
_SHAPES: tuple[tuple[str, bool, Callable[..., Any]], ...] = (
    ("unary_unary", False, grpc.unary_unary_rpc_method_handler),
    ("unary_stream", True, grpc.unary_stream_rpc_method_handler),
    ("stream_unary", False, grpc.stream_unary_rpc_method_handler),
    ("stream_stream", True, grpc.stream_stream_rpc_method_handler),
)


def _attrs(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _record(span: trace.Span, exc: BaseException) -> None:
    if isinstance(exc, errors.SyncplaneError):
        span.set_attribute("rpc.grpc.status_code", to_status(exc).code)
        span.set_status(StatusCode.ERROR, exc.reason)
    else:
        span.set_status(StatusCode.ERROR, "INTERNAL")
