"""Every CLI error path: one `error: …` line (plus one line per field violation), a non-zero
exit, never a traceback; and the validation error exactly as the README shows it.

The table is commands by broken inputs, run as the user runs them (`python -m syncplane …`)
against a real `syncplane up` that requires a token."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.factories import DEFAULTS
from tests.integration.cli_env import cli
from tests.integration.conftest import ServerProcess

README = Path(__file__).resolve().parents[2] / "README.md"
TOKEN = "cli-errors-token"
GOOD = yaml.safe_load((DEFAULTS / "10-contacts-ingress.yaml").read_text())


def broken_inputs(tmp: Path) -> dict[str, Path]:
    files = {
        "missing": tmp / "no-such-file.yaml",
        "bad-yaml": tmp / "bad.yaml",
        "a-list": tmp / "list.yaml",
        "not-a-workflow": tmp / "scalar.yaml",
        "bad-enum": tmp / "enum.yaml",
        "unknown-field": tmp / "field.yaml",
        "spec-not-a-mapping": tmp / "spec.yaml",
    }
    files["bad-yaml"].write_text("apiVersion: syncplane.io/v1\nkind: Workflow\nmetadata: {name: x\nspec: [\n")
    files["a-list"].write_text("- 1\n- 2\n")
    files["not-a-workflow"].write_text("just a string\n")
    files["bad-enum"].write_text(yaml.safe_dump({**GOOD, "spec": {**GOOD["spec"], "type": "SIDEWAYS"}}))
    files["unknown-field"].write_text(yaml.safe_dump({**GOOD, "spec": {**GOOD["spec"], "colour": "blue"}}))
    files["spec-not-a-mapping"].write_text(yaml.safe_dump({**GOOD, "spec": "everything"}))
    return files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cases(tmp: Path, port: int) -> list[tuple[str, list[str], str | None]]:
    """(what, argv after the global options, expected text in the error) — each must fail cleanly."""
    files = broken_inputs(tmp)
    unknown = [[verb, "nope"] for verb in ("get", "describe", "start", "stop", "restart", "delete")]
    unknown += [["replay", "nope", "--table", "contact"], ["deadletters", "list", "nope"],
                ["deadletters", "retry", "nope"]]
    out: list[tuple[str, list[str], str | None]] = [
        (f"apply {name}", ["apply", "-f", str(path)], None) for name, path in files.items()]
    out += [(f"{' '.join(argv[:-1] if argv[0] != 'replay' else argv[:1])} unknown workflow", argv, "NOT_FOUND")
            for argv in unknown]
    out += [
        ("get bad name", ["get", "Not_A_Name"], "INVALID_ARGUMENT"),
        ("list bad output", ["list", "-o", "xml"], "xml"),
        ("unknown command", ["frobnicate"], "frobnicate"),
        ("start bad phase", ["start", "x", "--expect-phase", "SIDEWAYS"], "SIDEWAYS"),
    ]
    return out


def assert_clean_failure(what: str, res: subprocess.CompletedProcess[str], expect: str | None) -> None:
    both = res.stdout + res.stderr
    assert res.returncode != 0, f"{what}: exit 0\n{both}"
    assert "Traceback" not in both, f"{what}: a traceback\n{both}"
    lines = res.stderr.rstrip("\n").splitlines()
    assert lines and lines[0].startswith("error: "), f"{what}: no 'error: ' line first\n{res.stderr}"
    assert all(line.startswith("  ") for line in lines[1:]), f"{what}: more than one error line\n{res.stderr}"
    if expect:
        assert expect in res.stderr, f"{what}: {expect!r} not in\n{res.stderr}"


async def test_each_command_with_broken_input_prints_one_error_line(tmp_path: Path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    server = ServerProcess(tmp_path, "--token-file", str(token_file))
    try:
        await server.ready()
        for what, argv, expect in cases(tmp_path, server.port):
            assert_clean_failure(what, await cli(server.port, *argv, token=TOKEN), expect)
        # the credentials and the address
        for argv in (["list"], ["get", "x"], ["watch"]):
            assert_clean_failure(f"{argv[0]} bad token", await cli(server.port, *argv, token="wrong"),
                                 "UNAUTHENTICATED")
            assert_clean_failure(f"{argv[0]} no token", await cli(server.port, *argv), "UNAUTHENTICATED")
            assert_clean_failure(f"{argv[0]} missing CA file", await cli(
                server.port, *argv, token=TOKEN, ca=tmp_path / "no-ca.pem"), "no-ca.pem")
        down = free_port()
        for argv in (["list"], ["apply", "-f", str(DEFAULTS / "10-contacts-ingress.yaml")], ["watch"],
                     ["start", "x"]):
            assert_clean_failure(f"{argv[0]} server down", await cli(down, *argv, token=TOKEN), "UNAVAILABLE")
        # a second `up` on the port in use
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "syncplane", "up", "--data-dir", str(tmp_path / "second"), "--listen",
            f"127.0.0.1:{server.port}", "--no-defaults", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = (b.decode() for b in await asyncio.wait_for(proc.communicate(), 120))
        # `up` logs to stderr; the failure is its last line
        last = err.rstrip("\n").splitlines()[-1:]
        assert proc.returncode != 0 and "Traceback" not in out + err, err
        assert last and last[0].startswith("error: cannot listen on 127.0.0.1:"), err
    finally:
        server.stop()


def readme_error_example() -> tuple[str, str]:
    """The README's documented validation error: (what is applied, the exact output)."""
    text = README.read_text()
    match = re.search(r"Applying that file with (.+?) prints:\n\n```text\n(error: INVALID_ARGUMENT: .+?)```",
                      text, re.S)
    assert match, "the README documents no validation error example"
    return match.group(1), match.group(2)


async def test_validation_errors_print_once_in_the_readme_format(tmp_path: Path):
    what, documented = readme_error_example()
    changes = dict(re.findall(r"`(\w+): (\d+)`", what))
    assert changes, what
    doc = yaml.safe_load((DEFAULTS / "10-contacts-ingress.yaml").read_text())
    doc["spec"].update({k: int(v) for k, v in changes.items()})
    server = ServerProcess(tmp_path)
    try:
        await server.ready()
        res = await cli(server.port, "apply", "-f", "-", stdin=yaml.safe_dump(doc))
    finally:
        server.stop()
    assert res.returncode == 1
    assert res.stderr == documented, f"printed:\n{res.stderr}\nthe README shows:\n{documented}"


@pytest.mark.parametrize("argv", [["apply", "-f", "-"]])
def test_local_validation_uses_the_same_format(argv: list[str]):
    """A document the CLI refuses before sending (an unknown enum) prints the same shape."""
    bad = yaml.safe_dump({**GOOD, "spec": {**GOOD["spec"], "type": "SIDEWAYS", "colour": "blue"}})
    res = subprocess.run([sys.executable, "-m", "syncplane", "--server", f"127.0.0.1:{free_port()}", *argv],
                         input=bad, capture_output=True, text=True, timeout=60)
    lines = res.stderr.splitlines()
    assert res.returncode == 1 and lines[0] == "error: INVALID_ARGUMENT: 1 invalid field", res.stderr
    assert lines[1].startswith("  spec."), res.stderr
