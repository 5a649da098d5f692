"""Valid specs for tests, built from the shipped default workflows."""

from __future__ import annotations

from pathlib import Path

import yaml

from syncplane.model.convert import from_resource
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane.validation import apply_defaults

DEFAULTS = Path(__file__).resolve().parent.parent / "server" / "syncplane" / "defaults"
_FILES = {"ingress": "10-contacts-ingress.yaml", "egress": "20-email-events-egress.yaml",
          "opt_in_out": "30-opt-in-out.yaml"}


#: Secrets for the default specs' references, declaring the default endpoints' origins, with a token
#: URL nothing listens on: workers hold valid-looking credentials and start; their connectors retry.
UNREACHABLE_SECRETS = {
    "d365-sandbox": {"clientId": "test-client", "clientSecret": "test-secret", "tokenUrl": "http://127.0.0.1:9/token",
                     "scope": "http://127.0.0.1:7480/.default"},
    "acs-sandbox": {"clientId": "test-client", "clientSecret": "test-secret", "tokenUrl": "http://127.0.0.1:9/token",
                    "organization": "sandbox", "apiHost": "http://127.0.0.1:7481"},
}


def literals(data: dict[str, str]) -> list[str]:
    """``kubectl create secret generic`` arguments for a secret's keys."""
    return [f"--from-literal={k}={v}" for k, v in data.items()]


def spec(kind: str = "ingress") -> pb.WorkflowSpec:
    _, wf = from_resource(yaml.safe_load((DEFAULTS / _FILES[kind]).read_text()))
    apply_defaults(wf.spec)
    return wf.spec


async def create_workflow(stub: svc_grpc.WorkflowServiceStub, name: str, kind: str = "ingress",
                          **overrides: object) -> pb.Workflow:
    """CreateWorkflow ``name`` with the ``kind`` example spec, ``overrides`` set on its spec fields."""
    wf = pb.Workflow(spec=spec(kind))
    for key, value in overrides.items():
        setattr(wf.spec, key, value)
    return await stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id=name, workflow=wf))


def workflow(kind: str = "ingress", name: str = "wf") -> pb.Workflow:
    wf = pb.Workflow(name=f"workflows/{name}", generation=1, etag="1")
    wf.spec.CopyFrom(spec(kind))
    wf.status.phase = pb.PHASE_STOPPED
    return wf


# Query parameters whose names look like credentials: each is refused in an endpoint, with the
# field path, by validation and by the CRD alike (tests/unit/test_validation.py, tests/k8s/test_crd.py).
SECRET_QUERY_NAMES = ("client_secret", "Client_Secret", "client%5Fsecret", "secret", "password", "passwd", "pwd",
                      "access_token", "token", "refresh_token", "id_token", "api_key", "apikey", "X-API-Key",
                      "key", "sig", "X-Amz-Signature", "X-Amz-Credential", "auth", "authorization")
# Query parameters that carry no credential: allowed.
PLAIN_QUERY_NAMES = ("$select", "api-version", "top", "orgid")


def with_query(endpoint: str, name: str, value: str = "s3cr3t-value") -> str:
    return f"{endpoint.rstrip('/')}/?other=1&{name}={value}"
