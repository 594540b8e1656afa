"""Prometheus metrics of the agent: per-pod traffic read at scrape time, plus the agent's own instruments.

Why a collector rather than Counter objects updated by the agent: the datapath already keeps the
authoritative counters (BPF maps, or each host veth's link statistics), so a scrape reads them and the
current IPAM leases at that moment. A pod whose lease is gone is simply not in the next snapshot, so its
series disappear with it (no labelled child to forget to remove, no cardinality leak), and restarting the
agent loses nothing because the kernel kept counting.

Everything lives in the `Metrics` object the agent owns (its own CollectorRegistry, never the global one),
so tests and several in-process agents never share state.
"""

from __future__ import annotations

import logging
import platform
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

import sknf
from sknf.datapath import PodCounters

log = logging.getLogger(__name__)

MODES = ("bpf", "kernel")
# CNI ADD is a few ms warm and up to seconds when the node is busy; DEL waits on netns teardown.
CNI_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class PodIdentity(Protocol):
    """Who a pod is: an IPAM lease (`sknf.ipam.Lease`) satisfies this."""

    @property
    def namespace(self) -> str: ...
    @property
    def pod(self) -> str: ...
    @property
    def container_id(self) -> str: ...
    @property
    def ip(self) -> IPv4Address | str: ...
    @property
    def host_ifname(self) -> str: ...


@dataclass(frozen=True)
class Snapshot:
    """Everything a scrape or `sknf stats` shows, read at one moment.

    `pods` holds only current pods (the IPAM leases); None counters mean "not counted yet" (zeros).
    """

    node: str
    datapath_mode: str  # "bpf" or "kernel"
    datapath_reason: str  # why this mode ("" when chosen plainly)
    pods: list[tuple[PodIdentity, PodCounters | None]]
    ipam_allocated: int
    ipam_capacity: int | None  # None: unknown (read without the agent and its configuration)
    peers: int | None  # other nodes in the overlay; None: unknown (read without the agent)
    taken: float = field(default_factory=time.time)


def join(leases: Iterable[PodIdentity],
         counters: dict[str, PodCounters]) -> list[tuple[PodIdentity, PodCounters | None]]:
    """Pair each lease with its host veth's counters (from Datapath.read_counters).

    Counters of a veth without a lease (a pod being deleted) are left out, so only current pods are
    ever shown; a lease not counted yet gets None (shown as zeros).
    """
    return [(lease, counters.get(lease.host_ifname)) for lease in leases]


def pod_label(ident: PodIdentity) -> tuple[str, str]:
    """(namespace, pod) for display and labels; runtimes that pass no K8S_* args get the container ID."""
    return ident.namespace, ident.pod or ident.container_id[:12]


BUILD_LABELS = {"version": sknf.__version__, "python": platform.python_version(),
                "kernel": platform.release()}


class _SnapshotCollector(Collector):
    """Turns one snapshot into metric families at each scrape."""

    def __init__(self, node: str, snapshot: Callable[[], Snapshot]) -> None:
        self._node = node
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        node = self._node
        labels = ["namespace", "pod", "node"]
        fams = {
            name: CounterMetricFamily(f"sknf_pod_{name}", doc, labels=labels)
            for name, doc in (
                ("receive_bytes", "Bytes delivered to the pod."),
                ("transmit_bytes", "Bytes sent by the pod."),
                ("receive_packets", "Packets delivered to the pod."),
                ("transmit_packets", "Packets sent by the pod."),
                ("fastpath_packets", "Pod packets forwarded by the BPF fast path (BPF datapath only)."),
                ("kernelpath_packets", "Pod packets left to the kernel's bridge path (BPF datapath only)."),
                ("drops", "Pod packets dropped by the datapath."),
            )
        }
        # Sum per (namespace, pod): two leases of one pod (a sandbox re-created before the old one's DEL)
        # must not yield duplicate series, which Prometheus would reject for the whole scrape.
        per_pod: dict[tuple[str, str], dict[str, int | None]] = {}
        for ident, counted in snap.pods:
            c = counted or PodCounters()
            values = {
                "receive_bytes": c.rx_bytes, "transmit_bytes": c.tx_bytes,
                "receive_packets": c.rx_packets, "transmit_packets": c.tx_packets,
                "fastpath_packets": c.fast_packets, "kernelpath_packets": c.kernel_packets, "drops": c.drops,
            }
            acc = per_pod.setdefault(pod_label(ident), dict.fromkeys(values, 0))
            for name, v in values.items():
                acc[name] = None if v is None or acc[name] is None else acc[name] + v
        for (ns, pod), values in sorted(per_pod.items()):
            for name, v in values.items():
                if v is not None:  # the kernel datapath cannot tell fast from kernel path: no series
                    fams[name].add_metric([ns, pod, node], v)
        yield from fams.values()

        mode = GaugeMetricFamily("sknf_datapath_mode", "1 for the datapath this agent runs, else 0.",
                                 labels=["node", "mode"])
        for m in MODES:
            mode.add_metric([node, m], 1.0 if snap.datapath_mode == m else 0.0)
        yield mode
        gauges = [("sknf_ipam_allocated_addresses", "Pod addresses leased on this node.",
                   snap.ipam_allocated),
                  ("sknf_ipam_capacity_addresses", "Pod addresses this node's subnet can lease.",
                   snap.ipam_capacity),
                  ("sknf_overlay_peers", "Other nodes this node's overlay forwards to.", snap.peers)]
        for name, doc, v in gauges:
            if v is not None:
                g = GaugeMetricFamily(name, doc, labels=["node"])
                g.add_metric([node], v)
                yield g
        info = GaugeMetricFamily("sknf_build_info", "Always 1; labels say what is running.",
                                 labels=["node", *BUILD_LABELS])
        info.add_metric([node, *BUILD_LABELS.values()], 1.0)
        yield info


class Metrics:
    """The agent's registry: pod and node figures from `snapshot` at scrape time, plus instruments.

    Every series carries `node`, so dashboards filter by node without relabelling rules in Prometheus.
    """

    def __init__(self, node: str, snapshot: Callable[[], Snapshot]) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_SnapshotCollector(node, snapshot))
        cni = ["node", "command", "result"]
        self._cni_requests = Counter("sknf_cni_requests", "CNI requests handled by the agent.", cni,
                                     registry=self.registry)
        self._cni_seconds = Histogram("sknf_cni_request_duration_seconds",
                                      "Time the agent took to handle a CNI request.", cni,
                                      buckets=CNI_BUCKETS, registry=self.registry)
        self._reconcile_errors = Counter("sknf_reconcile_errors", "Reconcile steps that failed.",
                                         ["node", "step"], registry=self.registry)

    def observe_cni(self, command: str, result: str, seconds: float) -> None:
        """Count one CNI request; `result` is "success" or a short error kind (few distinct values)."""
        self._cni_requests.labels(self.node, command, result).inc()
        self._cni_seconds.labels(self.node, command, result).observe(seconds)

    def reconcile_error(self, step: str) -> None:
        self._reconcile_errors.labels(self.node, step).inc()

    def serve(self, bind: tuple[str, int], ready_check: Callable[[], bool]) -> MetricsServer:
        """Serve /metrics, /healthz and /readyz on `bind` (e.g. cfg.metrics_host_port) in a daemon thread."""
        return MetricsServer(self.registry, bind, ready_check)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, bind: tuple[str, int], registry: CollectorRegistry, ready: Callable[[], bool]) -> None:
        self.address_family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
        self.registry = registry
        self.ready = ready
        super().__init__(bind, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            try:
                body = encoder(self.server.registry)
            except Exception as e:  # a failed read is a failed scrape: Prometheus shows it on /targets
                log.exception("metrics scrape failed")
                self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, f"scrape failed: {e}\n".encode())
                return
            self._reply(HTTPStatus.OK, body, content_type)
        elif path == "/healthz":
            self._reply(HTTPStatus.OK, b"ok\n")
        elif path == "/readyz":
            try:
                ready = self.server.ready()
            except Exception:
                log.exception("readiness check failed")
                ready = False
            if ready:
                self._reply(HTTPStatus.OK, b"ready\n")
            else:
                self._reply(HTTPStatus.SERVICE_UNAVAILABLE, b"not ready\n")
        else:
            self._reply(HTTPStatus.NOT_FOUND, b"try /metrics, /healthz or /readyz\n")

    def _reply(self, status: HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8"
               ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # scrapes every few seconds: not worth a line
        log.debug("metrics http: " + format, *args)


class MetricsServer:
    """The running HTTP endpoint; `port` is the bound one (useful with port 0), shutdown() stops it."""

    def __init__(self, registry: CollectorRegistry, bind: tuple[str, int], ready: Callable[[], bool]) -> None:
        self._httpd = _Server(bind, registry, ready)
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="sknf-metrics", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
