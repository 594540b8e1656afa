"""A lab left up by a killed run (its state file and agents survive) is reaped before a module builds its own."""

from __future__ import annotations

import subprocess
import sys

import pytest
from leftovers import assert_lab_gone, netns_with_prefix, reap_stale_lab

from sknf import lab as labmod
from sknf.lab import Lab

pytestmark = pytest.mark.root

PREFIX = "skr"  # no other test's prefix starts with it


def test_a_stale_lab_is_reaped() -> None:
    try:
        subprocess.run([sys.executable, "-m", "sknf", "lab", "up", "--prefix", PREFIX, "--nodes", "1", "--pods", "1",
                        "--datapath", "kernel"], check=True, capture_output=True, timeout=180, cwd=labmod.REPO)
        stale = Lab.load(PREFIX)  # what `lab up` left: state, namespaces, a running agent, not our child
        pids = [n.agent_pid for n in stale.state.nodes]
        assert netns_with_prefix(PREFIX) and all(labmod._alive(pid) for pid in pids)
        reap_stale_lab(PREFIX)
        assert_lab_gone(PREFIX, pids)
    finally:
        if (labmod.ROOT / PREFIX / "state.json").exists():
            Lab.load(PREFIX).down()
