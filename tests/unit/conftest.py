"""Fixtures shared by the unit tests that talk to the emulated Kubernetes API server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubeapi import ApiServer


@pytest.fixture
def server() -> Iterator[ApiServer]:
    """A Kubernetes API emulation over real HTTP, stopped after the test."""
    srv = ApiServer()
    try:
        yield srv
    finally:
        srv.close()

