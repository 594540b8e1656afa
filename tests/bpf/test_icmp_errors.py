"""ICMP errors of Services on the eBPF fast path: a UDP ClusterIP whose backend has no listener answers
ECONNREFUSED, same node and across nodes, because the programs leave ICMP errors to the kernel path,
where conntrack translates the header they quote back to the ClusterIP (issue 10). The negative control
loads programs that parse ICMP errors for the fast path like any other ICMP: the backend's port
unreachable then goes straight to the client un-NATed, matches no socket, and the client times out.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from topo import Cluster, Pod, broken_programs

from sknf.datapath.bpf import BpfDatapath
from sknf.lab import kubeproxy

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.slow]

PREFIX = "sk9"
# UDP ClusterIP -> (node, pod) of its backend, on a port nobody listens on: the client is pod 1 of node 1,
# so the first backend is on its node and the second across nodes.
CLOSED = {"10.96.0.12": (1, 2), "10.96.0.13": (2, 1)}
SVC_UDP, CLOSED_PORT = 53, 9999
ICMP_ERROR_CHECK = "(void *)(type + 1) > data_end || is_icmp_error(*type)"  # in parse_ipv4, bpf/lib/common.h


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Two nodes with kube-proxy's iptables-mode rules for CLOSED, no datapath yet."""
    c = Cluster(tmp_path, prefix=PREFIX)
    try:
        c.up()
        svcs = [kubeproxy.Service(vip, "udp", SVC_UDP, ((c.pod(*where).ip, CLOSED_PORT, ""),), vip)
                for vip, where in CLOSED.items()]
        for node in c.nodes:
            kubeproxy.install(node.netns, "iptables", svcs, node.cfg.node_name)
        yield c
    finally:
        c.down()


def refused(client: Pod, vip: str) -> bool:
    """Does a datagram to the ClusterIP end in ECONNREFUSED (the backend's port unreachable, its quoted
    header reverse-NATed so that it comes from the ClusterIP), rather than in silence?"""
    with client.socket(socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.connect((vip, SVC_UDP))
        s.send(b"anyone?")
        try:
            s.recv(100)
        except ConnectionRefusedError:
            return True
        except TimeoutError:
            return False
    raise AssertionError(f"{vip}: an answer from a backend without listener")


@pytest.mark.parametrize("vip", list(CLOSED))
def test_icmp_errors_of_services_reach_the_client(cluster: Cluster, vip: str) -> None:
    for node in cluster.nodes:
        node.start(BpfDatapath)
    assert refused(cluster.pod(1, 1), vip)


def test_icmp_errors_on_the_fast_path_are_lost(cluster: Cluster, tmp_path: Path) -> None:
    """Negative control: programs that fast-path ICMP errors; neither Service's error reaches the client."""
    make = broken_programs(tmp_path, "lib/common.h", ICMP_ERROR_CHECK, "(void *)(type + 1) > data_end")
    for node in cluster.nodes:
        node.start(make)
    assert not any(refused(cluster.pod(1, 1), vip) for vip in CLOSED)
