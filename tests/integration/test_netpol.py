"""NetworkPolicy enforced with real TCP and UDP, in both datapaths, same node and across nodes, through a
Service too, applied promptly on change; the negative control shows the same traffic passing without
policy.

Cast (a 2-node lab, 2 pods per node, every pod in namespace `lab`, labelled pod=<name>, node=<node>,
named ports http/TCP and echo/UDP on the lab server's port): the protected pod is n1p1 (backend of the
ClusterIP 10.96.0.10); n1p2 is its neighbour, n2p1 and n2p2 live on the other node. Policies are
manifests in the lab's directory every agent watches, as a cluster's API server would serve them.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from netpolrig import (
    PROBE_TIMEOUT,
    agent_pods,
    apply,
    assert_flows,
    lab_fixture,
    namespace,
    netns_of,
    netpol,
    only,
    policies_fixture,
)

from sknf import nsutil
from sknf.lab import REPO, SERVER_PORT, Lab

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "skp"
lab = lab_fixture(PREFIX)
policies = policies_fixture({("n2p1", "n1p1", "tcp"): True, ("n1p2", "n1p1", "udp"): True,
                             ("n1p1", "n2p2", "tcp"): True})


# -- the cases --------------------------------------------------------------------------------------------

TO_N1P1 = [(src, "n1p1", proto) for src in ("n1p2", "n2p1") for proto in ("tcp", "udp")] + \
    [("n2p2", "svc", "tcp"), ("n1p2", "svc", "udp")]


def test_no_policy_everything_passes(lab: Lab) -> None:
    """The negative control: the same flows the cases deny all pass without policy."""
    assert_flows(lab, dict.fromkeys([*TO_N1P1, ("n1p1", "n2p2", "tcp"), ("n2p2", "n2p1", "udp")], True))
    assert agent_pods(lab, "n1")["n1p1"]["policies"] == {}


def test_default_deny_ingress(lab: Lab, policies: list[str]) -> None:
    """Denied from a neighbour, from the other node and through the Service; the pod still reaches out
    (egress is not covered, replies are established), and its own node still reaches it (probes)."""
    apply(lab, policies, "deny", netpol("deny", {"podSelector": only("n1p1"), "policyTypes": ["Ingress"]}))
    took = assert_flows(lab, {**dict.fromkeys(TO_N1P1, False), ("n1p1", "n2p2", "tcp"): True,
                              ("n1p1", "n1p2", "udp"): True, ("n1", "n1p1", "tcp"): True,
                              ("n2", "n1p1", "tcp"): False,  # another node: its gateway address, no ipBlock
                              ("n2p1", "n1p2", "tcp"): True})
    print(f"default deny applied within {took:.1f} s")
    row = agent_pods(lab, "n1")["n1p1"]
    assert row["policies"] == {"ingress": ["lab/deny"]}
    assert row["refused"].get("policy", 0) > 0 and row["drops"] >= row["refused"]["policy"]
    n1 = lab.state.nodes[0]
    shown = subprocess.run([sys.executable, "-m", "sknf", "stats", "-c", n1.config, "--pod", "n1p1", "-o", "wide"],
                           preexec_fn=nsutil.preexec_enter(n1.netns), capture_output=True, text=True, timeout=60,
                           cwd=REPO, check=True).stdout
    assert "lab/n1p1: ingress lab/deny" in shown and "policy:" in shown


def test_allow_from_a_pod_on_a_named_port(lab: Lab, policies: list[str]) -> None:
    """Allowed from n2p1 to the named TCP port only: its UDP and everyone else stay denied."""
    apply(lab, policies, "web", netpol("web", {"podSelector": only("n1p1"), "ingress": [
        {"from": [{"podSelector": only("n2p1")}], "ports": [{"port": "http"}]}]}))
    assert_flows(lab, {("n2p1", "n1p1", "tcp"): True, ("n2p1", "n1p1", "udp"): False,
                       ("n1p2", "n1p1", "tcp"): False, ("n2p2", "svc", "tcp"): False})


def test_allow_from_a_namespace_follows_its_labels(lab: Lab, policies: list[str]) -> None:
    """namespaceSelector: allowed while the Namespace carries the label, denied as soon as it does not."""
    apply(lab, policies, "ns", namespace({"team": "blue"}))
    apply(lab, policies, "from-blue", netpol("from-blue", {"podSelector": only("n1p1"), "ingress": [
        {"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]}))
    assert_flows(lab, dict.fromkeys(TO_N1P1, True))
    apply(lab, policies, "ns", namespace({"team": "red"}))
    assert_flows(lab, dict.fromkeys(TO_N1P1, False))


def test_egress_to_one_address_and_udp_port_only(lab: Lab, policies: list[str]) -> None:
    """Egress as "DNS only": UDP to one ipBlock address and port, through the Service as well (the rule
    sees the backend after kube-proxy's DNAT); TCP there and anything elsewhere denied."""
    n1p1 = next(p.ip for p in lab.state.pods if p.name == "n1p1")
    apply(lab, policies, "dns", netpol("dns", {"podSelector": only("n2p2"), "policyTypes": ["Egress"], "egress": [
        {"to": [{"ipBlock": {"cidr": f"{n1p1}/32"}}], "ports": [{"protocol": "UDP", "port": SERVER_PORT}]}]}))
    assert_flows(lab, {("n2p2", "n1p1", "udp"): True, ("n2p2", "svc", "udp"): True, ("n2p2", "n1p1", "tcp"): False,
                       ("n2p2", "n2p1", "udp"): False, ("n2p2", "n1p2", "tcp"): False,
                       ("n2p2", "n2", "tcp"): False,  # its own node's address too (the input hook)
                       ("n2p1", "n2p2", "tcp"): True})  # ingress is not covered
    assert agent_pods(lab, "n2")["n2p2"]["policies"] == {"egress": ["lab/dns"]}


def test_union_of_policies_and_a_broken_one(lab: Lab, policies: list[str]) -> None:
    """Two policies add up; a third that cannot be compiled denies its own pod, and only that one."""
    apply(lab, policies, "union",
          netpol("a", {"podSelector": only("n1p1"), "ingress": [{"from": [{"podSelector": only("n1p2")}]}]}),
          netpol("b", {"podSelector": {"matchLabels": {"node": "n1"}},
                       "ingress": [{"from": [{"podSelector": only("n2p1")}], "ports": [{"protocol": "UDP"}]}]}),
          netpol("broken", {"podSelector": only("n2p1"), "ingress": [{"ports": [{"protocol": "ICMP"}]}]}))
    assert_flows(lab, {("n1p2", "n1p1", "tcp"): True, ("n2p1", "n1p1", "udp"): True, ("n2p1", "n1p1", "tcp"): False,
                       ("n2p1", "n1p2", "udp"): True, ("n1p1", "n1p2", "tcp"): False,
                       ("n1p1", "n2p1", "tcp"): False, ("n2p2", "n2p1", "udp"): False})


def test_established_flows_on_a_policy_change(lab: Lab, policies: list[str]) -> None:
    """A connection open before a deny: the kernel datapath's conntrack knows it, so it goes on (the
    change applies to new flows). In BPF mode a flow the fast path carried was never seen by conntrack:
    its next packet meets the rules as a new flow and is dropped (docs/network-policy.md)."""
    dst = next(p.ip for p in lab.state.pods if p.name == "n1p1")
    with nsutil.entered(netns_of(lab, "n2p1")):
        sock = socket.create_connection((dst, SERVER_PORT), timeout=PROBE_TIMEOUT)
    with sock:  # the lab server's SINK: it answers once it has all the bytes, half sent before the change
        sock.sendall(b"SINK 8\nfour")
        apply(lab, policies, "deny", netpol("deny", {"podSelector": only("n1p1"), "policyTypes": ["Ingress"]}))
        assert_flows(lab, {("n2p1", "n1p1", "tcp"): False})
        try:
            sock.sendall(b"more")
            survived = sock.makefile().readline().split()[:1] == ["8"]
        except (TimeoutError, ConnectionError):
            survived = False
    assert survived == (lab.state.datapath == "kernel")
