"""Fixtures shared by the integration tests' modules."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def sknf_image() -> str:
    """The real image for the current sources, built once per run (and kept by content digest across runs:
    tests/integration/image.py). Skipped only where podman or debootstrap is missing."""
    missing = [tool for tool in ("podman", "debootstrap") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building the image needs {' and '.join(missing)} (scripts/setup.sh installs them)")
    import image

    tag, took = image.sknf_image()
    print(f"sknf image {tag}: {image.size_mb(tag):.0f} MB, ready in {took:.0f} s")
    return tag
