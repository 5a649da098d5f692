"""The operator's reconciles, measured: a span each, and the instruments of :mod:`syncplane.metrics`
(``syncplane.operator.reconcile.duration`` and ``syncplane.operator.reconciles``) by outcome:
``success``, ``retry`` (a :class:`kopf.TemporaryError`: kopf tries again), ``error`` (anything else)."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import kopf
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from syncplane import metrics

P = ParamSpec("P")
R = TypeVar("R")
_tracer = trace.get_tracer("syncplane.operator")


def outcome_of(exc: BaseException | None) -> str:
    """The ``outcome`` label of a reconcile that raised ``exc`` (None: it returned)."""
    if exc is None:
        return "success"
    return "retry" if isinstance(exc, kopf.TemporaryError) else "error"


def observed_reconcile(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Wrap a reconcile whose first argument is the Workflow's body: a span ``reconcile`` with the
    ``workflow`` and ``k8s.namespace.name`` attributes, and its duration and outcome counted."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        body: Any = args[0] if args else kwargs.get("body")
        meta = body.get("metadata", {}) if body is not None else {}
        attributes = {"workflow": str(meta.get("name", "")), "k8s.namespace.name": str(meta.get("namespace", ""))}
        started = time.perf_counter()
        error: BaseException | None = None
        with _tracer.start_as_current_span("reconcile", kind=SpanKind.INTERNAL, attributes=attributes,
                                           record_exception=False, set_status_on_exception=False) as span:
            try:
                return await fn(*args, **kwargs)
            except BaseException as exc:
                error = exc
                if outcome_of(exc) == "error":
                    span.set_status(StatusCode.ERROR, type(exc).__name__)
                raise
            finally:
                labels = {"outcome": outcome_of(error)}
                span.set_attribute("outcome", labels["outcome"])
                metrics.reconcile_duration.record(time.perf_counter() - started, labels)
                metrics.reconciles.add(1, labels)

    return wrapper
