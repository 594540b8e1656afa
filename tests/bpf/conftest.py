"""Fixtures for the eBPF datapath tests: a fresh two-node cluster per test, removed even on failure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from topo import Cluster, servers

from sknf.lab import kubeproxy

# ClusterIP 10.96.0.10 -> the second pod of node 1 (same node as the client, pod 1 of node 1),
# 10.96.0.11 -> the first pod of node 2 (across nodes); TCP port 80 and UDP port 53 -> 8080.
SERVICES = {"10.96.0.10": (1, 2), "10.96.0.11": (2, 1)}
SVC_TCP, SVC_UDP = 80, 53


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        c.up()
        yield c
    finally:
        c.down()


def install_services(cluster: Cluster) -> None:
    """kube-proxy's iptables-mode ClusterIP rules for SERVICES on every node."""
    services = [kubeproxy.Service(vip, proto, port, ((cluster.pod(*where).ip, 8080, ""),), vip)
                for vip, where in SERVICES.items() for proto, port in (("tcp", SVC_TCP), ("udp", SVC_UDP))]
    for node in cluster.nodes:
        kubeproxy.install(node.netns, "iptables", services, node.cfg.node_name)


@pytest.fixture
def serving(cluster: Cluster) -> Iterator[Cluster]:
    """Test servers in every pod and node, and kube-proxy-style ClusterIP rules on every node."""
    targets = {p.name: p.netns for n in cluster.nodes for p in n.pods}
    targets.update({n.cfg.node_name: n.netns for n in cluster.nodes})
    install_services(cluster)
    with servers(targets):
        yield cluster
