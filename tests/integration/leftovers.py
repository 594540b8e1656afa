"""What a torn-down lab must not leave behind, read from the kernel and /proc (not from the lab's own state)."""

from __future__ import annotations

import os
from pathlib import Path

from sknf import lab as labmod


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
