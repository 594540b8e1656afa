"""The node's overlay: one virtual L2 domain spanning every node's bridge.

Why it looks like this. Pods get addresses from the cluster CIDR with the cluster-wide netmask, so
every pod considers every other pod on-link and ARPs for it directly (the seeds' design). That
makes the cluster one Ethernet segment: each node's `brsknf` is a switch, and `vxsknf` is the
trunk between switches. The VXLAN device runs in FDB mode with learning:

- per remote node, one all-zeros FDB entry pointing at its underlay address. Broadcasts (ARP)
  and unknown unicast are replicated to every node (head-end replication, no multicast needed);
- replies teach the device which VTEP holds which MAC (learning), so unicast goes to one node.

Nothing per pod is programmed across nodes, so pod churn never touches remote nodes. The cost is
ARP flooding proportional to the node count, fine for the cluster sizes sknf targets.

`brsknf` holds the node's gateway address (first host of the node's pod subnet) with the cluster
prefix. That one address is the pods' default gateway and gives the node a connected route to
every pod in the cluster, local or remote, so nodes reach pods without NAT.

A removed node loses its flood entry and every MAC learned behind it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass

from sknf import iptables, netlink
from sknf.config import BRIDGE, HOST_VETH_PREFIX, VXLAN, VXLAN_OVERHEAD, Config
from sknf.peers import Node

log = logging.getLogger(__name__)

SYSCTLS = {
    "net.ipv4.ip_forward": 1,
    # kube-proxy's DNAT must see bridged pod-to-pod frames, or replies from a same-node Service
    # backend reach the client un-NATed (and the eBPF datapath's Service handling relies on it).
    "net.bridge.bridge-nf-call-iptables": 1,
    # Replies may come back over another interface than the request left by (pod -> remote node
    # leaves by the underlay, the reply comes back over the overlay): strict reverse-path filtering
    # would drop them.
    "net.ipv4.conf.all.rp_filter": 2,
    f"net.ipv4.conf.{BRIDGE}.rp_filter": 2,
}
# A pod's router advertisement must never become the node's default route (CVE-2020-10749): the
# overlay's devices take none (pods' IPv6 is dropped anyway, see sknf.guard). Skipped without IPv6.
IPV6_SYSCTLS = {f"net.ipv6.conf.{dev}.accept_ra": 0 for dev in (BRIDGE, VXLAN)}


class OverlayError(RuntimeError):
    pass


@dataclass(frozen=True)
class NodeOverlay:
    """What the reconciler built; the datapath and pod setup need it."""

    underlay_ifindex: int
    underlay_ip: str
    bridge_ifindex: int
    vxlan_ifindex: int
    gateway_ip: str
    gateway_mac: str
    mtu: int
    pod_cidr: ipaddress.IPv4Network


def gateway_of(pod_cidr: ipaddress.IPv4Network) -> str:
    return str(pod_cidr.network_address + 1)


def gateway_mac_of(gateway_ip: str) -> str:
    """0a:58 + the gateway's IPv4 bytes: locally administered, unique per node, the same after any rebuild."""
    return ":".join(f"{b:02x}" for b in (0x0A, 0x58, *ipaddress.IPv4Address(gateway_ip).packed))


def underlay(cfg: Config) -> tuple[int, str, int]:
    """(ifindex, IPv4 address, MTU) of the physical interface VXLAN runs over."""
    with netlink.route() as ipr:
        if cfg.host_physical_if:
            idx = netlink.link_index(ipr, cfg.host_physical_if)
            if idx is None:
                raise OverlayError(f"host_physical_if: no interface named {cfg.host_physical_if!r} on this node")
        else:
            idx = netlink.default_route_ifindex(ipr)
            if idx is None:
                raise OverlayError("host_physical_if: not set and this node has no IPv4 default route to infer it")
        link = ipr.link("get", index=idx)[0]
        ip = netlink.ipv4_of(ipr, idx)
        if ip is None:
            raise OverlayError(f"host_physical_if: {link.get('IFLA_IFNAME')} has no IPv4 address")
        return idx, ip, link.get("IFLA_MTU")


def ensure_node(cfg: Config, pod_cidr: ipaddress.IPv4Network) -> NodeOverlay:
    """Bridge, VXLAN device, sysctls: idempotent, safe after a crash, never disturbs running pods."""
    dev_index, local_ip, underlay_mtu = underlay(cfg)
    mtu = cfg.mtu or underlay_mtu - VXLAN_OVERHEAD
    gateway = gateway_of(pod_cidr)
    with netlink.route() as ipr:
        br = netlink.ensure_bridge(ipr, BRIDGE, mtu, gateway_mac_of(gateway))
        netlink.ensure_only_addr(ipr, br, gateway, cfg.cluster_cidr.prefixlen)
        vx = netlink.ensure_vxlan(ipr, VXLAN, vni=cfg.vxlan_vni, port=cfg.vxlan_port, dev_index=dev_index,
                                  local_ip=local_ip, mtu=mtu, master=br)
        gateway_mac = ipr.link("get", index=br)[0].get("IFLA_ADDRESS")
    for key, value in SYSCTLS.items():
        netlink.sysctl(key, value)
    if os.path.isdir("/proc/sys/net/ipv6"):
        for key, value in IPV6_SYSCTLS.items():
            netlink.sysctl(key, value)
    return NodeOverlay(underlay_ifindex=dev_index, underlay_ip=local_ip, bridge_ifindex=br, vxlan_ifindex=vx,
                       gateway_ip=gateway, gateway_mac=gateway_mac, mtu=mtu, pod_cidr=pod_cidr)


def sync_peers(node: NodeOverlay, peers: list[Node], self_name: str) -> tuple[set[str], set[str]]:
    """Make the VXLAN flood list exactly the other nodes' underlay addresses; returns (added, removed)."""
    wanted = {p.underlay_ip for p in peers if p.name != self_name and p.underlay_ip != node.underlay_ip}
    with netlink.route() as ipr:
        have = netlink.flood_entries(ipr, node.vxlan_ifindex)
        for ip in sorted(wanted - have):
            netlink.add_flood_entry(ipr, node.vxlan_ifindex, ip)
        for ip in sorted(have - wanted):
            netlink.del_flood_entry(ipr, node.vxlan_ifindex, ip)
        if have - wanted:
            netlink.flush_learned_fdb(ipr, node.vxlan_ifindex, have - wanted)
    if wanted - have or have - wanted:
        log.info("overlay peers: +%s -%s", sorted(wanted - have) or "none", sorted(have - wanted) or "none")
    return wanted - have, have - wanted


def ensure_rules(cfg: Config, node: NodeOverlay, peers: list[Node]) -> bool:
    """FORWARD accept and masquerade-on-exit, keeping pod<->node traffic un-NATed; VXLAN only from peers."""
    node_ips = {p.underlay_ip for p in peers} | {node.underlay_ip}
    return iptables.ensure(str(cfg.cluster_cidr), node_ips, cfg.masquerade, node_ips - {node.underlay_ip},
                           cfg.vxlan_port)


def teardown() -> None:
    """Remove the bridge, the VXLAN device and every pod host veth (uninstall)."""
    with netlink.route() as ipr:
        for name in netlink.host_veths(ipr, HOST_VETH_PREFIX):
            netlink.delete_link(ipr, name)
        netlink.delete_link(ipr, VXLAN)
        netlink.delete_link(ipr, BRIDGE)
