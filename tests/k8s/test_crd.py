"""The API server itself enforces the Workflow schema (the generated CRD)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.factories import PLAIN_QUERY_NAMES, SECRET_QUERY_NAMES, with_query
from tests.k8s.syncplane_fixtures import CRD, apply_crd, without_cel

pytestmark = pytest.mark.k8s
EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "server" / "syncplane" / "defaults").glob("*.yaml"))


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load(next(p for p in EXAMPLES if name in p.name).read_text())


def test_valid_examples_apply(k8s_cluster, workflow_crd, namespace, tmp_path):
    for path in EXAMPLES:
        res = k8s_cluster.kubectl("apply", "-n", namespace, "-f", str(path), check=False)
        assert res.returncode == 0, res.stderr
    out = k8s_cluster.kubectl("get", "workflows", "-n", namespace).stdout
    header = out.splitlines()[0].split()
    assert header == ["NAME", "TYPE", "DESIRED", "PHASE", "DEGRADED", "BACKLOG", "DRIFT", "AGE"]
    short = k8s_cluster.kubectl("get", "spwf", "-n", namespace, "-o", "name").stdout.split()
    assert len(short) == len(EXAMPLES)


def _mutations() -> list[tuple[str, str, Any]]:
    """(example, description, mutate) -> the field the API server must name."""
    def setp(path: str, value: Any):
        def apply(doc: dict[str, Any]) -> None:
            node = doc
            keys = path.split(".")
            for k in keys[:-1]:
                node = node[int(k)] if isinstance(node, list) else node[k]
            last = keys[-1]
            if value is _DELETE:
                del node[last]
            elif isinstance(node, list):
                node[int(last)] = value
            else:
                node[last] = value
        return apply
    return [
        ("contacts", "spec.type", setp("spec.type", "SIDEWAYS")),
        ("contacts", "spec.batchSize", setp("spec.batchSize", 5000)),
        ("contacts", "spec.workers", setp("spec.workers", 0)),
        ("contacts", "spec.pollInterval", setp("spec.pollInterval", "five minutes")),
        ("contacts", "spec.source.endpoint", setp("spec.source.endpoint", "ftp://nowhere")),
        # issue 13: cleartext off loopback, link-local / metadata addresses, spaces and control characters
        ("contacts", "spec.source.endpoint", setp("spec.source.endpoint", "http://contoso.crm.dynamics.com/api/")),
        ("contacts", "spec.source.endpoint", setp("spec.source.endpoint", "https://169.254.169.254/latest/")),
        ("contacts", "spec.destination.endpoint", setp("spec.destination.endpoint", "http://metadata.google.internal/")),
        ("contacts", "spec.source.endpoint", setp("spec.source.endpoint", "https://contoso.crm.dynamics.com/a b/")),
        ("contacts", "spec.source.endpoint", setp("spec.source.endpoint", "https://contoso.crm.dynamics.com/\n")),
        ("contacts", "spec.source.credentials.name", setp("spec.source.credentials.name", "Not_A_Name")),
        ("contacts", "spec.destination", setp("spec.destination", _DELETE)),
        ("contacts", "spec.ingress.entities[0].fields", setp("spec.ingress.entities.0.fields.1.destination",
                                                             "externalId")),
        ("contacts", "spec.ingress", setp("spec.egress", {"send": True})),
        ("contacts", "spec.ingress.entities[0].sourceTable", setp("spec.ingress.entities.0.sourceTable", "Contact!")),
        ("contacts", "spec.source.kind", setp("spec.source.kind", "CAMPAIGN_STANDARD")),
        ("email-events", "spec.egress", setp("spec.egress", {"send": False})),
        ("opt-in-out", "spec.optInOut.direction", setp("spec.optInOut.direction", "SOMETIMES")),
        ("opt-in-out", "spec.optInOut.fieldPairs[0].campaignField",
         setp("spec.optInOut.fieldPairs.0.campaignField", "favouriteColour")),
        ("opt-in-out", "spec.optInOut.fieldPairs[0].crmField", setp("spec.optInOut.fieldPairs.0.crmField", "email")),
    ]


_DELETE = object()


@pytest.mark.parametrize(("example", "field", "mutate"), _mutations(), ids=[m[1] + "-" + m[0] for m in _mutations()])
def test_invalid_workflows_are_rejected_naming_the_field(k8s_cluster, workflow_crd, namespace, tmp_path, example,
                                                         field, mutate):
    doc = copy.deepcopy(load(example))
    doc["metadata"]["name"] = "invalid"
    mutate(doc)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = k8s_cluster.kubectl("apply", "-n", namespace, "-f", str(path), check=False)
    assert res.returncode != 0, f"accepted an invalid Workflow ({field})"
    assert "is invalid" in res.stderr and field in res.stderr, res.stderr


@pytest.mark.parametrize("name", SECRET_QUERY_NAMES)
@pytest.mark.parametrize("side", ["source", "destination"])
def test_endpoint_with_a_secret_query_parameter_is_rejected(k8s_cluster, workflow_crd, namespace, tmp_path, name,
                                                            side):
    """The same table as validation (tests/unit/test_validation.py): the API server refuses it too."""
    doc = copy.deepcopy(load("contacts"))
    doc["metadata"]["name"] = "leaky"
    doc["spec"][side]["endpoint"] = with_query(doc["spec"][side]["endpoint"], name)
    path = tmp_path / "leaky.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = k8s_cluster.kubectl("apply", "-n", namespace, "-f", str(path), check=False)
    assert res.returncode != 0, f"accepted an endpoint with ?{name}="
    assert f"spec.{side}.endpoint" in res.stderr and "looks like a secret" in res.stderr, res.stderr


@pytest.mark.parametrize("name", PLAIN_QUERY_NAMES)
def test_endpoint_with_a_plain_query_parameter_is_accepted(k8s_cluster, workflow_crd, namespace, tmp_path, name):
    doc = copy.deepcopy(load("contacts"))
    doc["spec"]["source"]["endpoint"] = with_query(doc["spec"]["source"]["endpoint"], name)
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = k8s_cluster.kubectl("apply", "-n", namespace, "-f", str(path), check=False)
    assert res.returncode == 0, res.stderr


def test_chart_copy_is_the_generated_crd():
    from syncplane.model.crd import workflow_crd

    crd = Path(__file__).resolve().parents[2] / "charts" / "syncplane" / "crds" / "workflows.syncplane.io.yaml"
    assert yaml.safe_load(crd.read_text()) == workflow_crd()


def test_the_api_server_fills_in_the_defaults(k8s_cluster, workflow_crd, namespace, tmp_path):
    doc = load("opt-in-out")  # sets neither workers nor batchSize nor desiredState
    for key in ("workers", "batchSize", "desiredState"):
        doc["spec"].pop(key, None)
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(doc))
    k8s_cluster.kubectl("apply", "-n", namespace, "-f", str(path))
    spec = yaml.safe_load(k8s_cluster.kubectl("get", "workflow", doc["metadata"]["name"], "-n", namespace,
                                              "-o", "yaml").stdout)["spec"]
    assert (spec["workers"], spec["batchSize"], spec["desiredState"]) == (1, 100, "STOPPED")
    assert spec["pollInterval"] == "10s"  # given: kept


# issue 17: `kubectl explain` shows the proto's comments, read from the API server's published OpenAPI.
EXPLAINED = [
    ("workflow.spec.batchSize", "syncplane.v1.WorkflowSpec.batch_size"),
    ("workflow.spec.source.kind", "syncplane.v1.Connection.kind"),
    ("workflow.spec.ingress.entities.fields.source", "syncplane.v1.FieldMapping.source"),
    ("workflow.status.backlog", "syncplane.v1.WorkflowStatus.backlog"),
    ("workflow.status.drift.changedFields", "syncplane.v1.Drift.changed_fields"),
    ("workflow.status.counters.deadLettered", "syncplane.v1.Counters.dead_lettered"),
]


@pytest.mark.parametrize(("path", "element"), EXPLAINED, ids=[p for p, _ in EXPLAINED])
async def test_kubectl_explain_prints_the_proto_comment(k8s_cluster, workflow_crd, path, element):
    from syncplane.proto.v1.comments import COMMENTS
    from tests.backends import eventually

    want = " ".join(COMMENTS[element].split())
    seen: list[str] = []

    async def explained() -> bool:
        # The API server publishes a new CRD's OpenAPI a few seconds after it is established.
        res = k8s_cluster.kubectl("explain", path, check=False)
        seen[:] = [res.stdout + res.stderr]
        return want in " ".join(res.stdout.split())

    await eventually(explained, lambda: f"{want!r} in `kubectl explain {path}`: {seen}", timeout=60, interval=1)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        node: Any = doc
        *parents, last = path.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    return apply


# Specs that only a CEL rule refuses, one per kind of rule: the spec's (one section per type, the kinds per
# type), a Connection's (cleartext, metadata address, Dataverse's concurrency limit) and a section's.
ONLY_CEL_REFUSES = [
    ("contacts", "spec.ingress", _set("spec.egress", {"send": True})),
    ("contacts", "spec.source.kind", _set("spec.source.kind", "CAMPAIGN_STANDARD")),
    ("contacts", "spec.source.endpoint", _set("spec.source.endpoint", "http://contoso.crm.dynamics.com/api/")),
    ("contacts", "spec.destination.endpoint", _set("spec.destination.endpoint", "https://169.254.169.254/x/")),
    ("contacts", "spec.source.maxConcurrency", _set("spec.source.maxConcurrency", 53)),
    ("email-events", "spec.egress", _set("spec.egress", {"send": False})),
]


def test_a_rule_added_later_does_not_refuse_status_writes_to_existing_workflows(k8s_cluster, workflow_crd,
                                                                                 namespace):
    """A CRD upgrade that adds or tightens a CEL rule must not lock the operator out of the Workflows that
    already break it: status writes evaluate the spec's rules too (issue 17: the API server runs the CEL
    validator over the whole object on a status write), and only Kubernetes' validation ratcheting
    (unchanged values are not refused) lets the operator's status merge patch through. Each spec here is
    created while the CRD has no CEL rules, then the generated CRD comes back."""
    generated = yaml.safe_load(CRD.read_text())
    names = [f"before-rule-{i}" for i in range(len(ONLY_CEL_REFUSES))]
    docs = []
    for name, (example, _, mutate) in zip(names, ONLY_CEL_REFUSES, strict=True):
        doc = copy.deepcopy(load(example))
        doc["metadata"] = {"name": name}
        mutate(doc)
        docs.append(doc)
    try:
        apply_crd(k8s_cluster, without_cel(generated), cel=False)
        k8s_cluster.kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))
    finally:
        apply_crd(k8s_cluster, generated)
    base = f"/apis/syncplane.io/v1/namespaces/{namespace}/workflows"
    for name, doc, (_, field, _) in zip(names, docs, ONLY_CEL_REFUSES, strict=True):
        refused, body = k8s_cluster.api("POST", f"{base}?dryRun=All", {**doc, "metadata": {"name": f"{name}-new"}})
        assert refused == 422 and field in str(body), f"{field}: the rule is not on ({refused}: {body})"
        patched, body = k8s_cluster.api("PATCH", f"{base}/{name}/status",
                                        {"status": {"phase": "STOPPED", "observedGeneration": 1}},
                                        content_type="application/merge-patch+json")
        assert patched == 200, f"{field}: the status write was refused: {body}"
