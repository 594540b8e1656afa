"""The kernel datapath: the bridge forwards every pod, and each host veth's link statistics count it.

The overlay already bridges each host veth; per pod, this datapath keeps only the source validation's
set elements (sknf.guard: each pod's MAC and addresses), and counters come from the kernel's own
per-link figures (the host veth's rx is what the pod sent) plus the guard's drops by reason. The
kernel cannot tell a fast path from a kernel path, so those figures stay None.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sknf import guard, netlink
from sknf.config import HOST_VETH_PREFIX, Config
from sknf.datapath import Endpoint, NodeNet, PodCounters, pins, tc

log = logging.getLogger(__name__)

NET_DEV_FIELDS = ("rx_bytes", "rx_packets", "rx_errors", "rx_dropped", "rx_fifo", "rx_frame", "rx_compressed",
                  "rx_multicast", "tx_bytes", "tx_packets", "tx_errors", "tx_dropped", "tx_fifo", "tx_collisions",
                  "tx_carrier", "tx_compressed")


def host_veth_stats() -> dict[str, dict[str, int]]:
    """{name: link statistics} of every pod host veth in this thread's namespace.

    Read from /proc/thread-self/net/dev, not a netlink link dump: for 4,000 links the dump costs
    2 s of attribute decoding in pyroute2, the text file 10 ms, and a scrape reads this every time.
    """
    out = {}
    with open("/proc/thread-self/net/dev") as f:
        for line in f.readlines()[2:]:
            name, _, numbers = line.partition(":")
            name = name.strip()
            if name.startswith(HOST_VETH_PREFIX):
                out[name] = dict(zip(NET_DEV_FIELDS, map(int, numbers.split()), strict=False))
    return out


class KernelDatapath:
    mode = "kernel"

    def __init__(self, cfg: Config, reason: str = "") -> None:
        self.cfg = cfg
        self.reason = reason
        self._generation: int | None = None  # nf_tables' generation as this reconcile began
        self._verified: tuple[int, list] | None = None  # (generation, pods) the guard last matched

    def setup_node(self, node: NodeNet) -> None:
        """The source-validation table (the overlay sets the br_netfilter sysctl Service NAT needs).

        Read before anything is listed: any change after it (by hand, another tool) bumps it, so a
        reconcile that finds the generation it last verified, and the same pods, has nothing to check."""
        self._generation = guard.generation()
        if (self._verified is None or self._verified[0] != self._generation) and guard.ensure():
            self._verified = None

    def attach_pod(self, ep: Endpoint) -> None:
        """The pod's guard elements: the bridge port the overlay made is the rest of the datapath."""
        guard.add_pod(ep.host_ifname, ep.mac, ep.sources)

    def detach_pod(self, ep: Endpoint) -> None:
        """Its guard elements go (and their counters), and its address from its siblings; the link
        statistics go with the link."""
        guard.remove_pod(ep.host_ifname, ep.mac, ep.sources, ep.ip if ep.siblings else None)

    def sync_endpoints(self, eps: list[Endpoint]) -> None:
        pods = [(ep.host_ifname, ep.mac, tuple(ep.sources)) for ep in eps]
        gen = self._generation
        if gen is not None and self._verified == (gen, pods):
            return
        changed = guard.sync(pods)
        self._verified = None if changed or gen is None else (gen, pods)

    def read_counters(self) -> dict[str, PodCounters]:
        links = host_veth_stats()
        refused = guard.drops()
        out = {}
        for name, s in links.items():
            by_reason = refused.get(name) or dict.fromkeys(guard.REASONS, 0)
            out[name] = PodCounters(rx_bytes=s.get("tx_bytes", 0), rx_packets=s.get("tx_packets", 0),
                                    tx_bytes=s.get("rx_bytes", 0), tx_packets=s.get("rx_packets", 0),
                                    drops=s.get("rx_dropped", 0) + s.get("tx_dropped", 0) + sum(by_reason.values()),
                                    refused=by_reason)
        return out

    def close(self) -> None:
        """Nothing runs in the background."""

    def cleanup(self) -> None:
        """Remove what an earlier eBPF run left (filters, pins), so switching modes leaves nothing stale."""
        remove_bpf_leftovers(self.cfg.bpf_pin_dir)


def remove_bpf_leftovers(pin_dir: Path) -> None:
    """Every sknf tc filter in this namespace and every pin under pin_dir; needs no BCC."""
    with netlink.route() as ipr:
        removed = tc.detach_everywhere(ipr)
    unpinned = pins.remove_pins(pin_dir)
    if removed or unpinned:
        log.info("removed eBPF datapath state: %d tc filters%s", removed, f", pins under {pin_dir}" if unpinned else "")
