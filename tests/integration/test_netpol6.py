"""NetworkPolicy over IPv6 in a dual-stack lab, both datapaths: a default deny stops IPv6 TCP and UDP to
the selected pod from its node and across nodes while an unselected pod stays reachable; an allow from a
podSelector lets that peer in over IPv6 (its IPv6 address comes from the Pod's status.podIPs); the
negative control shows the same IPv6 flows passing with no policy. IPv4 is covered by test_netpol.py.

Cast (2 nodes, 2 pods per node, namespace `lab`): the protected pod is n1p1; n1p2 its neighbour, n2p1
and n2p2 on the other node.
"""

from __future__ import annotations

import pytest
from netpolrig import Flows, agent_pods, apply, assert_flows, lab_fixture, netpol, only, policies_fixture

from sknf.lab import Lab

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "skv"
OPEN: Flows = {("n1p2", "n1p1", "tcp"): True, ("n2p1", "n1p1", "udp"): True}

lab = lab_fixture(PREFIX, dual_stack=True)
policies = policies_fixture(OPEN, family=6)


def assert_flows6(lab: Lab, want: Flows) -> float:
    return assert_flows(lab, want, family=6)


TO_N1P1 = [(src, "n1p1", proto) for src in ("n1p2", "n2p1") for proto in ("tcp", "udp")]
TO_N2P2 = [(src, "n2p2", proto) for src in ("n1p1", "n2p1") for proto in ("tcp", "udp")]


def test_no_policy_ipv6_passes(lab: Lab) -> None:
    """The negative control: every flow the cases deny passes over IPv6 without policy."""
    assert_flows6(lab, dict.fromkeys([*TO_N1P1, *TO_N2P2], True))


def test_default_deny_covers_ipv6(lab: Lab, policies: list[str]) -> None:
    """IPv6 TCP and UDP to n1p1 are dropped from its node and the other one, counted as `policy` against
    n1p1; n2p2 (unselected) still takes IPv6; n1p1's own node still reaches it."""
    apply(lab, policies, "deny", netpol("deny", {"podSelector": only("n1p1"), "policyTypes": ["Ingress"]}))
    assert_flows6(lab, {**dict.fromkeys(TO_N1P1, False), **dict.fromkeys(TO_N2P2, True),
                        ("n1", "n1p1", "tcp"): True, ("n1p1", "n2p2", "tcp"): True})
    row = agent_pods(lab, "n1")["n1p1"]
    assert row["refused"].get("policy", 0) > 0


def test_allow_from_a_pod_selector_over_ipv6(lab: Lab, policies: list[str]) -> None:
    """Allowed from n2p1 (its IPv6 address from the Pod's podIPs): in over IPv6 TCP and UDP; n1p2 is not."""
    apply(lab, policies, "web", netpol("web", {"podSelector": only("n1p1"), "ingress": [
        {"from": [{"podSelector": only("n2p1")}]}]}))
    assert_flows6(lab, {("n2p1", "n1p1", "tcp"): True, ("n2p1", "n1p1", "udp"): True,
                        ("n1p2", "n1p1", "tcp"): False, ("n1p2", "n1p1", "udp"): False})
