"""The console's pure parts: the edit form round-trips any spec (render, submit as a browser
would, read back: the same spec, so saving an untouched form is never drift), the row view's
toggle follows the lifecycle core, the drift diff, the sample ring, and the error mapping
shared with the gRPC interceptor."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncplane.console import present
from syncplane.console.app import ENUMS, template_env
from syncplane.console.errors import error_body
from syncplane.console.history import Sample, SampleRing
from syncplane.console.spec_form import spec_from_form, spec_view
from syncplane.errors import Aborted, FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from syncplane.lifecycle.drift import drift_diff
from syncplane.lifecycle.transitions import START_FROM, STOP_FROM, effective_phase
from syncplane.proto.v1 import workflow_pb2 as pb
from tests.factories import spec, workflow


class FormSubmission(HTMLParser):
    """The (name, value) pairs a browser submits for a form, in document order (HTML's
    "constructing the entry list"): unchecked checkboxes are left out, a select sends its
    selected option (else its first)."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs: list[tuple[str, str]] = []
        self._select: tuple[str, list[tuple[str, bool]]] | None = None
        self._option: tuple[str | None, bool] | None = None
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "input" and "name" in a:
            if a.get("type") == "checkbox" and "checked" not in a:
                return
            self.pairs.append((a["name"], a.get("value", "on" if a.get("type") == "checkbox" else "")))
        elif tag == "select":
            self._select = (a["name"], [])
        elif tag == "option":
            self._option = (dict(attrs).get("value"), "selected" in a)
            self._text = ""

    def handle_data(self, data: str) -> None:
        if self._option is not None:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "option" and self._select is not None and self._option is not None:
            value, selected = self._option
            self._select[1].append((value if value is not None else self._text.strip(), selected))
            self._option = None
        elif tag == "select" and self._select is not None:
            name, options = self._select
            chosen = next((v for v, s in options if s), options[0][0] if options else "")
            self.pairs.append((name, chosen))
            self._select = None


def submitted(s: pb.WorkflowSpec) -> list[tuple[str, str]]:
    html = template_env().from_string('{% from "_form.html" import spec_form %}{{ spec_form(s, enums) }}').render(
        s=spec_view(s), enums=ENUMS)
    parser = FormSubmission()
    parser.feed(html)
    return parser.pairs


names = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)
text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12).filter(
    lambda t: t.strip() == t and t != "")


@st.composite
def ingress_specs(draw: st.DrawFn) -> pb.WorkflowSpec:
    s = spec("ingress")
    entity = s.ingress.entities[0]
    del entity.fields[:]
    for _ in range(draw(st.integers(1, 4))):
        mapping = entity.fields.add(source=draw(names), destination=draw(names))
        choice = draw(st.sampled_from([None, True, False]))
        if choice is not None:
            mapping.apply_updates = choice
    for _ in range(draw(st.integers(0, 2))):
        entity.replacements.add(field=draw(names), value=draw(text), replacement=draw(text))
    if draw(st.booleans()):
        entity.filter.combinator = draw(st.sampled_from([pb.FILTER_COMBINATOR_AND, pb.FILTER_COMBINATOR_OR]))
        for _ in range(draw(st.integers(1, 3))):
            entity.filter.conditions.add(field=draw(names), operator=pb.FILTER_OPERATOR_EQUALS, value=draw(text))
        entity.filter.delete_excluded = draw(st.booleans())
    entity.apply_deletes = draw(st.booleans())
    entity.technical_picklist_values = draw(st.booleans())
    s.batch_size = draw(st.integers(1, 1000))
    s.workers = draw(st.integers(1, 4))
    return s


@st.composite
def egress_specs(draw: st.DrawFn) -> pb.WorkflowSpec:
    s = spec("egress")
    s.egress.send, s.egress.open, s.egress.click = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    s.egress.bounce = True
    return s


@st.composite
def optinout_specs(draw: st.DrawFn) -> pb.WorkflowSpec:
    s = spec("opt_in_out")
    s.opt_in_out.direction = draw(st.sampled_from([pb.OPT_IN_OUT_DIRECTION_BIDIRECTIONAL,
                                                   pb.OPT_IN_OUT_DIRECTION_CRM_TO_MARKETING]))
    del s.opt_in_out.field_pairs[:]
    for _ in range(draw(st.integers(1, 3))):
        s.opt_in_out.field_pairs.add(campaign_field=draw(names), crm_field=draw(names))
    return s


@settings(max_examples=60, deadline=None)
@given(st.one_of(ingress_specs(), egress_specs(), optinout_specs()))
def test_edit_form_round_trips_any_spec(s: pb.WorkflowSpec) -> None:
    s.ClearField("desired_state")
    assert spec_from_form(submitted(s)) == s


def test_form_inputs_are_named_by_field_path() -> None:
    """The names a BadRequest violation uses, so the page can put each error next to its input."""
    names_sent = {name for name, _ in submitted(spec("ingress"))}
    for path in ("spec.source.endpoint", "spec.source.credentials.name", "spec.batch_size",
                 "spec.ingress.entities[0].fields[1].destination", "spec.ingress.entities[0].filter.combinator"):
        assert path in names_sent


def test_a_blank_row_and_a_cleared_field_read_back_as_unset() -> None:
    pairs = [*submitted(spec("ingress")), ("spec.batch_size", "")]
    back = spec_from_form(pairs)
    assert back.batch_size == 0 and len(back.ingress.entities[0].fields) == 4


def test_form_values_the_spec_types_reject_name_their_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        spec_from_form([("spec.type", "INGRESS"), ("spec.batch_size", "many")])
    assert caught.value.violations[0].field.startswith("spec")


@pytest.mark.parametrize("phase", [pb.PHASE_STOPPED, pb.PHASE_STARTING, pb.PHASE_RUNNING, pb.PHASE_STOPPING,
                                   pb.PHASE_ERROR])
@pytest.mark.parametrize("desired", [pb.DESIRED_STATE_STOPPED, pb.DESIRED_STATE_RUNNING])
def test_toggle_offers_what_the_lifecycle_core_allows(phase: int, desired: int) -> None:
    wf = workflow()
    wf.status.phase = pb.Phase.ValueType(phase)
    wf.spec.desired_state = pb.DesiredState.ValueType(desired)
    t = present.toggle(wf)
    assert t["action"] == ("stop" if desired == pb.DESIRED_STATE_RUNNING else "start")
    assert t["enabled"] == (effective_phase(wf) in (STOP_FROM if t["action"] == "stop" else START_FROM))
    assert t["expectedPhase"] == present.row(wf)["toggle"]["expectedPhase"]


def test_row_shows_degraded_reason_and_drift_tooltip() -> None:
    wf = workflow()
    wf.status.phase = pb.PHASE_RUNNING
    wf.status.conditions.add(type="Degraded", status="True", reason="SourceThrottled", message="429 for 40 s")
    wf.status.drift.detected = True
    wf.status.drift.changed_fields.append("spec.batch_size")
    row = present.row(wf)
    assert row["degraded"] == "SourceThrottled: 429 for 40 s"
    assert "spec.batch_size" in row["driftTooltip"] and "applies at the next start" in row["driftTooltip"]
    wf.status.conditions[0].status = "False"
    assert present.row(wf)["degraded"] == ""


def test_drift_diff_gives_applied_and_edited_values() -> None:
    applied = spec("ingress")
    edited = pb.WorkflowSpec()
    edited.CopyFrom(applied)
    edited.ingress.entities[0].fields[1].destination = "emailAddress"
    edited.batch_size = 250
    assert drift_diff(applied, edited) == [("spec.batch_size", applied.batch_size, 250),
                                           ("spec.ingress.entities[0].fields[1].destination", "email",
                                            "emailAddress")]


def test_sample_ring_is_bounded_and_spaced() -> None:
    ring = SampleRing(window=100.0, interval=10.0)
    kept = [ring.add("wf", Sample(float(t), t, 1.0)) for t in range(0, 1000, 5)]
    assert kept[:3] == [True, False, True]
    samples = ring.samples("wf")
    assert len(samples) <= 11 and samples[-1].time - samples[0].time <= 100
    ring.forget("wf")
    assert ring.samples("wf") == []


@pytest.mark.parametrize(("exc", "status", "code"), [
    (InvalidArgument([FieldViolation("spec.batch_size", "must be between 1 and 1000")]), 400, "INVALID_ARGUMENT"),
    (FailedPrecondition("cannot start", "RUNNING"), 400, "FAILED_PRECONDITION"),
    (Aborted("etag"), 409, "ABORTED"),
    (NotFound("no such workflow"), 404, "NOT_FOUND"),
    (RuntimeError("secret internals"), 500, "INTERNAL"),
])
def test_errors_map_as_over_grpc(exc: Exception, status: int, code: str) -> None:
    got_status, body = error_body(exc)
    assert (got_status, body["code"]) == (status, code)
    if isinstance(exc, InvalidArgument):
        assert body["fieldViolations"] == [{"field": "spec.batch_size", "description": "must be between 1 and 1000"}]
    if code == "INTERNAL":
        assert "secret internals" not in body["message"]


def test_detail_shows_the_last_verify_when_there_is_one() -> None:
    wf = workflow()
    assert present.detail(wf, [])["verify"] is None
    wf.status.last_verify.verify_time.FromSeconds(1_800_000_000)
    wf.status.last_verify.counts.compared = 20_000
    wf.status.last_verify.counts.missing = 3
    got = present.detail(wf, [])["verify"]
    assert got is not None
    assert (got["compared"], got["missing"], got["time"]) == (20_000, 3, "2027-01-15T08:00:00.000Z")


def test_every_console_page_is_an_rpc_with_a_verb(tmp_path):
    """Issue 13 item 3 for the console: each page is authorised as the gRPC call it is. A page added
    without a mapping would be refused (fail closed); this keeps the table complete and every RPC in it
    known to callers.VERBS (so Kubernetes authorises it with a SubjectAccessReview)."""
    from syncplane.api.callers import VERBS
    from syncplane.console.app import create_console
    from syncplane.console.auth import PUBLIC_PATHS, ROUTES
    from syncplane.service import WorkflowService
    from syncplane.store.sqlite import SqliteStore

    app = create_console(WorkflowService(SqliteStore(tmp_path / "db")))
    pages = {(route.method, route.resource.canonical) for route in app.router.routes()
             if route.resource is not None and route.method != "HEAD"
             and not (route.resource.canonical + "/").startswith(PUBLIC_PATHS)}
    assert pages == set(ROUTES)
    assert set(ROUTES.values()) <= set(VERBS)


def test_server_replicas_sharing_a_secret_accept_each_others_csrf_tokens():
    """Behind one Service a page rendered by one server replica posts to another: replicas with the same
    TLS key (or shared token) agree on CSRF tokens; different secrets do not."""
    from aiohttp.test_utils import make_mocked_request

    from syncplane.api.callers import SharedToken
    from syncplane.console.auth import SESSION_COOKIE, ConsoleAuth

    request = make_mocked_request("GET", "/", headers={"Cookie": f"{SESSION_COOKIE}=a-users-token"})
    own = SharedToken(None)   # each user brings their own token (as with the Kubernetes callers)
    replicas = [ConsoleAuth(None, True, own, shared_secret=b"the-tls-key") for _ in range(2)]
    assert replicas[0].csrf_token(request) == replicas[1].csrf_token(request)
    other = ConsoleAuth(None, True, own, shared_secret=b"another-key")
    assert other.csrf_token(request) != replicas[0].csrf_token(request)
    assert ConsoleAuth("t", False).csrf_token(request) == ConsoleAuth("t", False).csrf_token(request)
