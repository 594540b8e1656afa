"""The agent's metrics: what a scrape shows, that removed pods vanish, and the HTTP endpoints."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from ipaddress import IPv4Address

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from sknf.datapath import PodCounters
from sknf.ipam import Lease
from sknf.metrics import PROMETHEUS_ACCEPT, Metrics, Snapshot, join


def lease(i: int, ns: str = "default", pod: str | None = None) -> Lease:
    return Lease(IPv4Address(f"10.244.1.{i + 2}"), f"cid{i:04d}" + "0" * 56, "eth0", ns,
                 pod if pod is not None else f"pod-{i}", f"sknf{i:08x}")


def bpf_counters(i: int) -> PodCounters:
    return PodCounters(rx_bytes=1000 * i, rx_packets=10 * i, tx_bytes=2000 * i, tx_packets=20 * i,
                       fast_packets=25 * i, kernel_packets=5 * i, drops=i)


class Node:
    """A fake agent: its leases and datapath counters can change between scrapes."""

    def __init__(self, mode: str = "bpf") -> None:
        self.mode = mode
        self.leases: list[Lease] = []
        self.counters: dict[str, PodCounters] = {}

    def add(self, lease: Lease, counters: PodCounters) -> None:
        self.leases.append(lease)
        self.counters[lease.host_ifname] = counters

    def snapshot(self) -> Snapshot:
        return Snapshot(node="n1", datapath_mode=self.mode, datapath_reason="",
                        pods=join(self.leases, self.counters), ipam_allocated=len(self.leases),
                        ipam_capacity=253, peers=2)


def scrape(metrics: Metrics, accept: str = "") -> dict[str, list]:
    """{sample name: samples} of one scrape, parsed by prometheus_client's parser for that format."""
    body, content_type = metrics.exposition(accept)
    parse = openmetrics_families if content_type.startswith("application/openmetrics-text") else \
        text_string_to_metric_families
    out: dict[str, list] = {}
    for fam in parse(body.decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    hits = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


@pytest.mark.parametrize("accept", ["", PROMETHEUS_ACCEPT], ids=["text", "openmetrics"])
def test_pod_counters_and_node_gauges(accept: str) -> None:
    node = Node()
    for i in (1, 2):
        node.add(lease(i), bpf_counters(i))
    m = Metrics("n1", node.snapshot)
    m.observe_cni("ADD", "success", 0.004)
    s = scrape(m, accept)
    assert value(s, "sknf_pod_receive_bytes_total", namespace="default", pod="pod-2", node="n1") == 2000
    assert value(s, "sknf_pod_transmit_bytes_total", pod="pod-2") == 4000
    assert value(s, "sknf_pod_receive_packets_total", pod="pod-1") == 10
    assert value(s, "sknf_pod_transmit_packets_total", pod="pod-1") == 20
    assert value(s, "sknf_pod_fastpath_packets_total", pod="pod-1") == 25
    assert value(s, "sknf_pod_kernelpath_packets_total", pod="pod-1") == 5
    assert value(s, "sknf_pod_drops_total", pod="pod-2") == 2
    assert value(s, "sknf_datapath_mode", mode="bpf") == 1
    assert value(s, "sknf_datapath_mode", mode="kernel") == 0
    assert value(s, "sknf_ipam_allocated_addresses") == 2
    assert value(s, "sknf_ipam_capacity_addresses") == 253
    assert value(s, "sknf_overlay_peers") == 2
    assert value(s, "sknf_build_info") == 1
    assert set(s["sknf_build_info"][0].labels) == {"node", "version", "python", "kernel"}
    assert value(s, "sknf_cni_requests_total", command="ADD") == 1  # the instruments follow the pod families
    for name, samples in s.items():
        assert all(x.labels["node"] == "n1" for x in samples), name


def test_label_values_are_escaped() -> None:
    node = Node()
    odd = 'a"b\\c\nd'  # a namespace no Kubernetes allows, but a runtime's CNI_ARGS could carry
    node.add(lease(1, ns=odd, pod="p"), bpf_counters(1))
    for accept in ("", PROMETHEUS_ACCEPT):
        assert value(scrape(Metrics("n1", node.snapshot), accept), "sknf_pod_receive_bytes_total", pod="p",
                     namespace=odd) == 1000


def test_deleted_pod_series_disappear() -> None:
    node = Node()
    for i in range(5):
        node.add(lease(i), bpf_counters(i))
    m = Metrics("n1", node.snapshot)
    assert len(scrape(m)["sknf_pod_receive_bytes_total"]) == 5
    gone = node.leases.pop(3)  # the lease is released; the datapath may still hold stale counters
    s = scrape(m)
    pods = {x.labels["pod"] for name, xs in s.items() if name.startswith("sknf_pod_") for x in xs}
    assert pods == {"pod-0", "pod-1", "pod-2", "pod-4"}
    assert gone.pod not in pods
    node.leases.clear()
    assert not [n for n in scrape(m) if n.startswith("sknf_pod_")]


def test_kernel_mode_has_no_fast_path_series() -> None:
    node = Node(mode="kernel")
    node.add(lease(1), PodCounters(rx_bytes=5, rx_packets=1, tx_bytes=7, tx_packets=1))
    s = scrape(Metrics("n1", node.snapshot))
    assert value(s, "sknf_pod_receive_bytes_total", pod="pod-1") == 5
    assert "sknf_pod_fastpath_packets_total" not in s
    assert "sknf_pod_kernelpath_packets_total" not in s
    assert value(s, "sknf_datapath_mode", mode="kernel") == 1


def test_uncounted_pod_shows_zeros_and_nameless_pod_uses_container_id() -> None:
    node = Node()
    node.leases.append(lease(1, ns="", pod=""))  # e.g. podman: no K8S_POD_* CNI args, not counted yet
    s = scrape(Metrics("n1", node.snapshot))
    assert value(s, "sknf_pod_receive_bytes_total", namespace="", pod="cid000100000") == 0


def test_two_sandboxes_of_one_pod_make_one_series() -> None:
    node = Node()
    node.add(lease(1, pod="web"), bpf_counters(1))
    node.add(lease(2, pod="web"), bpf_counters(2))
    s = scrape(Metrics("n1", node.snapshot))
    assert value(s, "sknf_pod_receive_bytes_total", pod="web") == 3000


def test_cni_and_reconcile_instruments_are_per_object() -> None:
    node = Node()
    m, other = Metrics("n1", node.snapshot), Metrics("n1", node.snapshot)
    m.observe_cni("ADD", "success", 0.004)
    m.observe_cni("ADD", "success", 0.2)
    m.observe_cni("DEL", "error", 0.03)
    m.reconcile_error("overlay")
    s = scrape(m)
    assert value(s, "sknf_cni_requests_total", command="ADD", result="success") == 2
    assert value(s, "sknf_cni_requests_total", command="DEL", result="error") == 1
    ok = {"command": "ADD", "result": "success"}
    assert value(s, "sknf_cni_request_duration_seconds_bucket", le="0.005", **ok) == 1
    assert value(s, "sknf_cni_request_duration_seconds_bucket", le="0.25", **ok) == 2
    assert value(s, "sknf_cni_request_duration_seconds_count", command="ADD", result="success") == 2
    assert value(s, "sknf_reconcile_errors_total", step="overlay") == 1
    assert "sknf_cni_requests_total" not in scrape(other)  # no shared (module-level) state


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def served():
    node = Node()
    node.add(lease(1), bpf_counters(1))
    ready = {"now": False}
    m = Metrics("n1", node.snapshot)
    server = m.serve(("127.0.0.1", 0), lambda: ready["now"])
    try:
        yield node, ready, f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()


def test_http_endpoints(served) -> None:
    _, ready, base = served
    status, body = get(base + "/metrics")
    assert status == 200
    assert 'sknf_pod_receive_bytes_total{namespace="default",node="n1",pod="pod-1"} 1000\n' in body
    assert get(base + "/healthz") == (200, "ok\n")
    assert get(base + "/readyz")[0] == 503
    ready["now"] = True
    assert get(base + "/readyz") == (200, "ready\n")
    assert get(base + "/nope")[0] == 404


def test_failed_read_is_a_failed_scrape(served) -> None:
    node, _, base = served
    node.counters = None  # the snapshot now raises
    status, body = get(base + "/metrics")
    assert status == 500 and "scrape failed" in body
    assert get(base + "/healthz")[0] == 200


def test_serving_asks_no_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTPServer looks its address up in DNS when it binds; on a node whose resolver does not answer yet that
    held the agent's start for the resolver's timeout. Any lookup fails this test."""
    def no_dns(*_: object) -> None:
        raise AssertionError("the metrics server asked the resolver")

    monkeypatch.setattr(socket, "getfqdn", no_dns)
    monkeypatch.setattr(socket, "gethostbyaddr", no_dns)
    server = Metrics("n1", Node().snapshot).serve(("127.0.0.1", 0), lambda: True)
    try:
        assert get(f"http://127.0.0.1:{server.port}/healthz") == (200, "ok\n")
    finally:
        server.shutdown()
