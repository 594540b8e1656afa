"""`sknf cleanup`: remove everything sknf made on this node (the uninstall step).

The order follows dependencies: the plugin and conflist go first, so the runtime stops handing pods to
sknf; then the datapath's tc filters and bpffs pins; the overlay (bridge, VXLAN device, pod host veths);
sknf's iptables chains and the jumps to them; the state and run directories; last this Node's sknf.io/
annotations, so other nodes drop it as a peer. Every step is idempotent and runs even when an earlier one
failed (each failure is reported, and the exit status says so): rerunning finishes what a broken run left.
Sysctls (ip_forward, bridge-nf-call-iptables, rp_filter) stay as they are: kube-proxy and whatever network
comes next need them too.

It refuses to run while an agent answers on the socket, because that agent would rebuild everything at its
next reconcile: delete the DaemonSet first (docs/install.md), or pass --force.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from sknf import config
from sknf.config import Config


class CleanupError(RuntimeError):
    pass


def agent_running(cfg: Config) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(cfg.socket_path))
        except OSError:
            return False
    return True


def remove_dir(path: Path) -> list[str]:
    """Remove a directory sknf owns; a mount point (a container's hostPath) is emptied and kept.

    The path must say sknf somewhere (/var/lib/sknf, /run/sknf-lab/<lab>/n1/state): a mistyped
    setting such as state_dir: /var/lib never empties a directory others use.
    """
    if not any("sknf" in part for part in path.parts):
        raise CleanupError(f"{path}: not removing a directory whose path does not say sknf")
    if not path.exists():
        return []
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    try:
        path.rmdir()
    except OSError:  # busy: a mount point; its contents are gone, which is what matters
        return [f"{path}/*"]
    return [str(path)]


def _plugin(cfg: Config) -> list[str]:
    from sknf import install

    return [str(p) for p in install.uninstall(cfg)]


def _datapath(cfg: Config) -> list[str]:
    from sknf.datapath.select import cleanup_all

    cleanup_all(cfg)
    return [f"tc filters sknf_*, pins under {cfg.bpf_pin_dir}, nftables table bridge sknf"]


def _policy(cfg: Config) -> list[str]:
    from sknf.policy import nft as policy_nft

    return [f"nftables table {policy_nft.FAMILY} {policy_nft.TABLE}"] if policy_nft.remove() else []


def _overlay(cfg: Config) -> list[str]:
    from sknf import overlay

    overlay.teardown()
    return [f"links {config.BRIDGE}, {config.VXLAN}, {config.HOST_VETH_PREFIX}*"]


def _iptables(cfg: Config) -> list[str]:
    from sknf import iptables

    iptables.teardown()
    return ["iptables chains " + ", ".join(chain for _, _, chain in iptables.JUMPS) + " and their jumps"]


def _files(cfg: Config) -> list[str]:
    return remove_dir(cfg.state_dir) + remove_dir(cfg.run_dir)


def _annotations(cfg: Config) -> list[str]:
    if cfg.peer_source != "kubernetes":
        return []
    from sknf import kube

    return [f"annotation {key} on node {cfg.node_name}" for key in kube.remove_annotations(cfg)]


STEPS: list[tuple[str, Callable[[Config], list[str]]]] = [
    ("cni plugin", _plugin),
    ("datapath", _datapath),
    ("network policy", _policy),
    ("overlay", _overlay),
    ("iptables", _iptables),
    ("files", _files),
    ("annotations", _annotations),
]


def cleanup(cfg: Config, out: Callable[[str], None] = print) -> list[str]:
    """Run every step; returns the failures as "step: error" (empty when everything is gone)."""
    failures = []
    for name, step in STEPS:
        try:
            for item in step(cfg):
                out(f"removed {item}")
        except Exception as e:  # keep going: each step is independent, a rerun retries the failed ones
            failures.append(f"{name}: {type(e).__name__}: {e}")
    return failures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, help="agent configuration file (YAML); env vars win")
    parser.add_argument("--force", action="store_true", help="run even though an agent answers on the socket")


def run(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    if agent_running(cfg) and not args.force:
        print(f"sknf cleanup: an agent is serving on {cfg.socket_path} and would rebuild everything; stop it "
              "first (kubectl -n kube-system delete daemonset sknf) or pass --force", file=sys.stderr)
        return 1
    failures = cleanup(cfg)
    for failure in failures:
        print(f"sknf cleanup: {failure}", file=sys.stderr)
    return 1 if failures else 0
