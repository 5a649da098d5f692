"""issue 17: `syncplane server` and `syncplane operator` log their listen address, backend, namespace
scope and version at start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from syncplane import __version__

pytestmark = pytest.mark.k8s


def _first_lines_until(cmd: list[str], env: dict[str, str], log: Path, wanted: str, cluster) -> str:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            cluster.wait_until(f"{wanted!r} in the log of {cmd[3]}",
                               lambda: wanted in log.read_text() or proc.poll() is not None, 60)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return log.read_text()


def test_the_operator_says_what_it_watches(k8s_cluster, workflow_crd, namespace, tmp_path):
    env = {**os.environ, "KUBECONFIG": str(k8s_cluster.kubeconfig), "SYNCPLANE_OPERATOR_RESYNC": "45"}
    text = _first_lines_until([sys.executable, "-m", "syncplane", "operator", "--standalone", "--namespace",
                               namespace, "--liveness", "http://127.0.0.1:0/healthz"], env,
                              tmp_path / "operator.log", f"syncplane operator {__version__}:", k8s_cluster)
    line = next(x for x in text.splitlines() if f"syncplane operator {__version__}:" in x)
    # the port it binds: 0 means any free one, never kopf's reading of it (80)
    assert "listen=http://127.0.0.1:" in line and not any(f"127.0.0.1:{p}/" in line for p in (0, 80)), line
    for part in ("backend=kubernetes", f"namespaces={namespace}", "resync=45s"):
        assert part in line, line


def test_the_server_says_where_it_listens(k8s_cluster, workflow_crd, namespace, tmp_path):
    token = tmp_path / "token"
    token.write_text("a-token-for-the-startup-test\n")
    token.chmod(0o600)
    env = {**os.environ, "KUBECONFIG": str(k8s_cluster.kubeconfig)}
    text = _first_lines_until([sys.executable, "-m", "syncplane", "server", "--backend", "kubernetes", "--namespace",
                               namespace, "--listen", "127.0.0.1:0", "--no-console", "--auth", "token",
                               "--token-file", str(token)], env, tmp_path / "server.log",
                              f"syncplane server {__version__}:", k8s_cluster)
    line = next(x for x in text.splitlines() if f"syncplane server {__version__}:" in x)
    assert "listen=127.0.0.1:" in line and "listen=127.0.0.1:0 " not in line, line   # the bound port
    for part in ("tls=off", "backend=kubernetes", f"namespaces={namespace}", "auth=token", "console=off"):
        assert part in line, line
    assert "a-token-for-the-startup-test" not in text
