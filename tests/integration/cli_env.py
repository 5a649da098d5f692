"""Running the real `syncplane` CLI as a subprocess against a server's port (never blocking the
loop an in-process server or sandbox runs on): :func:`cli` for a command that ends, and
:func:`cli_process` for one that streams (``watch``)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path


async def cli_process(port: int, *args: str, ca: Path | None = None,
                      token: str | None = None) -> asyncio.subprocess.Process:
    """The CLI started with ``--server <host>:<port>`` (``localhost`` with a CA file, which names
    it, else 127.0.0.1), stdin, stdout and stderr piped. The token goes through the environment,
    as the README advises (a --token flag shows in `ps`)."""
    cmd = [sys.executable, "-m", "syncplane", "--server", f"{'localhost' if ca else '127.0.0.1'}:{port}"]
    env = {k: v for k, v in os.environ.items() if k != "SYNCPLANE_TOKEN"}
    if token:
        env["SYNCPLANE_TOKEN"] = token
    if ca:
        cmd += ["--ca-file", str(ca)]
    return await asyncio.create_subprocess_exec(*cmd, *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, env=env)


async def cli(port: int, *args: str, ca: Path | None = None, token: str | None = None,
              stdin: str | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """The CLI run to its end (``timeout`` seconds at most): its exit code, stdout and stderr."""
    proc = await cli_process(port, *args, ca=ca, token=token)
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else None), timeout)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())
