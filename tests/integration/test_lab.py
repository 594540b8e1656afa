"""The lab in both datapath modes, end to end: every flow of the seed design and of a real cluster works
(node-IP and hostNetwork Services, NodePorts, ICMP errors of Services, kube-proxy in iptables and in
nftables mode), pods reach other nodes only inside the overlay, an agent restart keeps pods as they are,
and tearing down leaves no namespace, state directory or agent process behind. One lab per datapath is
shared by the module's tests; each leaves it as it found it."""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from leftovers import managed_lab

from sknf import netlink, nsutil, overlay
from sknf.ipam import Store
from sknf.lab import (
    METRICS_PORT,
    SERVER_PORT,
    SERVICE_FLOWS,
    Lab,
    LabNode,
    LabPod,
    _alive,
    kubeproxy,
    underlay_pod_frames,
)
from sknf.lab import who as lab_who

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "skm"  # no other test's prefix starts with it: the leftover check matches "skm-*"

# flow name -> how many results a 2-node, 2-pods-per-node lab must produce for it
EXPECTED_FLOWS = {
    "pod->pod same node": 4, "pod->pod across nodes": 8,
    "pod->node (own)": 4, "pod->node (other)": 4,
    "node->pod (own)": 4, "node->pod (own) source": 4, "node->pod (other)": 4, "node->pod (other) source": 4,
    "pod->Internet (SNAT)": 4,
    "pod->ClusterIP TCP same node": 2, "pod->ClusterIP UDP same node": 2,
    "pod->ClusterIP TCP across nodes": 4, "pod->ClusterIP UDP across nodes": 4,
    "pod->kubernetes API (node IP) same node": 2, "pod->kubernetes API (node IP) across nodes": 2,
    "pod->kubernetes API (managed, outside the cluster): SNAT to the node": 4,
    "pod->hostNetwork Service TCP same node": 2, "pod->hostNetwork Service TCP across nodes": 2,
    "pod->hostNetwork Service UDP same node": 2, "pod->hostNetwork Service UDP across nodes": 2,
    "pod->UDP Service, no listener: ECONNREFUSED same node": 1,
    "pod->UDP Service, no listener: ECONNREFUSED across nodes": 2,
    "Internet->NodePort, Cluster policy: SNAT to the node": 2, "Internet->NodePort, Local policy: client kept": 2,
    "bulk TCP across VXLAN": 1, "pod MTU = underlay MTU - 50": 1, "full-MTU datagram across nodes": 1,
    "no pod address on the underlay": 1,
    "bandwidth-annotated pod: egress <= 2 x 50 Mbit/s": 1, "bandwidth-annotated pod: ingress <= 2 x 50 Mbit/s": 1,
}
# what a services-only check produces: the rows through kube-proxy's NAT, and the underlay's counter
SERVICE_ROWS = {flow: n for flow, n in EXPECTED_FLOWS.items()
                if any(word in flow for word in SERVICE_FLOWS) or flow == "no pod address on the underlay"}


@pytest.fixture(scope="module", params=["kernel", "bpf"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    with managed_lab(PREFIX, nodes=2, pods_per_node=2, datapath=request.param, shaped_pod=True) as built:
        yield built


def fastpath_packets(lab: Lab, node: LabNode) -> float:
    """Sum of the node's sknf_pod_fastpath_packets_total, scraped from its agent inside the node's namespace."""
    with nsutil.entered(node.netns):
        sock = socket.create_connection((node.underlay_ip, METRICS_PORT), timeout=5)
    with sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        body = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith("sknf_pod_fastpath_packets_total{"))


def failures(results) -> list[str]:
    return [f"{r.flow}: {r.src} -> {r.dst}: {r.detail}" for r in results if not r.ok]


def pod_wiring(lab: Lab) -> dict[str, tuple]:
    """Per pod, what the kernel holds: eth0's index, MAC and addresses, and the host veth's index and master."""
    out = {}
    for pod in lab.state.pods:
        node = next(n for n in lab.state.nodes if n.name == pod.node)
        with netlink.route(nsutil.netns_path(pod.netns)) as ipr:
            eth0 = netlink.link_info(ipr, "eth0")
            addrs = sorted(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=eth0["index"]))
        with netlink.route(nsutil.netns_path(node.netns)) as ipr:
            host = netlink.link_info(ipr, pod.host_ifname)
        out[pod.name] = (eth0["index"], eth0.get("IFLA_ADDRESS"), addrs, host["index"], host.get("IFLA_MASTER"))
    return out


def leased(lab: Lab, node: LabNode) -> dict[str, tuple[str, str]]:
    """container id -> (ip, host veth) as the node's IPAM store records it."""
    store = Store.open_existing(lab.node_dir(node.name) / "state")
    return {lease.container_id: (str(lease.ip), lease.host_ifname) for lease in store.leases()}


def test_every_flow_works_and_nothing_is_left(lab: Lab) -> None:
    results = lab.check()

    assert failures(results) == []
    assert dict(collections.Counter(r.flow for r in results)) == EXPECTED_FLOWS
    if lab.state.datapath == "bpf":  # the fast path really carried traffic: no silent fallback
        assert all(fastpath_packets(lab, n) > 0 for n in lab.state.nodes)
    for node in lab.state.nodes:
        mine = [p for p in lab.state.pods + lab.state.shaped if p.node == node.name]
        assert leased(lab, node) == {p.container_id: (p.ip, p.host_ifname) for p in mine}
        with netlink.route(nsutil.netns_path(node.netns)) as ipr:
            assert sorted(netlink.host_veths(ipr, "sknf")) == sorted(p.host_ifname for p in mine)
            routes = {(r.get("RTA_DST"), r.get("RTA_GATEWAY"))
                      for r in ipr.get_routes(family=socket.AF_INET, table=overlay.PEER_ROUTE_TABLE)}
        assert routes == {(n.underlay_ip, n.gateway_ip) for n in lab.state.nodes if n is not node}


def test_agent_restart_keeps_pods_working_and_unchanged(lab: Lab) -> None:
    before_wiring, before_leases = pod_wiring(lab), {n.name: leased(lab, n) for n in lab.state.nodes}
    node = lab.state.nodes[0]
    old_pid = node.agent_pid

    os.kill(old_pid, signal.SIGTERM)  # as kubelet stops a DaemonSet pod; restart_agent then waits for it
    lab.restart_agent(node)

    assert node.agent_pid != old_pid and not _alive(old_pid) and _alive(node.agent_pid)
    assert failures(lab.check()) == []
    assert pod_wiring(lab) == before_wiring
    assert {n.name: leased(lab, n) for n in lab.state.nodes} == before_leases


def nat_rules(node: LabNode) -> tuple[list[str], list[str]]:
    """(kube-proxy's iptables chains, nftables tables) present on the node."""
    listed = kubeproxy.run_nft(node.netns, {"nftables": [{"list": {"tables": {"family": "ip"}}}]})
    chains = subprocess.run(["iptables", "-w", "-t", "nat", "-S"], capture_output=True, text=True, check=True,
                            preexec_fn=nsutil.preexec_enter(node.netns))
    return ([line.split()[1] for line in chains.stdout.splitlines() if line.startswith("-N KUBE-")],
            [t["table"]["name"] for t in listed if "table" in t])


def test_services_work_with_kube_proxy_in_nftables_mode(lab: Lab) -> None:
    lab.use_kube_proxy("nftables")
    try:
        chains, tables = nat_rules(lab.state.nodes[0])
        assert chains == [] and kubeproxy.NFT_TABLE in tables  # only nft does the NAT now
        results = lab.check(services_only=True)
        assert failures(results) == []
        assert dict(collections.Counter(r.flow for r in results)) == SERVICE_ROWS
    finally:
        lab.use_kube_proxy("iptables")
    chains, tables = nat_rules(lab.state.nodes[0])
    assert "KUBE-SERVICES" in chains and kubeproxy.NFT_TABLE not in tables


def test_pods_reach_other_nodes_inside_the_overlay_only(lab: Lab) -> None:
    """Negative control for the pod -> peer node routing: with node 1's rule gone (its agent paused so it
    cannot restore it), its pods' traffic for node 2 leaves on the underlay, where a cloud network drops
    pod addresses; the agent, resumed, puts the rule back and the flows work again."""
    n1, n2 = lab.state.nodes
    pods = [p for p in lab.state.pods if p.node == n1.name]
    os.kill(n1.agent_pid, signal.SIGSTOP)
    try:
        with netlink.route(nsutil.netns_path(n1.netns)) as ipr:
            netlink.remove_rules(ipr, overlay.PEER_RULE_PRIORITY)
        before = underlay_pod_frames(lab)
        for pod in pods:
            with pytest.raises(OSError):
                lab_who(pod.netns, n2.underlay_ip)
        assert underlay_pod_frames(lab) > before
    finally:
        os.kill(n1.agent_pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while not peer_rule_present(n1) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert peer_rule_present(n1)
    assert [lab_who(p.netns, n2.underlay_ip) for p in pods] == [(p.ip, n2.name) for p in pods]


def peer_rule_present(node: LabNode) -> bool:
    with netlink.route(nsutil.netns_path(node.netns)) as ipr:
        return bool(ipr.get_rules(family=socket.AF_INET, priority=overlay.PEER_RULE_PRIORITY))


def test_a_frame_for_a_local_pods_mac_stays_on_the_bridge(lab: Lab) -> None:
    """A pod that routes for others (it holds an address outside its lease): a frame sent to its MAC for
    that address is the bridge's to deliver, not the overlay's, in both datapaths."""
    n1 = lab.state.nodes[0]
    sender, router = [p for p in lab.state.pods if p.node == n1.name][:2]
    routed = "10.244.2.200"  # in another node's subnet, leased to nobody
    with netlink.route(nsutil.netns_path(router.netns)) as ipr:
        ipr.addr("add", index=netlink.link_index(ipr, "lo"), address=routed, prefixlen=32)
    try:
        with netlink.route(nsutil.netns_path(sender.netns)) as ipr:
            ipr.route("add", dst=f"{routed}/32", gateway=router.ip)
        with nsutil.entered(router.netns):
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with rx:
            rx.bind((routed, 9999))
            rx.settimeout(5)
            with nsutil.entered(sender.netns):
                tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with tx:
                tx.sendto(b"routed", (routed, 9999))
            data, (src, _) = rx.recvfrom(100)
        assert (data, src) == (b"routed", sender.ip)
    finally:
        with netlink.route(nsutil.netns_path(sender.netns)) as ipr:
            ipr.route("del", dst=f"{routed}/32", gateway=router.ip)
        with netlink.route(nsutil.netns_path(router.netns)) as ipr:
            ipr.addr("del", index=netlink.link_index(ipr, "lo"), address=routed, prefixlen=32)


def connected(pod: LabPod, port: int, to: tuple[str, int]) -> socket.socket:
    """A TCP connection from the pod's address and `port` (0: any), which other sockets may share."""
    with nsutil.entered(pod.netns):
        sock = socket.socket(socket.AF_INET6 if ":" in to[0] else socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((pod.ip6 if ":" in to[0] else pod.ip, port))
    sock.connect(to)
    return sock


def ask_who(sock: socket.socket) -> list[str]:
    with sock:
        sock.sendall(b"WHO\n")
        return sock.makefile().readline().split()


@pytest.mark.parametrize("service", ["open", "closed"])
@pytest.mark.parametrize("where", ["same node", "across nodes"])
def test_a_direct_connection_from_a_service_connections_port(lab: Lab, where: str, service: str) -> None:
    """A pod connects to a ClusterIP, then straight to the backend it was given, from the same source
    port (nothing in the pod forbids it). After the DNAT the two share one tuple: conntrack tells them
    apart and moves the second to another port. The fast path must not carry the second past conntrack
    while conntrack un-NATs the replies to that tuple: they would reach the first connection instead
    (an ephemeral port that a recent Service connection used does that by chance)."""
    direct_from_a_service_port(lab, where, service, family=4)


def direct_from_a_service_port(lab: Lab, where: str, service: str, family: int) -> None:
    """The test above, for one address family (test_dualstack runs IPv6's)."""
    n1, n2 = lab.state.nodes
    backend = next(p for p in lab.state.pods if p.node == (n1 if where == "same node" else n2).name)
    client = next(p for p in lab.state.pods if p.node == n1.name and p is not backend)
    svc = next(s for s in lab.services() if s.name == f"pod-{backend.name}" and s.proto == "tcp"
               and s.family == family)
    client_ip, backend_ip = (client.ip6, backend.ip6) if family == 6 else (client.ip, backend.ip)

    first = connected(client, 0, (svc.cluster_ip, svc.port))
    port = first.getsockname()[1]
    if service == "closed":
        assert ask_who(first) == [client_ip, backend.name]  # the server closes: conntrack's TIME_WAIT
    else:
        first.sendall(b"SINK 1\n")  # the server waits for a byte: the connection stays open
    try:
        assert ask_who(connected(client, port, (backend_ip, SERVER_PORT))) == [client_ip, backend.name]
        if service == "open":
            first.sendall(b"x")
            assert first.makefile().readline().split()[0] == "1"
    finally:
        first.close()


def mtus(lab: Lab, node: LabNode) -> set[int]:
    """The MTUs of the node's bridge, VXLAN device and both ends of each of its pods' veths."""
    found = set()
    with netlink.route(nsutil.netns_path(node.netns)) as ipr:
        for name in ["brsknf", "vxsknf", *(p.host_ifname for p in lab.state.pods if p.node == node.name)]:
            found.add(netlink.link_info(ipr, name).get("IFLA_MTU"))
    for pod in (p for p in lab.state.pods if p.node == node.name):
        with netlink.route(nsutil.netns_path(pod.netns)) as ipr:
            found.add(netlink.link_info(ipr, "eth0").get("IFLA_MTU"))
    return found


def test_an_mtu_change_reaches_running_pods(lab: Lab) -> None:
    node = lab.state.nodes[0]
    config = Path(node.config)
    original = config.read_text()
    assert mtus(lab, node) == {1450}
    try:
        config.write_text(original + "mtu: 1400\n")
        lab.restart_agent(node)
        assert mtus(lab, node) == {1400}
    finally:
        config.write_text(original)
        lab.restart_agent(node)
    assert mtus(lab, node) == {1450}
    assert failures(lab.check(services_only=True)) == []
