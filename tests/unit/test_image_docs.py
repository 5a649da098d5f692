"""The README's install section shows the image build commands the project uses (issue 19's acceptance):
the `docker build` / `buildah bud` lines are the Dockerfile's own, and the `make image` command has the
options scripts/build-image.sh (what the image tier builds with) passes to buildah."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_install_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("\n## Install on Kubernetes\n", 1)[1].split("\n## ", 1)[0]


def options(argv: list[str]) -> list[tuple[str, str]]:
    """(option, its value up to a placeholder: `<…>` in the README, `$…` in the script) in order."""
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith("-"):
            value = argv[i + 1] if i + 1 < len(argv) else ""
            out.append((arg, re.split(r"[<$]", value, maxsplit=1)[0]))
    return out


def test_the_readmes_build_commands_are_the_dockerfiles() -> None:
    section = readme_install_section()
    shown = [line.split("#")[0].strip() for line in section.splitlines()
             if line.startswith(("docker build ", "buildah bud "))]
    assert len(shown) == 2, shown
    header = [line.removeprefix("#").strip() for line in (ROOT / "Dockerfile").read_text().splitlines()
              if line.startswith("#")]
    assert all(cmd in header for cmd in shown), (shown, header)


def test_the_readmes_make_image_command_is_the_build_scripts() -> None:
    section = readme_install_section()
    block = re.search(r"^buildah --storage-driver vfs bud .*?(?<!\\)$", section, re.M | re.S)
    assert block, "the README shows the command make image runs"
    readme = shlex.split(block[0].replace("\\\n", " "))
    script = (ROOT / "scripts" / "build-image.sh").read_text()
    bah = shlex.split(re.search(r'^bah\(\) \{ (.*) "\$@"; \}$', script, re.M)[1])   # type: ignore[index]
    bud = re.search(r"^\s*bah (bud .*?) >&2$", script, re.M)
    assert bud, "build-image.sh runs buildah bud"
    # "${args[@]}": a CA bundle or an index of the builder's network, when it has one (not shown).
    built = bah + shlex.split(bud[1].replace('"${args[@]}"', "").replace("$ROOT/", ""))
    assert readme[:4] == built[:4] == ["buildah", "--storage-driver", "vfs", "bud"]
    shown, used = options(readme), options(built)
    assert [o for o, _ in shown] == [o for o, _ in used]
    assert all(s.startswith(u) for (_, s), (_, u) in zip(shown, used, strict=True)), (shown, used)
