"""NetworkPolicy enforced with real TCP and UDP, in both datapaths, same node and across nodes, through a
Service too, applied promptly on change; the negative control shows the same traffic passing without
policy.

Cast (a 2-node lab, 2 pods per node, every pod in namespace `lab`, labelled pod=<name>, node=<node>,
named ports http/TCP and echo/UDP on the lab server's port): the protected pod is n1p1 (backend of the
ClusterIP 10.96.0.10); n1p2 is its neighbour, n2p1 and n2p2 live on the other node. Policies are
manifests in the lab's directory every agent watches, as a cluster's API server would serve them.
"""

from __future__ import annotations

import concurrent.futures
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from leftovers import managed_lab

from sknf import nsutil, stats
from sknf.lab import REPO, SERVER_PORT, SERVICE_BASE, SVC_TCP_PORT, SVC_UDP_PORT, Lab, manifests

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "skp"
PROBE_TIMEOUT = 1.0  # a dropped SYN or datagram is believed after this long
DEADLINE = 20.0  # a change must show within this (the agents poll their directory every second)
SERVICE = str(SERVICE_BASE)  # ClusterIP backed by n1p1


@pytest.fixture(scope="module", params=["kernel", "bpf"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    with managed_lab(PREFIX, nodes=2, pods_per_node=2, datapath=request.param) as built:
        yield built


@pytest.fixture
def policies(lab: Lab) -> Iterator[list[str]]:
    """Names of the manifests a test wrote; all removed after it, and the matrix back to open."""
    written: list[str] = []
    yield written
    for name in written:
        manifests.remove(lab.manifest_dir, name)
    assert_flows(lab, {("n2p1", "n1p1", "tcp"): True, ("n1p2", "n1p1", "udp"): True, ("n1p1", "n2p2", "tcp"): True})


def apply(lab: Lab, written: list[str], name: str, *docs: dict) -> None:
    manifests.write(lab.manifest_dir, name, list(docs))
    if name not in written:
        written.append(name)


def netpol(name: str, spec: dict) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": manifests.LAB_NAMESPACE, "name": name}, "spec": spec}


def namespace(labels: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": manifests.LAB_NAMESPACE, "labels": labels}}


def only(pod: str) -> dict:
    return {"matchLabels": {"pod": pod}}


# -- probes ---------------------------------------------------------------------------------------------

def _target(lab: Lab, dst: str, proto: str, family: int) -> tuple[str, int]:
    if dst == "svc":
        return SERVICE, SVC_TCP_PORT if proto == "tcp" else SVC_UDP_PORT
    if node := next((n for n in lab.state.nodes if n.name == dst), None):
        return node.underlay_ip if family == 4 else node.underlay_ip6, SERVER_PORT
    pod = next(p for p in lab.state.pods if p.name == dst)
    return pod.ip if family == 4 else pod.ip6, SERVER_PORT


def _netns(lab: Lab, src: str) -> str:
    return next(x.netns for x in [*lab.state.pods, *lab.state.nodes] if x.name == src)


def reaches(lab: Lab, src: str, dst: str, proto: str, family: int = 4) -> bool:
    """One new flow: a TCP connection answered, or a UDP datagram answered, within PROBE_TIMEOUT (to the
    destination's IPv6 address with family 6: test_netpol6)."""
    addr = _target(lab, dst, proto, family)
    with nsutil.entered(_netns(lab, src)):
        sock = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6,
                             socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(PROBE_TIMEOUT)
        try:
            if proto == "tcp":
                sock.connect(addr)
                sock.sendall(b"WHO\n")
                return bool(sock.makefile().readline())
            sock.sendto(b"x", addr)
            return bool(sock.recvfrom(4096)[0])
        except (TimeoutError, ConnectionError):
            return False


Flows = dict[tuple[str, str, str], bool]


def matrix(lab: Lab, want: Flows, family: int = 4) -> Flows:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = pool.map(lambda k: reaches(lab, *k, family), want)
        return dict(zip(want, got, strict=True))


def assert_flows(lab: Lab, want: Flows, family: int = 4) -> float:
    """Poll until every flow does what `want` says; returns the seconds it took."""
    started = time.monotonic()
    while True:
        got = matrix(lab, want, family)
        if got == want:
            return time.monotonic() - started
        if time.monotonic() - started > DEADLINE:
            wrong = {k: v for k, v in got.items() if v != want[k]}
            raise AssertionError(f"after {DEADLINE:.0f}s these IPv{family} flows still differ (src, dst, proto): "
                                 f"got {wrong}")


def agent_pods(lab: Lab, node: str) -> dict[str, dict]:
    n = next(x for x in lab.state.nodes if x.name == node)
    reply = stats.query_agent(lab.node_dir(n.name) / "run" / "sknf.sock")
    return {row["pod"]: row for row in reply["pods"]}


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
    with nsutil.entered(_netns(lab, "n2p1")):
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
