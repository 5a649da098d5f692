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


def test_setup_and_the_image_install_the_lock_with_hashes() -> None:
    """Issue 13 item 9: every pip install of the runtime dependencies, in `make setup` and in the
    Dockerfile's build and runtime stages, goes through requirements.lock with --require-hashes, and
    nothing installs the project's dependencies unlocked (the project itself comes after, --no-deps or
    editable over the locked set)."""
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    makefile = makefile[makefile.index("$(VENV_STAMP):"):].split("\n\n")[0]   # the recipe `make setup` runs
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    locked_install = re.compile(r"pip (install|wheel)\b[^\n&]*--require-hashes[^\n&]*-r \S*requirements\.lock")
    assert locked_install.search(makefile), "make setup installs requirements.lock with --require-hashes"
    assert len(locked_install.findall(dockerfile)) == 2, "the image builds and installs the lock with hashes"
    for text in (makefile, dockerfile):
        for cmd in re.findall(r"pip (?:install|wheel)\b[^\n&]*", text):
            assert "requirements.lock" in cmd or "--no-deps" in cmd or "-e '.[dev]'" in cmd \
                or "--upgrade pip" in cmd or "uninstall" in cmd, cmd
