"""The SBOM beside the image (issue 19, item 3): `make image` writes build/image/sbom.spdx.json by syft
for the image it built, and it lists what the image holds: every Python distribution installed in the
runtime virtualenv, by name and version, and every Debian package of the base (those a vulnerability
scanner such as grype or trivy matches against its database)."""

from __future__ import annotations

import json
import re

from tests.image.buildah import OUT, Image, layer_files

DIST_INFO = re.compile(r"^opt/syncplane/lib/python3\.11/site-packages/([^/]+)-([^/-]+)\.dist-info/METADATA$")
DPKG_LIST = re.compile(r"^var/lib/dpkg/info/([^/:]+)(?::[a-z0-9]+)?\.list$")


def canonicalize_name(name: str) -> str:
    """A Python distribution's name as PEP 503 compares it (dist-info folders use `_`, METADATA `-`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_sbom_lists_every_package_in_the_image(image: Image) -> None:
    assert (OUT / "ref").read_text().strip() == image.ref, "build/image holds this image and its SBOM"
    sbom = json.loads((OUT / "sbom.spdx.json").read_text())
    assert sbom["spdxVersion"].startswith("SPDX-2."), sbom.get("spdxVersion")
    listed = {(canonicalize_name(p["name"]), p.get("versionInfo", "")) for p in sbom["packages"]}
    names = {p["name"] for p in sbom["packages"]}   # Debian's names as they are (`libapt-pkg6.0`)
    dists: set[tuple[str, str]] = set()
    debs: set[str] = set()
    for f in layer_files():
        if m := DIST_INFO.match(f.path):
            dists.add((canonicalize_name(m[1]), m[2]))
        elif m := DPKG_LIST.match(f.path):
            debs.add(m[1])
    assert any(name == "syncplane" for name, _ in dists) and len(dists) > 20, sorted(dists)
    assert "python3" in debs and len(debs) > 20, sorted(debs)
    assert sorted(dists - listed) == [], "Python distributions of the image missing from the SBOM"
    assert sorted(debs - names) == [], "Debian packages of the image missing from the SBOM"
