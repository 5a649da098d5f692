"""The built image, run the way a container runtime would run it: buildah, chroot isolation, vfs storage.

`Image.build()` runs scripts/build-image.sh (cached when nothing changed) and reads the image's config.
`Image.run` starts the image's entrypoint as the image's user in a working container of it, with the host's
loopback (chroot isolation shares the host's network) and the given host directories mounted. The layers are
read from the OCI layout the build script writes (build/image/oci), as a registry would receive them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-image.sh"
OUT = ROOT / "build" / "image"
BUILDAH = ["buildah", "--storage-driver", "vfs"]
# A PEM private key: the armour lines around a base64 body (a library holding the header alone is no key).
PRIVATE_KEY = re.compile(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----\r?\n[A-Za-z0-9+/=:, \r\n-]{40,}?"
                         rb"-----END \1PRIVATE KEY-----")


def buildah(*args: str, timeout: float = 300) -> str:
    done = subprocess.run([*BUILDAH, *args], capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"buildah {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}"
    return done.stdout.strip()


@dataclass
class Container:
    """One `buildah run` of the image: a process tree whose innermost process is the entrypoint."""

    proc: subprocess.Popen[bytes]
    log: Path
    out: Any = field(repr=False)   # the log file, open for the process

    def entrypoint(self) -> psutil.Process | None:
        """The entrypoint's process: the deepest descendant of `buildah run` that is not buildah itself."""
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        ours = [p for p in kids if _is_entrypoint(p)]
        return ours[-1] if ours else None

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the entrypoint, as a runtime signals a container's first process.

        `buildah run --isolation chroot` does not forward signals (a SIGTERM to it kills its child), so
        the signal goes to the process inside the chroot itself.
        """
        target = self.entrypoint()
        assert target is not None, f"no entrypoint process under buildah run (pid {self.proc.pid})"
        target.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is not None:
                self.out.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            target = self.entrypoint()
            if target is not None:
                target.kill()
            self.proc.kill()
            self.proc.wait()
        self.out.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _is_entrypoint(p: psutil.Process) -> bool:
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return False
    return bool(cmd) and "buildah" not in Path(cmd[0]).name and any("syncplane" in part for part in cmd[:2])


@dataclass(frozen=True)
class Image:
    ref: str
    config: dict[str, Any]      # the OCI image config's `config`: User, Entrypoint, Env, WorkingDir, ...

    @classmethod
    def build(cls) -> Image:
        """Build (or find cached) the image with scripts/build-image.sh; fails when buildah is missing."""
        done = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=3600, check=False)
        assert done.returncode == 0, f"{BUILD_SCRIPT} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
        ref = done.stdout.strip().splitlines()[-1]
        inspected = json.loads(buildah("inspect", "--type", "image", ref))
        return cls(ref, inspected["OCIv1"]["config"])

    def container(self, name: str) -> str:
        """A fresh working container of the image (removed by `remove`)."""
        subprocess.run([*BUILDAH, "rm", name], capture_output=True, check=False)
        return buildah("from", "--name", name, self.ref)

    @staticmethod
    def remove(container: str) -> None:
        subprocess.run([*BUILDAH, "rm", container], capture_output=True, check=False)

    def exec(self, container: str, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """`argv` itself (not the entrypoint) in the container, as the image's user; raises if it fails."""
        return subprocess.run([*BUILDAH, "run", "--isolation", "chroot", container, "--", *argv],
                              capture_output=True, text=True, timeout=120, check=True)

    def _command(self, container: str, args: Sequence[str], volumes: dict[Path, str] | None,
                 env: dict[str, str] | None, user: str | None) -> list[str]:
        cmd = [*BUILDAH, "run", "--isolation", "chroot"]
        if user is not None:
            cmd += ["--user", user]
        for host, inside in (volumes or {}).items():
            cmd += ["--volume", f"{host}:{inside}"]
        for key, value in (env or {}).items():
            cmd += ["--env", f"{key}={value}"]
        return [*cmd, container, "--", *self.config["Entrypoint"], *args]

    def run(self, container: str, args: Sequence[str], *, volumes: dict[Path, str] | None = None,
            env: dict[str, str] | None = None, user: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The entrypoint with `args`, to completion (as the image's user unless `user` is given)."""
        cmd = self._command(container, args, volumes, env, user)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def start(self, container: str, args: Sequence[str], log: Path, *, volumes: dict[Path, str] | None = None,
              env: dict[str, str] | None = None, user: str | None = None) -> Container:
        """The entrypoint with `args`, in the background; its output goes to `log`."""
        out = open(log, "wb")  # noqa: SIM115 (closed by Container.wait/kill)
        proc = subprocess.Popen(self._command(container, args, volumes, env, user), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
        return Container(proc, log, out)


@dataclass(frozen=True)
class Runtime:
    """A node's container runtime for one image: every container is a `buildah run` in one working container
    of it (vfs copies the whole image per working container; pods write only to their mounted /tmp)."""

    image: Image
    container: str

    def start(self, args: Sequence[str], log: Path, *, volumes: dict[Path, str], env: dict[str, str],
              user: str) -> Container:
        return self.image.start(self.container, args, log, volumes=volumes, env=env, user=user)


@dataclass(frozen=True)
class LayerFile:
    layer: int
    path: str           # without a leading "./" or "/"
    size: int
    sha256: str | None  # regular files only
    private_key: bool   # a PEM private key block in the file's content
    text: str | None    # the content of dpkg's file lists (var/lib/dpkg/info/*.list), None for others


def layer_files(oci_dir: Path = OUT / "oci") -> Iterator[LayerFile]:
    """Every entry of every layer of the (single) image in an OCI layout, in layer order."""
    index = json.loads((oci_dir / "index.json").read_text())
    (entry,) = index["manifests"]
    manifest = json.loads(_blob(oci_dir, entry["digest"]).read_text())
    for n, layer in enumerate(manifest["layers"]):
        with tarfile.open(_blob(oci_dir, layer["digest"]), mode="r:*") as tar:
            for member in tar:
                path = member.name.removeprefix("./").lstrip("/")
                digest, private_key, text = None, False, None
                if member.isfile():
                    f = tar.extractfile(member)
                    assert f is not None
                    content = f.read()
                    digest, private_key = hashlib.sha256(content).hexdigest(), PRIVATE_KEY.search(content) is not None
                    if path.startswith("var/lib/dpkg/info/") and path.endswith(".list"):
                        text = content.decode(errors="replace")
                yield LayerFile(n, path, member.size, digest, private_key, text)


def dpkg_owned(files: list[LayerFile]) -> set[str]:
    """The paths that the image's Debian packages installed (from dpkg's file lists in the layers)."""
    return {line.lstrip("/") for f in files if f.text for line in f.text.splitlines() if line.strip()}


def oci_config(oci_dir: Path = OUT / "oci") -> dict[str, Any]:
    """The image's full OCI config (config, history, rootfs) from the layout."""
    index = json.loads((oci_dir / "index.json").read_text())
    manifest = json.loads(_blob(oci_dir, index["manifests"][0]["digest"]).read_text())
    return dict(json.loads(_blob(oci_dir, manifest["config"]["digest"]).read_text()))


def _blob(oci_dir: Path, digest: str) -> Path:
    algorithm, hexdigest = digest.split(":")
    return oci_dir / "blobs" / algorithm / hexdigest


def chown_tree(path: Path, uid: int, gid: int) -> None:
    """Hand a host directory to the image's user (it runs as `uid`, not root)."""
    for dirpath, _, files in os.walk(path):
        os.chown(dirpath, uid, gid)
        for name in files:
            os.chown(os.path.join(dirpath, name), uid, gid)
