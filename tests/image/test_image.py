"""The container image, built by `make image` (buildah) and run as a container runtime runs it.

The entrypoint and user come from the image's own config; the worker runs inside the image's root filesystem
as that user, on the host's loopback, against the sandbox; the layers are read as a registry receives them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import subprocess
from pathlib import Path

import pytest

from syncplane.model.convert import spec_to_dict
from syncplane.sandbox import SeedSpec, start_sandbox
from syncplane.worker.checkpoints import SqliteWorkerState
from syncplane_operator.builders import build_worker_deployment
from tests.image.buildah import OUT, ROOT, Image, chown_tree, layer_files, oci_config
from tests.integration.ingress_env import (
    actual_profiles,
    converge,
    diff,
    expected_profiles,
    ingress_spec,
    prepare,
    profile_key_count,
    profiles_match,
)

# The user the chart's pods and the operator's worker pods run as; the image must run as the same one.
POD_SECURITY = build_worker_deployment("wf", "ns", "h", 1, 1)["spec"]["template"]["spec"]["securityContext"]
UID, GID = POD_SECURITY["runAsUser"], POD_SECURITY.get("runAsGroup", POD_SECURITY["runAsUser"])


def test_the_entrypoint_runs_server_operator_and_worker_as_the_non_root_user(image: Image, container: str) -> None:
    assert image.config["User"] == f"{UID}:{GID}"
    assert image.config["Entrypoint"] == ["syncplane"]
    assert image.exec(container, ["id", "-u"]).stdout.strip() == str(UID)
    for command in ("server", "operator", "worker"):
        done = image.run(container, [command, "--help"])
        assert done.returncode == 0, done.stderr
        assert f"Usage: syncplane {command} [OPTIONS]" in done.stdout
        assert "Traceback" not in done.stderr
    # The virtualenv's Python is 3.11, which the lock file was resolved for, and it holds no installer.
    probe = image.exec(container, ["python3", "-c", "import sys, importlib.util as u; "
                                   "print(sys.version_info[:2], u.find_spec('pip') is None)"])
    assert probe.stdout.strip() == "(3, 11) True", probe.stderr


@pytest.mark.timeout(900)
async def test_a_worker_from_the_image_syncs_ingress_and_drains_on_sigterm(image: Image, container: str,
                                                                         tmp_path: Path) -> None:
    sb = await start_sandbox(seed=SeedSpec(contacts=10_000, seed=19))
    data = tmp_path / "data"
    data.mkdir()
    try:
        prepare(sb, data)   # data/secrets/<name>.json, pointing at the sandbox's token endpoints on loopback
        (data / "spec.json").write_text(json.dumps(spec_to_dict(ingress_spec(sb, batch_size=200))))
        chown_tree(data, UID, GID)
        args = ["worker", "--workflow", "imaged", "--generation", "1", "--spec-file", "/data/spec.json",
                "--state-dir", "/data", "--secrets-dir", "/data/secrets"]

        first = image.start(container, args, tmp_path / "worker-1.log", volumes={data: "/data"})
        try:
            await converge(lambda: len(sb.acs.profiles.rows) >= 1_000, 300, "1,000 profiles from the image's worker")
            entry = first.entrypoint()
            assert entry is not None and entry.uids().real == UID
            first.signal(signal.SIGTERM)   # mid-load: the batch in flight finishes, its page is committed
            assert await asyncio.to_thread(first.wait, 90) == 0, first.output()
        finally:
            first.kill()
        assert "drained and stopped" in first.output()
        assert not (data / "imaged.0.worker.json").exists(), "the drained worker removed its state file"
        state = SqliteWorkerState(data / "worker-state.db")
        try:
            assert state.load("imaged", "contact") is not None, "a checkpoint was committed before the exit"
        finally:
            state.close()

        second = image.start(container, args, tmp_path / "worker-2.log", volumes={data: "/data"})
        try:
            expected = expected_profiles(sb)
            await converge(lambda: profiles_match(sb), 600,
                           lambda: "the restarted worker's sync: " + diff(expected, actual_profiles(sb)))
            rows, keys = profile_key_count(sb)
            assert rows == keys == len(expected), "no duplicates across the stop"
            second.signal(signal.SIGTERM)
            assert await asyncio.to_thread(second.wait, 90) == 0, second.output()
        finally:
            second.kill()
        assert "drained and stopped" in second.output()
    finally:
        await sb.stop()


# What only the build may see: the project's tree outside the installed package, and secret-looking files.
SECRET_NAMES = re.compile(r"(^|/)(\.git|\.env|\.netrc|\.pypirc|id_rsa|id_ed25519|id_ecdsa)(/|$)|\.(key|p12|pfx)$")
BUILD_LEFTOVERS = ("src/", "wheels/", "build/", "opt/build/")


def context_files() -> dict[str, str]:
    """sha256 → path of every non-empty file git tracks in the build context's repository."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    out = {}
    for name in filter(None, tracked.decode().split("\0")):
        path = ROOT / name
        if path.is_file() and not path.is_symlink() and path.stat().st_size > 0:
            out[hashlib.sha256(path.read_bytes()).hexdigest()] = name
    return out


def test_the_layers_hold_the_runtime_only_and_nothing_secret_looking(image: Image) -> None:
    assert (OUT / "ref").read_text().strip() == image.ref, "build/image/oci is this image"
    context = context_files()
    files = list(layer_files())
    assert files, "the OCI layout has layers"
    site = "opt/syncplane/lib/python3.11/site-packages/"
    leaks, secrets, leftovers = [], [], []
    for f in files:
        if f.sha256 in context and not f.path.startswith((site + "syncplane/", site + "syncplane_operator/")):
            leaks.append(f"{f.path} (= {context[f.sha256]})")
        if SECRET_NAMES.search(f.path):
            secrets.append(f.path)
        if f.path.startswith(BUILD_LEFTOVERS):
            leftovers.append(f.path)
    assert not leaks, f"files of the build context outside the installed package: {leaks[:10]}"
    assert not secrets, f"secret-looking paths: {secrets[:10]}"
    assert not leftovers, f"build-stage paths: {leftovers[:10]}"
    # Only the package's own modules and data come from the context: no tests, scripts, charts or protos.
    installed = {f.path.removeprefix(site) for f in files if f.path.startswith(site + "syncplane")}
    assert not [p for p in installed if re.search(r"(^|/)(tests?|scripts|charts|proto)/", p)], installed
    assert any(p.startswith("syncplane/defaults/") and p.endswith(".yaml") for p in installed)
    # No private key in any file of any layer (the sandbox's TLS test certificates are made at test time).
    keys = [f.path for f in files if f.private_key]
    assert not keys, f"private keys in the layers: {keys}"
    # The build's arguments (the builder's index and CA bundle) stay in the build stage.
    config = oci_config()
    assert not [e for e in config["config"].get("Env", []) if e.startswith(("PIP_CERT", "PIP_INDEX_URL"))]
    assert "PIP_CERT" not in json.dumps(config.get("history", []))

