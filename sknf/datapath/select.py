"""Choosing the datapath at agent start: `datapath: bpf|kernel|auto` in the configuration.

`auto` tries the eBPF datapath and falls back to the kernel path on any reason it cannot run here
(no BCC, no kernel headers, a compile error, a verifier rejection, no clsact); the reason is logged
once and kept on the datapath for the metrics and `sknf stats`. Choosing the kernel path removes
whatever an earlier eBPF run left, so a mode switch across a restart leaves no stale filters or pins.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sknf import guard
from sknf.config import Config
from sknf.datapath import Datapath
from sknf.datapath.bpf import BPF_DIR, BpfDatapath, BpfUnavailable
from sknf.datapath.kernel import KernelDatapath, remove_bpf_leftovers

log = logging.getLogger(__name__)


def choose(cfg: Config, bpf_dir: Path = BPF_DIR) -> Datapath:
    """The datapath cfg asks for; BpfUnavailable only when `datapath: bpf` cannot be honoured."""
    if cfg.datapath == "kernel":
        return _kernel(cfg, "datapath: kernel in config")
    try:
        return BpfDatapath(cfg, bpf_dir)
    except BpfUnavailable as e:
        if cfg.datapath == "bpf":
            raise
        log.warning("eBPF datapath unavailable, using the kernel path: %s", e)
        return _kernel(cfg, str(e))


def _kernel(cfg: Config, reason: str) -> KernelDatapath:
    dp = KernelDatapath(cfg, reason)
    dp.cleanup()
    return dp


def cleanup_all(cfg: Config) -> None:
    """Uninstall: whichever mode ran last, remove every sknf filter and pin (no BCC needed) and the kernel
    datapath's nftables guard."""
    remove_bpf_leftovers(cfg.bpf_pin_dir)
    guard.remove()
