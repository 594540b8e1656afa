"""Datapaths: how pod packets move once the overlay exists (Flannel's backend split, two backends).

Both datapaths share everything the overlay builds (bridge, VXLAN, veths, iptables): that is what
the kernel path forwards over, and what ARP, the gateway and Services always use. The BPF datapath
adds tc programs that forward pod traffic on a fast path and count it per pod; the kernel datapath
leaves forwarding to the bridge and reads per-pod figures from each host veth's link statistics.

The agent picks one at start (`datapath: auto|bpf|kernel`); `auto` tries BPF and falls back to the
kernel path, saying why once.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Protocol

# Why source validation refused a pod's frame: bpf/lib/common.h's enum refused_reason, in its order, and
# sknf.guard's nftables counter sets.
REFUSED_REASONS = ("spoofed_mac", "spoofed_arp", "spoofed_ip", "ipv6", "protocol")


@dataclass(frozen=True)
class Endpoint:
    """A pod's attachment as the datapath sees it (built from its IPAM lease and its host veth)."""

    ip: str  # the IPv4 address (an IPv6-only cluster's IPv6 one)
    mac: str  # the pod-side interface's MAC
    host_ifname: str
    host_ifindex: int
    container_id: str
    ifname: str
    namespace: str = ""
    pod: str = ""
    shaped_to_pod: bool = False  # a qdisc on the host veth shapes what the pod receives (sknf.shaping)
    shaped_from_pod: bool = False  # what the pod sends is redirected to its ifb and shaped there
    # Addresses of the container's other attachments: Linux may send eth1's address out of eth0, so
    # source validation allows every address leased to the container on each of its interfaces.
    siblings: tuple[str, ...] = ()
    ip6: str = ""  # the IPv6 address beside the IPv4 one (dual-stack)

    @property
    def sources(self) -> tuple[str, ...]:
        """Every source this attachment may send from, both families; with IPv6, its link-local address too
        (the kernel derives it from the MAC, see link_local)."""
        found = {self.ip, self.ip6, *self.siblings} - {""}
        if any(":" in ip for ip in found):
            found.add(link_local(self.mac))
        return tuple(sorted(found))


def link_local(mac: str) -> str:
    """The EUI-64 IPv6 link-local address the kernel gives an interface with this MAC (addr_gen_mode 0)."""
    b = bytes.fromhex(mac.replace(":", ""))
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + bytes([b[0] ^ 2, b[1], b[2], 0xFF, 0xFE, *b[3:]])))


@dataclass
class PodCounters:
    """Traffic of one pod, seen from the pod: rx = delivered to it, tx = sent by it."""

    rx_bytes: int = 0
    rx_packets: int = 0
    tx_bytes: int = 0
    tx_packets: int = 0
    fast_packets: int | None = None  # None where the datapath cannot tell (kernel mode)
    kernel_packets: int | None = None
    drops: int = 0
    # Frames the source validation refused, by reason (sknf.guard.REASONS); included in drops.
    refused: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeNet:
    """Facts about this node's overlay that a datapath needs."""

    bridge_ifindex: int
    vxlan_ifindex: int
    gateway_ip: str
    gateway_mac: str
    cluster_cidrs: tuple[str, ...]  # one network per family, IPv4 first
    pod_cidrs: tuple[str, ...]  # this node's subnets, in the same order


class Datapath(Protocol):
    mode: str  # "bpf" or "kernel"
    reason: str  # why this mode (e.g. the fallback cause); "" when chosen plainly

    def setup_node(self, node: NodeNet) -> None:
        """Idempotently prepare node-wide pieces (programs on vxsknf, maps, sysctls)."""

    def attach_pod(self, ep: Endpoint) -> None:
        """Make the pod's fast path and counters live; must be idempotent."""

    def detach_pod(self, ep: Endpoint) -> None:
        """Forget the pod; must succeed when it is already gone."""

    def sync_endpoints(self, eps: list[Endpoint]) -> None:
        """Reconcile to exactly these endpoints (after a restart, or to drop stale entries)."""

    def read_counters(self) -> dict[str, PodCounters]:
        """Per-pod counters keyed by the pod's host_ifname."""

    def close(self) -> None:
        """Agent shutdown: stop background work; filters, maps and pins stay so pods keep forwarding."""

    def cleanup(self) -> None:
        """Remove every filter, program and pin this datapath made (mode switch, uninstall)."""
