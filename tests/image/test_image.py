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
from syncplane_operator.builders import build_worker_deployment
from syncplane_sandbox import SeedSpec, start_sandbox
from tests.image.buildah import (
    OUT,
    PRIVATE_KEY,
    ROOT,
    Image,
    LayerFile,
    chown_tree,
    dpkg_owned,
    layer_files,
    oci_config,
)
from tests.integration import ingress_env as env

# The first test builds the image when `make image` has not (debootstrap, syft and a vfs build: many minutes).
pytestmark = pytest.mark.timeout(2400)

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
        env.prepare(sb, data)   # data/secrets/<name>.json, pointing at the sandbox's token endpoints on loopback
        (data / "spec.json").write_text(json.dumps(spec_to_dict(env.ingress_spec(sb, batch_size=200))))
        chown_tree(data, UID, GID)
        args = ["worker", "--workflow", "imaged", "--generation", "1", "--spec-file", "/data/spec.json",
                "--state-dir", "/data", "--secrets-dir", "/data/secrets"]

        first = image.start(container, args, tmp_path / "worker-1.log", volumes={data: "/data"})
        try:
            await env.converge(lambda: len(sb.acs.profiles.rows) >= 1_000, 300,
                               "1,000 profiles from the image's worker")
            entry = first.entrypoint()
            assert entry is not None and entry.uids().real == UID
            first.signal(signal.SIGTERM)   # mid-load: the batch in flight finishes, its page is committed
            assert await asyncio.to_thread(first.wait, 90) == 0, first.output()
        finally:
            first.kill()
        assert "drained and stopped" in first.output()
        assert not (data / "imaged.0.worker.json").exists(), "the drained worker removed its state file"
        stopped_at = len(sb.acs.profiles.rows)

        second = image.start(container, args, tmp_path / "worker-2.log", volumes={data: "/data"})
        try:
            expected = env.expected_profiles(sb)
            await env.converge(lambda: env.profiles_match(sb), 600,
                               lambda: "the restarted worker's sync: " + env.diff(expected, env.actual_profiles(sb)))
            rows, keys = env.profile_key_count(sb)
            assert rows == keys == len(expected), "no duplicates across the stop"
            assert stopped_at < len(expected), "the first worker was stopped mid-load"
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


@pytest.mark.parametrize("algorithm", ["RSA", "EC", "ED25519"])
def test_the_private_key_check_finds_keys_not_their_headers(algorithm: str, tmp_path: Path) -> None:
    options = {"RSA": ["-pkeyopt", "rsa_keygen_bits:2048"], "EC": ["-pkeyopt", "ec_paramgen_curve:P-256"]}
    key = subprocess.run(["openssl", "genpkey", "-algorithm", algorithm, *options.get(algorithm, [])],
                         capture_output=True, check=True).stdout
    pems = [key]
    if algorithm != "ED25519":   # the traditional form ("BEGIN RSA PRIVATE KEY") exists for RSA and EC only
        pems.append(subprocess.run(["openssl", "pkey", "-traditional"], input=key, capture_output=True,
                                   check=True).stdout)
    for pem in pems:
        assert PRIVATE_KEY.search(b"\x7fELF...binary..." + pem + b"...more"), pem[:40]
    # What a TLS library holds: the armour strings it parses, with no key between them.
    assert not PRIVATE_KEY.search(b"\0-----BEGIN RSA PRIVATE KEY-----\0-----END RSA PRIVATE KEY-----\0")
    public = b"-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEab+/cdEF0123\n-----END PUBLIC KEY-----"
    assert not PRIVATE_KEY.search(public)


def context_files() -> dict[str, str]:
    """sha256 → path of every non-empty file git tracks in the build context's repository."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    out = {}
    for name in filter(None, tracked.decode().split("\0")):
        path = ROOT / name
        if path.is_file() and not path.is_symlink() and path.stat().st_size > 0:
            out[hashlib.sha256(path.read_bytes()).hexdigest()] = name
    return out


SITE = "opt/syncplane/lib/python3.11/site-packages/"
PACKAGE = (SITE + "syncplane/", SITE + "syncplane_operator/")


def layer_findings(files: list[LayerFile], context: dict[str, str]) -> list[str]:
    """What should not be in an image: a file of the build context (by content) outside the installed package,
    a secret-looking path, a build-stage path, a test/script/chart/proto file in the package, a private key in a
    file no Debian package installed, the sandbox's emulators. Debian's libgnutls holds keys: its FIPS self-tests'
    public vectors."""
    debian = dpkg_owned(files)
    found = []
    for f in files:
        if f.sha256 in context and not f.path.startswith(PACKAGE):
            found.append(f"from the build context: {f.path} (= {context[f.sha256]})")
        if SECRET_NAMES.search(f.path):
            found.append(f"secret-looking path: {f.path}")
        if f.path.startswith(BUILD_LEFTOVERS):
            found.append(f"build-stage path: {f.path}")
        # (the package's proto/ holds the generated stubs, runtime code; the .proto sources are not)
        if f.path.startswith(PACKAGE) and (re.search(r"/(tests?|scripts|charts)/", f.path)
                                           or f.path.endswith(".proto")):
            found.append(f"not runtime code: {f.path}")
        if f.path.startswith(SITE + "syncplane_sandbox/"):   # the emulators: tests and `make run` only
            found.append(f"the sandbox: {f.path}")
        if f.private_key and f.path not in debian:
            found.append(f"private key: {f.path}")
    return found


def _file(path: str, content: bytes = b"x", *, text: str | None = None) -> LayerFile:
    return LayerFile(1, path, len(content), hashlib.sha256(content).hexdigest(),
                     PRIVATE_KEY.search(content) is not None, text)


KEY = (b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIKqHm0zRtpuB6FEX2EExampleOnlyNotAKeyAtAll12\n"
       b"-----END PRIVATE KEY-----\n")


@pytest.mark.parametrize(("leak", "why"), [
    (_file("app/Makefile", b"the makefile"), "from the build context"),
    (_file(".git/config"), "secret-looking path"),
    (_file("root/.ssh/id_ed25519"), "secret-looking path"),
    (_file("etc/syncplane/tls.key"), "secret-looking path"),
    (_file("src/pyproject.toml", b"other"), "build-stage path"),
    (_file("wheels/x.whl"), "build-stage path"),
    (_file(SITE + "syncplane/tests/test_x.py", b"y"), "not runtime code"),
    (_file(SITE + "syncplane/proto/v1/workflow.proto", b"syntax"), "not runtime code"),
    (_file(SITE + "syncplane_sandbox/d365.py", b"emulator"), "the sandbox"),
    (_file("etc/ssl/private/server.pem", KEY), "private key"),
])
def test_the_layer_check_finds_each_kind_of_leak(leak: LayerFile, why: str) -> None:
    context = {hashlib.sha256(b"the makefile").hexdigest(): "Makefile"}
    clean = [_file("var/lib/dpkg/info/libgnutls30:amd64.list", text="/usr/lib/libgnutls.so.30\n"),
             _file("usr/lib/libgnutls.so.30", b"\0" + KEY),                 # a Debian library's test vectors
             _file(SITE + "syncplane/cli.py", b"the makefile"),             # the package's own files, installed
             _file(SITE + "syncplane/proto/v1/workflow_pb2.py", b"stubs"),  # generated stubs: runtime code
             _file("etc/ssl/certs/ca-certificates.crt", b"-----BEGIN CERTIFICATE-----")]
    assert layer_findings(clean, context) == []
    found = layer_findings([*clean, leak], context)
    assert len(found) == 1 and found[0].startswith(why), found


def test_the_layers_hold_the_runtime_only_and_nothing_secret_looking(image: Image) -> None:
    assert (OUT / "ref").read_text().strip() == image.ref, "build/image/oci is this image"
    files = list(layer_files())
    assert "usr/bin/python3.11" in dpkg_owned(files), "dpkg's file lists were read"
    assert layer_findings(files, context_files()) == []
    installed = {f.path.removeprefix(SITE) for f in files if f.path.startswith(PACKAGE)}
    assert any(p.startswith("syncplane/defaults/") and p.endswith(".yaml") for p in installed)
    # The build's arguments (the builder's index and CA bundle) stay in the build stage.
    config = oci_config()
    assert not [e for e in config["config"].get("Env", []) if e.startswith(("PIP_CERT", "PIP_INDEX_URL"))]
    assert "PIP_CERT" not in json.dumps(config.get("history", []))

