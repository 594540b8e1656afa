"""The eBPF fast path really carries pod traffic, counts it exactly once, and leaves Services working.

The reference for "what the pod really sent and received" is the pod's own eth0 statistics, read
inside the pod (veth counts whole frames, as the programs do), plus the known payload sizes.
"""

from __future__ import annotations

import functools
import shutil
import socket
from pathlib import Path

import pytest
from conftest import SERVICES, SVC_TCP, SVC_UDP
from topo import (
    ARP_FRAME,
    SERVER_PORT,
    Cluster,
    Snapshot,
    host_port_stats,
    near,
    tcp_bulk,
    tcp_who,
    udp_exchange,
    udp_replies,
)

from sknf.datapath.bpf import BPF_DIR, BpfDatapath

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.slow]

MiB = 1 << 20
UDP_FRAME = 14 + 20 + 8  # Ethernet + IPv4 + UDP headers around each datagram
ARP_ROUNDS = 4  # neighbour re-probes during a transfer: ARP always takes the kernel path


@pytest.fixture
def bpf(serving: Cluster) -> Cluster:
    for node in serving.nodes:
        node.start(BpfDatapath)
    return serving


def test_same_node_traffic_skips_the_bridge(bpf: Cluster) -> None:
    a, b = bpf.pod(1, 1), bpf.pod(1, 2)
    tcp_who(a, b.ip)  # ARP settles through the bridge first
    snap, port0 = Snapshot(bpf, a, b), host_port_stats(bpf, b)
    assert tcp_bulk(a, b.ip, 8 * MiB) == 8 * MiB
    port1 = host_port_stats(bpf, b)
    ca, _ = snap.delta(a)
    cb, eb = snap.delta(b)
    assert ca["fast_packets"] >= ca["tx_packets"] - ARP_ROUNDS and ca["kernel_packets"] <= ARP_ROUNDS
    assert cb["fast_packets"] >= eb["rx_packets"] - ARP_ROUNDS > 0
    # redirect_peer lands frames in b without the bridge sending anything out of b's port
    assert port1["tx_packets"] - port0["tx_packets"] <= ARP_ROUNDS
    snap.assert_exact()


def test_cross_node_traffic_goes_straight_to_vxlan(bpf: Cluster) -> None:
    a, r = bpf.pod(1, 1), bpf.pod(2, 1)
    tcp_who(a, r.ip)
    snap, port0 = Snapshot(bpf, a, r), host_port_stats(bpf, r)
    assert tcp_bulk(a, r.ip, 8 * MiB) == 8 * MiB
    ca, _ = snap.delta(a)
    cr, _ = snap.delta(r)
    assert ca["kernel_packets"] <= ARP_ROUNDS and cr["kernel_packets"] <= ARP_ROUNDS
    assert ca["fast_packets"] >= ca["tx_packets"] + ca["rx_packets"] - ARP_ROUNDS > 0
    assert host_port_stats(bpf, r)["tx_packets"] - port0["tx_packets"] <= ARP_ROUNDS
    snap.assert_exact()


@pytest.mark.parametrize("where", ["same node", "cross node"])
def test_tcp_counters_match_bytes_sent(bpf: Cluster, where: str) -> None:
    a = bpf.pod(1, 1)
    dst = bpf.pod(1, 2) if where == "same node" else bpf.pod(2, 1)
    tcp_who(a, dst.ip)
    snap = Snapshot(bpf, a, dst)
    assert tcp_bulk(a, dst.ip, 16 * MiB) == 16 * MiB
    ca, _ = snap.delta(a)
    cd, _ = snap.delta(dst)
    assert 16 * MiB < ca["tx_bytes"] < 16 * MiB * 1.06  # payload plus TCP/IP/Ethernet headers
    assert near(cd["rx_bytes"], ca["tx_bytes"], ARP_FRAME)  # each frame counted once, on each side
    snap.assert_exact()


@pytest.mark.parametrize("where", ["same node", "cross node"])
def test_udp_counters_match_datagrams_sent(bpf: Cluster, where: str) -> None:
    a = bpf.pod(1, 1)
    dst = bpf.pod(1, 2) if where == "same node" else bpf.pod(2, 1)
    snap = Snapshot(bpf, a, dst)
    assert udp_exchange(a, dst.ip, 2000, 1200) == 2000
    ca, _ = snap.delta(a)
    cd, _ = snap.delta(dst)
    assert near(ca["tx_bytes"], 2000 * (1200 + UDP_FRAME), ARP_FRAME)
    assert near(ca["tx_packets"], 2000) and near(cd["rx_packets"], 2000)
    assert near(cd["rx_bytes"], 2000 * (1200 + UDP_FRAME), ARP_FRAME)
    snap.assert_exact()


def test_gateway_traffic_takes_the_kernel_path_and_is_counted(bpf: Cluster) -> None:
    a, node = bpf.pod(1, 1), bpf.nodes[0]
    snap = Snapshot(bpf, a)
    assert tcp_bulk(a, node.net.gateway_ip, 8 * MiB) == 8 * MiB
    assert udp_exchange(a, node.net.gateway_ip, 500, 1000) == 500
    c, _ = snap.delta(a)
    assert c["fast_packets"] == 0 and c["kernel_packets"] == c["tx_packets"] + c["rx_packets"]
    assert 8 * MiB + 500 * 1000 < c["tx_bytes"] < (8 * MiB + 500 * (1000 + UDP_FRAME)) * 1.06
    snap.assert_exact()


def test_node_to_pod_counts_pod_rx(bpf: Cluster) -> None:
    """The node (kernel path, through the bridge) sends to a pod: counted at the host veth's egress."""
    b, node = bpf.pod(1, 2), bpf.nodes[0]
    snap = Snapshot(bpf, b)
    sock = node.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        for _ in range(300):
            sock.sendto(b"n" * 1000, (b.ip, 9))  # discard port: nothing answers, nothing needed
    c, _ = snap.delta(b)
    assert near(c["rx_packets"], 300) and c["fast_packets"] == 0
    snap.assert_exact()


@pytest.mark.parametrize("vip", list(SERVICES))
def test_cluster_ip_works_with_the_fast_path(bpf: Cluster, vip: str) -> None:
    client, backend = bpf.pod(1, 1), bpf.pod(*SERVICES[vip])
    node1 = bpf.nodes[0]
    snap = Snapshot(bpf, client, backend)
    assert tcp_who(client, vip, SVC_TCP) == (client.ip, backend.name)
    assert tcp_bulk(client, vip, 4 * MiB, port=SVC_TCP) == 4 * MiB
    assert udp_exchange(client, vip, 200, 500, port=SVC_UDP) == 200  # every reply from the ClusterIP
    # The backend's replies are known flows on the client's node: they must not be fast-pathed.
    learned = node1.call(node1.datapath.learned_flows)
    assert any(t[0] == backend.ip and t[1] == client.ip and t[2] == 8080 and t[4] == socket.IPPROTO_UDP
               for t in learned)
    snap.assert_exact()
    # Direct pod-to-pod traffic between the same two pods still takes the fast path.
    snap = Snapshot(bpf, client)
    assert tcp_bulk(client, backend.ip, 2 * MiB) == 2 * MiB
    c, _ = snap.delta(client)
    assert c["fast_packets"] > 0 and c["kernel_packets"] <= ARP_ROUNDS


def test_without_learned_flows_services_break(serving: Cluster, tmp_path: Path) -> None:
    """Negative control: programs that ignore learned flows fast-path Service replies un-NATed, so each
    reply reaches the client from the backend's own address (not from the ClusterIP: not lost, not absent)."""
    broken = tmp_path / "bpf"
    shutil.copytree(BPF_DIR, broken)
    flows_h = broken / "lib" / "flows.h"
    source = flows_h.read_text()
    flows_h.write_text(source.replace("return kernel_flows.lookup(tuple) != NULL;", "return 0;"))
    assert flows_h.read_text() != source, "the learned-flow lookup to break is not in flows.h any more"
    for node in serving.nodes:
        node.start(functools.partial(BpfDatapath, bpf_dir=broken))
    client = serving.pod(1, 1)
    for vip, where in SERVICES.items():
        backend = serving.pod(*where)
        assert udp_replies(client, vip, 3, 100, port=SVC_UDP) == [(backend.ip, SERVER_PORT)] * 3, vip
