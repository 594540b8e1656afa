"""The NetworkPolicy lab rig of test_netpol.py (IPv4) and test_netpol6.py (IPv6): a 2-node lab with 2 pods
per node once per datapath, policies written as manifests and removed after each test, and the probe
matrix that polls until every flow does what a test wants.

Cast: every pod in namespace `lab`, labelled pod=<name>, node=<node>, named ports http/TCP and echo/UDP
on the lab server's port; n1p1 backs the ClusterIP 10.96.0.10.
"""

from __future__ import annotations

import concurrent.futures
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from leftovers import managed_lab

from sknf import nsutil, stats
from sknf.lab import SERVER_PORT, SERVICE_BASE, SVC_TCP_PORT, SVC_UDP_PORT, Lab, manifests

PROBE_TIMEOUT = 1.0  # a dropped SYN or datagram is believed after this long
DEADLINE = 20.0  # a change must show within this (the agents poll their directory every second)
SERVICE = str(SERVICE_BASE)  # ClusterIP backed by n1p1


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


def netns_of(lab: Lab, src: str) -> str:
    return next(x.netns for x in [*lab.state.pods, *lab.state.nodes] if x.name == src)


def reaches(lab: Lab, src: str, dst: str, proto: str, family: int = 4) -> bool:
    """One new flow: a TCP connection answered, or a UDP datagram answered, within PROBE_TIMEOUT (to the
    destination's IPv6 address with family 6: test_netpol6)."""
    addr = _target(lab, dst, proto, family)
    with nsutil.entered(netns_of(lab, src)):
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


def lab_fixture(prefix: str, datapaths: tuple[str, ...] = ("kernel", "bpf"),
                **options: object) -> Callable[..., Iterator[Lab]]:
    """The module's `lab` fixture: the 2-node, 2-pods-per-node lab under `prefix`, once per datapath."""
    @pytest.fixture(scope="module", params=list(datapaths))
    def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
        with managed_lab(prefix, nodes=2, pods_per_node=2, datapath=request.param, **options) as built:
            yield built

    return lab


def policies_fixture(open_flows: Flows, family: int = 4) -> Callable[..., Iterator[list[str]]]:
    """The module's `policies` fixture: names of the manifests a test wrote; all removed after it, then
    `open_flows` must pass again (the matrix back to open)."""
    @pytest.fixture
    def policies(lab: Lab) -> Iterator[list[str]]:
        written: list[str] = []
        yield written
        for name in written:
            manifests.remove(lab.manifest_dir, name)
        assert_flows(lab, open_flows, family)

    return policies
