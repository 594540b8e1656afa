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

Pods reach the other nodes' own addresses (a node IP, a hostNetwork pod, the `kubernetes` Service's
control-plane endpoint) through the overlay too, not the underlay: a policy rule sends traffic that
pods forward through `brsknf` to a node address via that node's gateway on `vxsknf`. The reply comes
back the same way (the peer's connected route to pods is `brsknf`), so both directions cross the same
conntrack and the same tc hooks, no pod source address ever appears on the underlay (cloud networks
drop those), and the pod keeps its own address (no NAT). Node addresses that are not peers (a managed
control plane) are outside the cluster and masqueraded like the Internet. With `masquerade: false`
the operator routes pod addresses on the underlay, and no rule is installed.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass

from sknf import iptables, netlink
from sknf.config import BRIDGE, HOST_VETH_PREFIX, VXLAN, Config, Network
from sknf.peers import Node, subnet_of

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
    # Pod traffic for a peer node, and Service traffic DNATed to another pod, is routed back out of
    # brsknf, the interface it came in on: the kernel would tell the pod to use the next hop directly
    # (an ICMP redirect), and a pod that obeys skips the node's conntrack for that destination. The
    # effective value is all OR the device's, so both are off.
    "net.ipv4.conf.all.send_redirects": 0,
    f"net.ipv4.conf.{BRIDGE}.send_redirects": 0,
}
# A pod's router advertisement must never become the node's default route (CVE-2020-10749): the
# overlay's devices take none (the datapath also drops RAs pods send, see sknf.guard). Skipped without IPv6.
IPV6_SYSCTLS = {f"net.ipv6.conf.{dev}.accept_ra": 0 for dev in (BRIDGE, VXLAN)}
# Dual-stack: the node routes pods' IPv6 (forwarding on every interface: the host's own interfaces then
# ignore RAs unless their accept_ra is 2, as for any IPv6 router), and kube-proxy's ip6tables rules see
# bridged IPv6 frames as its iptables rules see IPv4 ones.
DUAL_STACK_SYSCTLS = {"net.ipv6.conf.all.forwarding": 1, "net.bridge.bridge-nf-call-ip6tables": 1}
# The kernel's IPv4 neighbour table is one for the whole machine: every pod namespace's ARP entries
# count against it too, and in one L2 domain each pod resolves every pod it talks to directly. The
# default hard limit (gc_thresh3 = 1024) overflows at a few dozen busy pods ("neighbour table
# overflow", dropped connections). sknf sizes it for NEIGH_PER_POD peers per possible pod of this node
# plus two entries per node, with 2x headroom; gc_thresh2 (soft) is half of it, gc_thresh1 an eighth.
# Values already higher are kept. These sysctls exist only in the initial namespace.
NEIGH_PER_POD = 16
NEIGH_DIR = "/proc/sys/net/ipv4/neigh/default"
NEIGH_DIR6 = "/proc/sys/net/ipv6/neigh/default"  # dual-stack: IPv6's table is a separate one, sized alike
# Pod -> peer node routing: the rule's priority (before the main table) and its own table.
PEER_RULE_PRIORITY = 1500
PEER_ROUTE_TABLE = 4789


class OverlayError(RuntimeError):
    pass


@dataclass(frozen=True)
class NodeOverlay:
    """What the reconciler built; the datapath and pod setup need it."""

    underlay_ifindex: int
    underlay_ip: str
    bridge_ifindex: int
    vxlan_ifindex: int
    gateway_ip: str  # of the first family (IPv4 in a dual-stack cluster)
    gateway_mac: str
    mtu: int
    pod_cidr: Network  # the first family's
    gateway_ip6: str | None = None  # the IPv6 gateway beside an IPv4 one (dual-stack)

    def gateway(self, family: int) -> str | None:
        """The bridge's gateway address of one family."""
        if family == ipaddress.ip_address(self.gateway_ip).version:
            return self.gateway_ip
        return self.gateway_ip6 if family == 6 else None


def gateway_of(pod_cidr: Network) -> str:
    return str(pod_cidr.network_address + 1)


def gateway_mac_of(gateway_ip: str) -> str:
    """0a:58 + the gateway's address folded to four bytes (the XOR of its 32-bit words): all of an IPv4
    one; for an IPv6 one the bits that tell node subnets apart survive (fd00:10:244:1::1 and :2::1 have
    the same last four bytes, and every bridge of an IPv6-only cluster had the same MAC). Locally
    administered, unique per node, the same after any rebuild."""
    packed = ipaddress.ip_address(gateway_ip).packed
    folded = 0
    for i in range(0, len(packed), 4):
        folded ^= int.from_bytes(packed[i:i + 4], "big")
    return ":".join(f"{b:02x}" for b in (0x0A, 0x58, *folded.to_bytes(4, "big")))


def underlay(cfg: Config) -> tuple[int, str, int]:
    """(ifindex, address of the underlay family, MTU) of the physical interface VXLAN runs over."""
    family = cfg.underlay_family
    with netlink.route() as ipr:
        if cfg.host_physical_if:
            idx = netlink.link_index(ipr, cfg.host_physical_if)
            if idx is None:
                raise OverlayError(f"host_physical_if: no interface named {cfg.host_physical_if!r} on this node")
        else:
            idx = netlink.default_route_ifindex(ipr, family)
            if idx is None:
                raise OverlayError(f"host_physical_if: not set and this node has no IPv{family} default route to "
                                   f"infer it (underlay_family {family})")
        link = ipr.link("get", index=idx)[0]
        ip = netlink.address_of(ipr, idx, family)
        if ip is None:
            usable = ": global scope, duplicate address detection done" if family == 6 else ""
            raise OverlayError(f"host_physical_if: {link.get('IFLA_IFNAME')} has no usable IPv{family} address "
                               f"(underlay_family {family}{usable})")
        return idx, ip, link.get("IFLA_MTU")


def ensure_node(cfg: Config, pod_cidrs: Network | tuple[Network, ...]) -> NodeOverlay:
    """Bridge, VXLAN device, sysctls: idempotent, safe after a crash, never disturbs running pods.

    The bridge holds the gateway of each family's pod subnet with that family's cluster prefix."""
    subnets = pod_cidrs if isinstance(pod_cidrs, tuple) else (pod_cidrs,)
    dev_index, local_ip, underlay_mtu = underlay(cfg)
    mtu = cfg.mtu or underlay_mtu - cfg.vxlan_overhead
    gateway = gateway_of(subnets[0])
    gateway6 = next((gateway_of(n) for n in subnets[1:] if n.version == 6), None)
    with netlink.route() as ipr:
        br = netlink.ensure_bridge(ipr, BRIDGE, mtu, gateway_mac_of(gateway))
        netlink.ensure_only_addrs(ipr, br, [(gateway_of(n), cfg.cidr(n.version).prefixlen) for n in subnets])
        vx = netlink.ensure_vxlan(ipr, VXLAN, vni=cfg.vxlan_vni, port=cfg.vxlan_port, dev_index=dev_index,
                                  local_ip=local_ip, mtu=mtu, master=br)
        gateway_mac = ipr.link("get", index=br)[0].get("IFLA_ADDRESS")
    for key, value in SYSCTLS.items():
        netlink.sysctl(key, value)
    if 6 in ip_families():
        for key, value in IPV6_SYSCTLS.items():
            netlink.sysctl(key, value)
    if 6 in cfg.families:
        for key, value in DUAL_STACK_SYSCTLS.items():
            netlink.sysctl(key, value)
    return NodeOverlay(underlay_ifindex=dev_index, underlay_ip=local_ip, bridge_ifindex=br, vxlan_ifindex=vx,
                       gateway_ip=gateway, gateway_mac=gateway_mac, mtu=mtu, pod_cidr=subnets[0], gateway_ip6=gateway6)


def neighbour_thresholds(pod_cidr: ipaddress.IPv4Network, nodes: int) -> dict[str, int]:
    """The gc_thresh values this node needs (see NEIGH_PER_POD)."""
    hard = 2 * ((pod_cidr.num_addresses - 2) * NEIGH_PER_POD + 2 * nodes)
    hard = 1 << (hard - 1).bit_length()  # a power of two, as operators write them
    return {"gc_thresh1": hard // 8, "gc_thresh2": hard // 2, "gc_thresh3": hard}


def ensure_neighbour_capacity(pod_cidr: ipaddress.IPv4Network, nodes: int, neigh_dir: str = NEIGH_DIR) -> str | None:
    """Raise the machine's neighbour-table thresholds to fit (never lower them); returns why it could
    not (outside the initial network namespace, as in the lab), else None."""
    if not os.path.isdir(neigh_dir):
        return f"{neigh_dir} is not here (not the initial network namespace): neighbour table limits left as they are"
    for name, wanted in neighbour_thresholds(pod_cidr, nodes).items():
        path = os.path.join(neigh_dir, name)
        with open(path) as f:
            have = int(f.read())
        if have < wanted:
            with open(path, "w") as f:
                f.write(str(wanted))
    return None


def ensure_neighbour_tables(cfg: Config, pod_cidr: Network, nodes: int) -> str | None:
    """ensure_neighbour_capacity for the table of each family the cluster has. Sized by the IPv4 subnet
    (as many pods as addresses): an IPv6-only node's /64 gives no bound, and its tables are left alone."""
    if pod_cidr.version != 4:
        return None
    dirs = [NEIGH_DIR, *([NEIGH_DIR6] if 6 in cfg.families else [])]
    skipped = [why for d in dirs if (why := ensure_neighbour_capacity(pod_cidr, nodes, d))]
    return skipped[0] if skipped else None


def sync_peers(node: NodeOverlay, peers: list[Node], self_name: str) -> tuple[set[str], set[str]]:
    """Make the VXLAN flood list exactly the other nodes' underlay addresses (all of the underlay family: the
    peer sources check it); returns (added, removed)."""
    wanted = {p.underlay_ip for p in peers if p.name != self_name and p.underlay_ip != node.underlay_ip}
    added, removed = netlink.sync_flood_list(node.vxlan_ifindex, wanted)
    if added or removed:
        log.info("overlay peers: +%s -%s", sorted(added) or "none", sorted(removed) or "none")
    return added, removed


def ip_families() -> tuple[int, ...]:
    """The IP versions this kernel has: (4, 6), or (4,) where IPv6 is disabled (ipv6.disable=1), whose rules
    and routes cannot even be listed."""
    return (4, 6) if os.path.isdir("/proc/sys/net/ipv6") else (4,)


def sync_peer_routes(cfg: Config, node: NodeOverlay, peers: list[Node], self_name: str) -> None:
    """Pod-forwarded traffic for each peer node's address goes via that peer's gateway over the overlay.

    Node addresses are of the underlay family, so only that family's pods reach them this way (the other
    family's rule and table are kept empty). A peer whose pod subnet of that family is not known yet has
    no gateway: its address stays on the main table (the underlay) until it is.
    """
    family = cfg.underlay_family
    cluster = cfg.cidr(family)
    routed = cfg.masquerade and cluster is not None
    wanted = {}
    if routed:
        wanted = {p.underlay_ip: gateway_of(subnet) for p in peers
                  if p.name != self_name and p.underlay_ip != node.underlay_ip and (subnet := subnet_of(p, family))}
    with netlink.route() as ipr:
        for fam in ip_families():
            if fam == family and routed:
                netlink.ensure_source_rule(ipr, priority=PEER_RULE_PRIORITY, src=str(cluster), iifname=BRIDGE,
                                           table=PEER_ROUTE_TABLE)
            else:
                netlink.remove_rules(ipr, PEER_RULE_PRIORITY, fam)
    for fam in ip_families():
        netlink.sync_host_routes(PEER_ROUTE_TABLE, node.bridge_ifindex, wanted if fam == family else {}, fam)


def ensure_rules(cfg: Config, node: NodeOverlay, peers: list[Node], backend: iptables.Backend | None = None) -> bool:
    """FORWARD accept and masquerade-on-exit, keeping pod<->node traffic un-NATed; VXLAN only from peers; in
    the host's iptables backend (the agent detects it once at start; detected here when not given), each
    family in its own tool (iptables, ip6tables). Node addresses and VXLAN are the underlay family's."""
    node_ips = {p.underlay_ip for p in peers} | {node.underlay_ip}
    backend = backend or iptables.detect()
    changed = False
    for family in (4, 6):
        cidr = cfg.cidr(family)
        underlay = family == cfg.underlay_family
        if cidr is None and not underlay and family == 6:
            continue  # no IPv6 anywhere: ip6tables is left alone (it may not even be usable)
        ips = node_ips if underlay else set()
        changed |= iptables.ensure(backend if family == 4 else backend.v6(), str(cidr) if cidr else None, ips,
                                   cfg.masquerade, ips - {node.underlay_ip} if underlay else None, cfg.vxlan_port)
    return changed


def teardown() -> None:
    """Remove the peer routing, the bridge, the VXLAN device and every pod host veth (uninstall)."""
    with netlink.route() as ipr:
        for family in ip_families():
            netlink.remove_rules(ipr, PEER_RULE_PRIORITY, family)
            netlink.sync_host_routes(PEER_ROUTE_TABLE, 0, {}, family)
        for name in netlink.host_veths(ipr, HOST_VETH_PREFIX):
            netlink.delete_link(ipr, name)
        netlink.delete_link(ipr, VXLAN)
        netlink.delete_link(ipr, BRIDGE)
