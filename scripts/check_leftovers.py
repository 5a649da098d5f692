"""After the test tiers: fail if any test-cluster or worker process, or image-tier container, survived."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

CACHE = Path(os.environ.get("SYNCPLANE_CACHE", Path.home() / ".cache" / "syncplane"))
#: This checkout: only its own workers count (another checkout's test run may be going on beside it).
ROOT = Path(__file__).resolve().parents[1]
TEST_CONTAINER = "syncplane-test-"   # the image tier's working containers (tests/image/conftest.py)
CLUSTER_BINARIES = {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"}


def leftovers() -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "exe", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.info["pid"] == os.getpid():
            continue
        exe = proc.info["exe"] or ""
        cmd = proc.info["cmdline"] or []
        from_cache = exe.startswith(str(CACHE)) and Path(exe).name in CLUSTER_BINARIES
        test_worker = ("syncplane" in " ".join(cmd[:3]) and "worker" in cmd and any("pytest-of-" in c for c in cmd)
                       and bool(cmd) and cmd[0].startswith(str(ROOT) + os.sep))
        image_run = bool(cmd) and Path(cmd[0]).name == "buildah" and any(c.startswith(TEST_CONTAINER) for c in cmd)
        if from_cache or test_worker or image_run:
            found.append(f"pid {proc.info['pid']}: {' '.join(cmd)[:160]}")
    if shutil.which("buildah"):
        names = subprocess.run(["buildah", "--storage-driver", "vfs", "containers", "--noheading", "--format",
                                "{{.ContainerName}}"], capture_output=True, text=True, check=False).stdout.split()
        found += [f"buildah container {n}" for n in names if n.startswith(TEST_CONTAINER)]
    return found


if __name__ == "__main__":
    left = leftovers()
    if left:
        print("processes left behind by the tests:", *left, sep="\n  ")
        sys.exit(1)
    print("no test-cluster or worker processes left behind")
