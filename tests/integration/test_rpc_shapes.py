"""Every method of every service the server registers, called through the interceptor.

The services are found the way a generic client finds them (reflection), and each method
is called in its own shape (unary or streaming) with an empty request: whatever it
answers, it is never INTERNAL or UNKNOWN, and the server logs no ERROR. Each method with a
response stream is also called by a client that cancels after the first response.

Shared by both backends (tests/backends.py); the k8s tier collects it in
tests/k8s/test_grpc_kubernetes.py."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.backends import ApiPlane

BROKEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


async def registered_methods(channel: grpc.aio.Channel) -> list[MethodDescriptor]:
    """Every method of every service the server lists through reflection, with descriptors
    built from the files reflection sends (as grpcurl does)."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    names: list[str] = []
    async for resp in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
        names.extend(s.name for s in resp.list_services_response.service)
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    asks = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=n) for n in names]
    async for resp in stub.ServerReflectionInfo(iter(asks)):
        for raw in resp.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            files[proto.name] = proto
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    while len(added) < len(files):   # dependencies first
        ready = [f for n, f in files.items() if n not in added and all(d in added for d in f.dependency)]
        assert ready, f"reflection sent files with missing dependencies: {sorted(set(files) - added)}"
        for f in ready:
            pool.Add(f)
            added.add(f.name)
    return [m for name in names for m in pool.FindServiceByName(name).methods]


def call_of(channel: grpc.aio.Channel, method: MethodDescriptor) -> tuple[Any, Any]:
    """A multi-callable for the method in its own shape, and an empty request (or request stream)."""
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    shape = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
             (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
        (method.client_streaming, method.server_streaming)]
    multi = shape(path, request_serializer=request_cls.SerializeToString,
                  response_deserializer=response_cls.FromString)

    async def one_request() -> AsyncIterator[Any]:
        yield request_cls()

    return multi, (one_request() if method.client_streaming else request_cls())


async def test_every_method_of_every_service(cp: ApiPlane, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    await cp.create("present")   # so that a watch from now has a first event to send
    methods = await registered_methods(cp.channel)
    services = {m.containing_service.full_name for m in methods}
    assert {"syncplane.v1.WorkflowService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services
    answered: dict[str, str] = {}
    for method in methods:
        multi, request = call_of(cp.channel, method)
        call = multi(request, timeout=30)
        try:
            if method.server_streaming:
                # Read one response or the status; a stream that stays open (a watch) is cancelled below.
                first = await call.read()
                answered[method.full_name] = "stream" if first is not grpc.aio.EOF else "eof"
            else:
                await call
                answered[method.full_name] = "OK"
        except grpc.aio.AioRpcError as err:
            assert err.code() not in BROKEN, f"{method.full_name}: {err.code().name} {err.details()}"
            answered[method.full_name] = err.code().name
        finally:
            call.cancel()
    # The health Watch (a coroutine writing with context.write) streams the serving status.
    assert answered["grpc.health.v1.Health.Watch"] == "stream", answered
    assert answered["grpc.health.v1.Health.Check"] == "OK", answered
    assert answered["syncplane.v1.WorkflowService.WatchWorkflows"] == "stream", answered
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


async def test_streams_cancelled_by_the_client(cp: ApiPlane, caplog: pytest.LogCaptureFixture):
    """A client that goes away mid-stream is normal use: no INTERNAL, no ERROR in the log."""
    caplog.set_level(logging.INFO)
    await cp.create("cancelled")
    streaming = [m for m in await registered_methods(cp.channel) if m.server_streaming]
    assert streaming
    for method in streaming:
        for _ in range(3):
            multi, request = call_of(cp.channel, method)
            call = multi(request)
            try:
                await call.read()
            except grpc.aio.AioRpcError as err:
                assert err.code() not in BROKEN, f"{method.full_name}: {err.code().name} {err.details()}"
            call.cancel()
    # Every call still answers after the cancellations.
    multi, request = call_of(cp.channel, streaming[0])
    follow = multi(request)
    await follow.read()
    follow.cancel()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]
