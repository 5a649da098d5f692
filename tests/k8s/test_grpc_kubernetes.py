"""The foundation's gRPC suite on the Kubernetes backend.

The shared tests are written once in tests/integration (test_api_errors.py, test_rpc_shapes.py,
test_mutation_responses.py, test_api_fuzz.py, test_lifecycle_e2e.py)
and parametrized over `backend` by tests/backends.py,
which gives each test the backends of the tier that collects it. This module
is how the k8s tier collects them: it re-exports every `test_*` function of
those modules, so here they run as `test_…[kubernetes]` — the same WorkflowService
over Workflow custom resources in the real test cluster, with the operator
reconciling and a fake kubelet running the worker pods' containers. A test the
shared modules mark embedded-only (`@pytest.mark.backends("embedded")`) fails
collection here instead of being skipped, so it is not re-exported.
"""

from __future__ import annotations

import pytest

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from tests.backends import ApiPlane
from tests.integration import (
    test_api_errors,
    test_api_fuzz,
    test_lifecycle_e2e,
    test_mutation_responses,
    test_rpc_shapes,
)
from tests.k8s.control_plane import KubeControlPlane

pytestmark = pytest.mark.k8s


def _shared() -> dict[str, object]:
    tests: dict[str, object] = {}
    for module in (test_api_errors, test_lifecycle_e2e, test_mutation_responses, test_rpc_shapes, test_api_fuzz):
        for name, fn in vars(module).items():
            marker = [m for m in getattr(fn, "pytestmark", []) if m.name == "backends"]
            if name.startswith("test_") and callable(fn) and (not marker or "kubernetes" in marker[0].args):
                tests[name] = fn
    return tests


globals().update(_shared())


async def test_start_stop_patch_desired_state(cp: ApiPlane, k8s_cluster, namespace):
    """Start and Stop are edits of spec.desiredState on the custom resource (what kubectl sees)."""
    assert isinstance(cp, KubeControlPlane)
    created = await cp.create("toggle")
    started = await cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=created.name, etag=created.etag))
    assert started.spec.desired_state == pb.DESIRED_STATE_RUNNING and started.etag != created.etag
    cr = k8s_cluster.kubectl("get", "workflow", "toggle", "-n", namespace, "-o", "jsonpath={.spec.desiredState}")
    assert cr.stdout == "RUNNING"
    stopped = await cp.stub.StopWorkflow(svc.StopWorkflowRequest(name=created.name))
    assert stopped.spec.desired_state == pb.DESIRED_STATE_STOPPED
    cr = k8s_cluster.kubectl("get", "workflow", "toggle", "-n", namespace, "-o", "jsonpath={.spec.desiredState}")
    assert cr.stdout == "STOPPED"
