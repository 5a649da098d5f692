"""Fixtures of the image tier: the image built once per session (cached by scripts/build-image.sh when its
inputs are unchanged), and a working container of it per test module.

A missing buildah or debootstrap, or a failed build, is an error of every test here, never a skip.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.image.buildah import Image


@pytest.fixture(scope="session")
def image() -> Image:
    return Image.build()


@pytest.fixture(scope="module")
def container(image: Image) -> Iterator[str]:
    name = image.container(f"syncplane-test-{uuid.uuid4().hex[:8]}")
    try:
        yield name
    finally:
        image.remove(name)
