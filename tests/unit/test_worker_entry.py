"""`syncplane worker` (every worker process and pod) starts without the rest of the command line: the
gRPC client, the service stubs and YAML cost each worker start CPU it never uses (issue 17, many
workers starting at once on two cores). Checked in a fresh interpreter, by what it has imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from syncplane.cli import cli
from syncplane.worker.command import worker

# What a worker never uses, by the command line's imports (each was imported by every worker before).
NOT_IN_A_WORKER = ["grpc", "yaml", "syncplane.cli", "syncplane.client", "syncplane.api",
                   "syncplane.proto.v1.workflow_service_pb2"]

PROGRAM = """
import sys
from syncplane.entry import main
try:
    main(["worker", "--help"])
except SystemExit:
    pass
# what the command imports when it runs a worker (its function-level imports), on both platforms
import syncplane.worker.main, syncplane.worker.platform.kubernetes, syncplane.worker.platform.embedded
print("\\n".join(sorted(sys.modules)))
"""


@pytest.fixture(scope="module")
def worker_modules() -> set[str]:
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True)
    assert "syncplane worker [OPTIONS]" in out.stdout
    return set(out.stdout.split())


@pytest.mark.parametrize("module", NOT_IN_A_WORKER)
def test_a_worker_does_not_import(worker_modules, module):
    assert module not in worker_modules, f"`syncplane worker` imports {module}"


def test_the_command_line_runs_the_same_worker_command():
    assert cli.commands["worker"] is worker


def test_other_commands_still_go_through_the_command_line():
    out = subprocess.run([sys.executable, "-m", "syncplane", "list", "--help"], capture_output=True, text=True,
                         check=True)
    assert "Usage: syncplane list" in out.stdout


@pytest.mark.parametrize(("args", "code", "says"), [
    (["worker"], 2, "Missing option '--workflow'"),
    (["worker", "--workflow", "w", "--generation", "x", "--spec-file", "/"], 2, "'x' is not a valid integer"),
    (["worker", "--bogus"], 2, "No such option '--bogus'"),
], ids=["missing-option", "bad-value", "unknown-option"])
def test_a_worker_usage_error_is_one_error_line(args, code, says):
    """The worker's own entry path has the command line's error boundary: one `error:` line, exit 2."""
    out = subprocess.run([sys.executable, "-m", "syncplane", *args], capture_output=True, text=True)
    assert out.returncode == code, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], out.stderr
    assert "(see 'syncplane worker --help')" in lines[0]
