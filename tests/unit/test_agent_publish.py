"""The agent publishes its own facts to the peer source at its first reconcile and again whenever its
underlay address or its MTU changed (a DHCP renewal, a moved interface, a new underlay MTU), not on
every round: peers would otherwise keep flooding to the old address. The node-level steps are replaced
by recorders; the decision is the agent's own."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from sknf import agent as agent_mod
from sknf import overlay, pod
from sknf.config import Config
from sknf.overlay import NodeOverlay
from sknf.peers import Node

POD_CIDR = ipaddress.IPv4Network("10.244.1.0/24")


class Source:
    def __init__(self) -> None:
        self.published: list[Node] = []

    def changed(self) -> bool:
        return False

    def nodes(self) -> list[Node]:
        return []

    def publish_self(self, node: Node) -> None:
        self.published.append(node)


class Datapath:
    mode, reason = "kernel", ""

    def setup_node(self, node) -> None:
        pass


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch, tmp_path) -> agent_mod.Agent:
    built = NodeOverlay(underlay_ifindex=2, underlay_ip="198.51.100.11", bridge_ifindex=3, vxlan_ifindex=4,
                        gateway_ip="10.244.1.1", gateway_mac="0a:58:0a:f4:01:01", mtu=1450, pod_cidr=POD_CIDR)
    a = agent_mod.Agent.__new__(agent_mod.Agent)
    a.cfg = Config(node_name="n1", cluster_cidr=ipaddress.IPv4Network("10.244.0.0/16"), state_dir=tmp_path)
    a.source, a.peers, a.pod_cidr, a.datapath, a.node = Source(), [], POD_CIDR, Datapath(), None
    a.pod_cidrs = (POD_CIDR,)
    a.underlay = built
    a.iptables = None  # the backend the agent detects at start; ensure_rules is replaced below
    a.policy = None  # no NetworkPolicy source (tests/unit/test_enforcer.py covers it)
    monkeypatch.setattr(a, "recover_store", lambda: None)
    monkeypatch.setattr(a, "replay_pending_dels", lambda: None)
    monkeypatch.setattr(overlay, "ensure_node", lambda cfg, cidr: a.underlay)
    for step in ("ensure_neighbour_tables", "sync_peers", "sync_peer_routes", "ensure_rules"):
        monkeypatch.setattr(overlay, step, lambda *args, **kw: None)
    monkeypatch.setattr(pod, "sync_pods", lambda net, node: [])
    a.net = None
    return a


def test_published_once_while_the_address_stays(agent: agent_mod.Agent) -> None:
    agent.reconcile()
    agent.reconcile()
    assert [n.underlay_ip for n in agent.source.published] == ["198.51.100.11"]
    assert agent.source.published[0] == Node("n1", "198.51.100.11", str(POD_CIDR), mtu=1450)


def test_republished_when_the_underlay_address_changed(agent: agent_mod.Agent) -> None:
    agent.reconcile()
    agent.underlay = replace(agent.underlay, underlay_ip="198.51.100.99")
    agent.reconcile()
    agent.reconcile()
    assert [n.underlay_ip for n in agent.source.published] == ["198.51.100.11", "198.51.100.99"]


def test_republished_when_the_mtu_changed(agent: agent_mod.Agent) -> None:
    """Peers compare MTUs (`sknf doctor`): a node whose underlay MTU changed says so."""
    agent.reconcile()
    agent.underlay = replace(agent.underlay, mtu=1400)
    agent.reconcile()
    assert [n.mtu for n in agent.source.published] == [1450, 1400]
