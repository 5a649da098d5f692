"""requirements.lock: the runtime dependencies of pyproject.toml, pinned, each with the hashes of its files.

`make setup` and the Dockerfile install it with --require-hashes; `make lock` re-resolves it.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)")


def locked() -> dict[str, tuple[str, list[str]]]:
    """name → (version, hashes), read from the lock's `name==version \\ --hash=sha256:...` entries."""
    out: dict[str, tuple[str, list[str]]] = {}
    text = (ROOT / "requirements.lock").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        m = PIN.match(line)
        if m:
            out[canonicalize_name(m.group(1))] = (m.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", line))
    return out


def test_every_runtime_dependency_is_pinned_within_its_range_with_hashes() -> None:
    pins = locked()
    assert pins and all(hashes for _, hashes in pins.values()), "every pin carries at least one hash"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements.lock: run make lock"
        assert req.specifier.contains(pins[name][0], prereleases=True), \
            f"{req.name}=={pins[name][0]} is outside {req.specifier}: run make lock"
