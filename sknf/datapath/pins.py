"""The bpf filesystem where sknf pins its maps and programs (cfg.bpf_pin_dir, /sys/fs/bpf/sknf)."""

from __future__ import annotations

import shutil
from pathlib import Path

BPFFS = Path("/sys/fs/bpf")


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding path (longest mount-point prefix in mountinfo)."""
    best, fstype = "", ""
    target = str(path.resolve() if path.exists() else path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mount_point = left.split()[4].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, fstype = mount_point, right.split()[0]
    return fstype


def remove_pins(pin_dir: Path) -> bool:
    """Unpin everything under pin_dir; True if it existed. A path not on bpffs is never touched
    (a mistyped bpf_pin_dir must not turn cleanup into an rm -r of something else)."""
    if not pin_dir.is_dir() or fs_type(pin_dir) != "bpf":
        return False
    shutil.rmtree(pin_dir)
    return True
