"""Every `-o json` of the CLI has one shape: the real `syncplane` CLI against an in-process
control plane whose worker (a real process) has synced a sandbox over real HTTP, so its
counters are non-zero. Proto JSON writes 64-bit integers as strings ("3"); the CLI must print
every integer field as a JSON number, whatever the command."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import click
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from syncplane.cli import cli as cli_group
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane_sandbox import SeedSpec
from tests.embedded_plane import ControlPlane
from tests.integration.cli_env import cli_process
from tests.integration.ingress_env import ingress_spec, poison_contacts, prepared_sandbox, status_until
from tests.integration.test_ingress import start

NAME = "jsonshape"
_INTEGERS = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
             FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
             FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED32,
             FieldDescriptor.TYPE_SFIXED64}


def integer_fields(doc: Any, desc: Descriptor, path: str = "") -> dict[str, Any]:
    """Field path → JSON value of every integer field of ``doc``, read as a ``desc`` message."""
    found: dict[str, Any] = {}
    by_key = {f.json_name: f for f in desc.fields} | {f.name: f for f in desc.fields}
    for key, value in doc.items():
        field = by_key.get(key)
        if field is None:
            continue
        sub = f"{path}.{key}".lstrip(".")
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            where = f"{sub}[{i}]" if isinstance(value, list) else sub
            if field.type in _INTEGERS:
                found[where] = item
            elif field.message_type is not None and isinstance(item, dict) \
                    and not field.message_type.GetOptions().map_entry:
                found |= integer_fields(item, field.message_type, where)
    return found


def workflow_resource(doc: dict[str, Any]) -> dict[str, Any]:
    """The integer fields of a kubectl-style Workflow resource (spec and status)."""
    return integer_fields(doc.get("spec", {}), pb.WorkflowSpec.DESCRIPTOR, "spec") | \
        integer_fields(doc.get("status", {}), pb.WorkflowStatus.DESCRIPTOR, "status") | \
        ({"metadata.generation": doc["metadata"]["generation"]} if "generation" in doc["metadata"] else {})


def items(each: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda doc: {f"items[{i}].{k}": v for i, item in enumerate(doc["items"]) for k, v in each(item).items()}


# command → (arguments, the integer fields of its JSON document, one integer field it must show)
JSON_COMMANDS: dict[str, tuple[list[str], Callable[[dict[str, Any]], dict[str, Any]], str]] = {
    "get": (["get", NAME], workflow_resource, "status.counters.read"),
    "list": (["list"], items(workflow_resource), "items[0].status.counters.written"),
    "watch": (["watch", NAME], lambda doc: workflow_resource(doc["object"]) | {"revision": doc["revision"]},
              "status.counters.read"),
    "deadletters list": (["deadletters", "list", NAME],
                         items(lambda d: integer_fields(d, svc.DeadLetter.DESCRIPTOR)), "items[0].httpStatus"),
    "verify": (["verify", NAME], lambda doc: integer_fields(doc, svc.VerifyWorkflowResponse.DESCRIPTOR),
               "result.counts.compared"),
}


def commands_with_json_output(group: click.Group, prefix: str = "") -> set[str]:
    """Every CLI command that has an `-o json` choice (so a new one cannot escape the table)."""
    found: set[str] = set()
    for name, command in group.commands.items():
        full = f"{prefix}{name}"
        if isinstance(command, click.Group):
            found |= commands_with_json_output(command, f"{full} ")
            continue
        for param in command.params:
            if "--output" in param.opts and isinstance(param.type, click.Choice) and "json" in param.type.choices:
                found.add(full)
    return found


def test_the_table_names_every_command_with_json_output() -> None:
    assert commands_with_json_output(cli_group) == set(JSON_COMMANDS)


async def json_of(plane: ControlPlane, args: list[str]) -> dict[str, Any]:
    """The first JSON document the real CLI prints (`watch` prints one per change: its first)."""
    proc = await cli_process(plane.port, *args, "-o", "json")
    try:
        if args[0] == "watch":
            line = await asyncio.wait_for(proc.stdout.readline(), 60)  # type: ignore[union-attr]
            doc: dict[str, Any] = json.loads(line)
            return doc
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        doc = json.loads(out)
        return doc
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


@pytest.mark.timeout(300)
async def test_every_json_output_prints_integers_as_numbers(plane: ControlPlane) -> None:
    async with prepared_sandbox(SeedSpec(contacts=200, seed=5), plane.data_dir) as sb:
        poison_contacts(sb, 2)
        await start(plane, NAME, ingress_spec(sb, batch_size=50))
        await status_until(plane.stub, NAME, lambda s: s.counters.written == 198 and s.dead_letters == 2
                           and s.counters.dead_lettered == 2 and s.backlog == 0, 120)
        failures = {}
        for command, (args, integers, shown) in JSON_COMMANDS.items():
            found = integers(await json_of(plane, args))
            assert found.get(shown) not in (None, 0, "0"), (command, shown, found)  # present, non-zero
            not_numbers = {path: value for path, value in found.items() if type(value) is not int}
            if not_numbers:
                failures[command] = not_numbers
        assert not failures, f"integer fields printed as something else than a JSON number: {failures}"
