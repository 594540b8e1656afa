"""What a torn-down lab must not leave behind, read from the kernel and /proc (not from the lab's own state)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from sknf import lab as labmod
from sknf.lab import Lab


def netns_with_prefix(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(f"{prefix}-"))
    except FileNotFoundError:
        return []


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains text (the lab's per-node config path names its agents)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and int(entry.name) != os.getpid():
                found.append(int(entry.name))
    return found


def assert_lab_gone(prefix: str, pids: list[int]) -> None:
    root = labmod.ROOT / prefix
    assert netns_with_prefix(prefix) == []
    assert not root.exists(), f"{root} is still there"
    assert [pid for pid in pids if labmod._alive(pid)] == []
    assert processes_mentioning(f"{root}/") == []


def reap_stale_lab(prefix: str) -> None:
    """Take down a lab of this prefix that a killed earlier run left behind (its state file survived it).

    Only processes whose command line names the lab's directory (agents) or its namespaces (test servers) are
    signalled: a recorded PID the kernel has since handed to someone else is left alone."""
    if not (labmod.ROOT / prefix / "state.json").exists():
        return
    print(f"leftovers: taking down lab {prefix!r} left by an earlier run", file=sys.stderr)
    stale = Lab.load(prefix)
    ours = set(processes_mentioning(f"{stale.root}/")) | set(processes_mentioning(f"/run/netns/{prefix}-"))
    for node in stale.state.nodes:
        node.agent_pid = node.agent_pid if node.agent_pid in ours else 0
    if stale.state.server_pid not in ours:
        stale.state.server_pid = 0
    stale.down()


@contextlib.contextmanager
def managed_lab(prefix: str, **kwargs: object) -> Iterator[Lab]:
    """A test module's lab: a stale one of the same prefix is reaped first, and once this one is down nothing
    of it may remain (agents a test restarted included)."""
    reap_stale_lab(prefix)
    pids: list[int] = []
    try:
        with Lab(prefix=prefix, **kwargs) as built:
            pids = [n.agent_pid for n in built.state.nodes]
            try:
                yield built
            finally:
                pids += [n.agent_pid for n in built.state.nodes]
    finally:
        assert_lab_gone(prefix, pids)
