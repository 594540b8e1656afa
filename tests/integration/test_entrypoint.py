"""The image's entrypoint links kernel headers for BCC: the host's when it has them, else the image's.

Run for real in a private mount namespace (unshare -m) with a tmpfs over /lib/modules, so the machine's
own /lib/modules is untouched; a fake host tree in a temp dir stands in for the DaemonSet's /host mounts,
and this machine's Debian headers under /usr/src stand in for the ones baked into the image.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "container-entrypoint"
RELEASE = os.uname().release

pytestmark = pytest.mark.root


def run_entrypoint(host_root: Path, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """Run the script as a container would; a stand-in `sknf` reports the links and its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "sknf"
    fake.write_text('#!/bin/sh\necho "args=$*"\n'
                    f'for d in build source; do echo "$d=$(readlink /lib/modules/{RELEASE}/$d)"; done\n')
    fake.chmod(0o755)
    inner = f"mount -t tmpfs skc-modules /lib/modules && exec {SCRIPT} agent --config /etc/sknf/config.yaml"
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", inner], capture_output=True,
                          text=True, timeout=30, check=True,
                          env={"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "SKNF_HOST_ROOT": str(host_root)})
    out = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    return proc.stderr, out


def test_host_headers_are_linked_through_absolute_symlinks(tmp_path: Path) -> None:
    host = tmp_path / "host"
    headers = host / "usr/src" / f"linux-headers-{RELEASE}"
    (headers / "include/linux").mkdir(parents=True)
    (headers / "include/linux/kconfig.h").write_text("/* host */\n")
    modules = host / "lib/modules" / RELEASE
    modules.mkdir(parents=True)
    (modules / "build").symlink_to(f"/usr/src/linux-headers-{RELEASE}")  # as the host's package made it

    stderr, out = run_entrypoint(host, tmp_path)
    assert out["build"] == str(headers)
    assert out["source"] == ""
    assert out["args"] == "agent --config /etc/sknf/config.yaml"
    assert "no kernel headers" not in stderr


def test_a_host_without_headers_gets_the_images(tmp_path: Path) -> None:
    arch = sorted(Path("/usr/src").glob("linux-headers-*-amd64"))
    common = sorted(Path("/usr/src").glob("linux-headers-*-common"))
    if not arch or not common:
        pytest.skip("no Debian kernel headers under /usr/src to stand in for the image's")
    host = tmp_path / "host"
    (host / "lib/modules" / RELEASE).mkdir(parents=True)
    (host / "lib/modules" / RELEASE / "build").symlink_to(f"/usr/src/linux-headers-{RELEASE}")  # dangling

    stderr, out = run_entrypoint(host, tmp_path)
    assert (out["build"], out["source"]) == (str(arch[-1]), str(common[-1]))
    assert f"no kernel headers for {RELEASE} on the host" in stderr
