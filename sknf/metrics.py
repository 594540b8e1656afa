"""Prometheus metrics of the agent: per-pod traffic read at scrape time, plus the agent's own instruments.

Why the pod figures are read at scrape time rather than kept in Counter objects: the datapath already
keeps the authoritative counters (BPF maps, or each host veth's link statistics), so a scrape reads
them and the current IPAM leases at that moment. A pod whose lease is gone is simply not in the next
snapshot, so its series disappear with it (no labelled child to forget to remove, no cardinality leak),
and restarting the agent loses nothing because the kernel kept counting.

Why sknf writes those series' exposition text itself: prometheus_client renders ~5 us per sample (label
validation and escaping per sample), and 2,000 pods make 14,000 samples, 70 ms of a 100 ms scrape
budget. The snapshot's families have fixed, valid names and labels, so only label values need
escaping; both exposition formats are written (Prometheus asks for OpenMetrics) and the agent's own
instruments (CNI latency, reconcile errors) still go through prometheus_client, appended after them.

Everything lives in the `Metrics` object the agent owns (its own CollectorRegistry, never the global one),
so tests and several in-process agents never share state.
"""

from __future__ import annotations

import logging
import platform
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address
from operator import attrgetter
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder

import sknf
from sknf.datapath import REFUSED_REASONS, PodCounters

if TYPE_CHECKING:
    from sknf.datapath import Datapath
    from sknf.datapath.flows import FlowTable
    from sknf.ipam import Store

log = logging.getLogger(__name__)

MODES = ("bpf", "kernel")
# CNI ADD is a few ms warm and up to seconds when the node is busy; DEL waits on netns teardown.
CNI_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# sknf_pod_<name>_total: (name, PodCounters field, help)
POD_SERIES = (
    ("receive_bytes", "rx_bytes", "Bytes delivered to the pod."),
    ("transmit_bytes", "tx_bytes", "Bytes sent by the pod."),
    ("receive_packets", "rx_packets", "Packets delivered to the pod."),
    ("transmit_packets", "tx_packets", "Packets sent by the pod."),
    ("fastpath_packets", "fast_packets", "Pod packets forwarded by the BPF fast path (BPF datapath only)."),
    ("kernelpath_packets", "kernel_packets", "Pod packets left to the kernel's bridge path (BPF datapath only)."),
    ("drops", "drops", "Pod packets dropped by the datapath."),
)
_pod_values = attrgetter(*(f for _, f, _ in POD_SERIES))
OPENMETRICS = "application/openmetrics-text"
# What Prometheus 2.x/3.x sends: it gets OpenMetrics (tests and the benchmark scrape as it does).
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                     "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
Exposition = Callable[[str], tuple[bytes, str]]  # Accept header -> (body, content type)


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
    flows: FlowTable | None = None  # the BPF datapath's learned-flow map; None: kernel datapath
    events_lost: int | None = None  # flow events the full ring buffer refused; None: kernel datapath
    taken: float = field(default_factory=time.time)


def join(leases: Iterable[PodIdentity],
         counters: dict[str, PodCounters]) -> list[tuple[PodIdentity, PodCounters | None]]:
    """Pair each lease with its host veth's counters (from Datapath.read_counters).

    Counters of a veth without a lease (a pod being deleted) are left out, so only current pods are
    ever shown; a lease not counted yet gets None (shown as zeros).
    """
    return [(lease, counters.get(lease.host_ifname)) for lease in leases]


def take_snapshot(node: str, store: Store, datapath: Datapath, peers: int | None,
                  policy_drops: dict[str, int] | None = None) -> Snapshot:
    """What a scrape and the agent's stats reply show: one read of the counters, then of the leases
    (a pod added in between shows zeros, one deleted in between is not shown). policy_drops: frames
    NetworkPolicy dropped per pod address (sknf.policy.nft), reason `policy` beside the refused ones."""
    counters = datapath.read_counters()
    leases = store.current()
    for lease in leases if policy_drops else ():
        if n := sum(policy_drops.get(str(ip), 0) for ip in lease.ips):  # IPv6 drops count for the same pod
            c = counters.setdefault(lease.host_ifname, PodCounters())
            c.refused = {**c.refused, "policy": c.refused.get("policy", 0) + n}  # + the BPF programs' own
            c.drops += n
    flow_table = getattr(datapath, "flow_table", None)  # only the BPF datapath learns flows
    events_lost = getattr(datapath, "events_lost", None)  # and reports flow events
    return Snapshot(node=node, datapath_mode=datapath.mode, datapath_reason=datapath.reason,
                    pods=join(leases, counters), ipam_allocated=len(leases), ipam_capacity=store.capacity,
                    peers=peers, flows=flow_table() if flow_table is not None else None,
                    events_lost=events_lost() if events_lost is not None else None)


def pod_label(ident: PodIdentity) -> tuple[str, str]:
    """(namespace, pod) for display and labels; runtimes that pass no K8S_* args get the container ID."""
    return ident.namespace, ident.pod or ident.container_id[:12]


BUILD_LABELS = {"version": sknf.__version__, "python": platform.python_version(),
                "kernel": platform.release()}


def _escape(value: str) -> str:
    """A label value as both exposition formats quote it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(out: list[str], name: str, kind: str, doc: str, samples: Iterable[tuple[str, int]],
            openmetrics: bool) -> None:
    """One metric family; the formats differ only in a counter's family name (OpenMetrics drops _total)."""
    sample_name = f"{name}_total" if kind == "counter" else name
    family = name if openmetrics else sample_name
    out.append(f"# HELP {family} {doc}\n# TYPE {family} {kind}\n")
    out.extend(f"{sample_name}{{{labels}}} {value}\n" for labels, value in samples)


def _pod_totals(snap: Snapshot) -> dict[tuple[str, str], tuple[int | None, ...]]:
    """POD_SERIES values per (namespace, pod), sorted. Two leases of one pod (a sandbox re-created before
    the old one's DEL) are summed: duplicate series would make Prometheus reject the whole scrape."""
    totals: dict[tuple[str, str], tuple[int | None, ...]] = {}
    zero = PodCounters()
    for ident, counted in snap.pods:
        values = _pod_values(counted or zero)
        key = pod_label(ident)
        if (seen := totals.get(key)) is not None:
            values = tuple(None if a is None or b is None else a + b for a, b in zip(seen, values, strict=True))
        totals[key] = values
    return dict(sorted(totals.items()))


def _refused_totals(snap: Snapshot) -> dict[tuple[str, str], dict[str, int]]:
    """Refused frames by reason per (namespace, pod), sorted; two leases of one pod are summed."""
    totals: dict[tuple[str, str], dict[str, int]] = {}
    for ident, counted in snap.pods:
        acc = totals.setdefault(pod_label(ident), dict.fromkeys(REFUSED_REASONS, 0))
        for reason, n in (counted.refused if counted else {}).items():
            acc[reason] = acc.get(reason, 0) + n
    return dict(sorted(totals.items()))


def render_snapshot(snap: Snapshot, openmetrics: bool = False) -> str:
    """The snapshot's metric families as exposition text (OpenMetrics without its closing # EOF)."""
    node = f'node="{_escape(snap.node)}"'
    totals = _pod_totals(snap)
    labels = [f'namespace="{_escape(ns)}",{node},pod="{_escape(pod)}"' for ns, pod in totals]
    out: list[str] = []
    for i, (name, _, doc) in enumerate(POD_SERIES):
        samples = [(lab, values[i]) for lab, values in zip(labels, totals.values(), strict=True)
                   if values[i] is not None]  # the kernel datapath cannot tell fast from kernel path: no series
        if samples:
            _family(out, f"sknf_pod_{name}", "counter", doc, samples, openmetrics)
    refused = [(f'{lab},reason="{reason}"', n) for lab, by_reason in zip(labels, _refused_totals(snap).values(),
                                                                          strict=True)
               for reason, n in by_reason.items()]
    if refused:
        _family(out, "sknf_pod_refused_packets", "counter", "Pod frames source validation dropped, by reason "
                "(spoofed_mac, spoofed_arp, spoofed_ip, ipv6, protocol) and NetworkPolicy drops (policy); "
                "included in drops.", refused, openmetrics)
    _family(out, "sknf_datapath_mode", "gauge", "1 for the datapath this agent runs, else 0.",
            [(f'{node},mode="{m}"', int(snap.datapath_mode == m)) for m in MODES], openmetrics)
    gauges = [("sknf_ipam_allocated_addresses", "Pod addresses leased on this node.", snap.ipam_allocated),
              ("sknf_ipam_capacity_addresses", "Pod addresses this node's subnet can lease.", snap.ipam_capacity),
              ("sknf_overlay_peers", "Other nodes this node's overlay forwards to.", snap.peers)]
    for name, doc, v in gauges:
        if v is not None:
            _family(out, name, "gauge", doc, [(node, v)], openmetrics)
    if (ft := snap.flows) is not None:
        for name, kind, doc, v in (
                ("sknf_flow_map_entries", "gauge", "Flows in the BPF learned-flow map (kept on the kernel path).",
                 ft.entries),
                ("sknf_flow_map_capacity_entries", "gauge", "Entries the learned-flow map can hold.", ft.capacity),
                ("sknf_flow_map_full", "gauge", "1 while a refused learn holds all pod traffic on the kernel path.",
                 int(ft.full)),
                ("sknf_flow_map_syncing", "gauge", "1 while the agent seeds the learned-flow map (pod traffic on "
                 "the kernel path).", int(ft.syncing)),
                ("sknf_flow_map_failed_learns", "counter", "Flow learns the full map refused.", ft.failed_learns)):
            _family(out, name, kind, doc, [(node, v)], openmetrics)
    if snap.events_lost is not None:
        _family(out, "sknf_flow_events_lost", "counter", "Flow events the BPF programs could not queue (ring "
                "buffer full): `sknf flows` misses them.", [(node, snap.events_lost)], openmetrics)
    build = ",".join(f'{k}="{_escape(v)}"' for k, v in BUILD_LABELS.items())
    _family(out, "sknf_build_info", "gauge", "Always 1; labels say what is running.", [(f"{node},{build}", 1)],
            openmetrics)
    return "".join(out)


class Metrics:
    """The agent's metrics: pod and node figures from `snapshot` at scrape time, plus instruments.

    Every series carries `node`, so dashboards filter by node without relabelling rules in Prometheus.
    """

    def __init__(self, node: str, snapshot: Callable[[], Snapshot]) -> None:
        self.node = node
        self._snapshot = snapshot
        self._registry = CollectorRegistry(auto_describe=False)  # the instruments below
        cni = ["node", "command", "result"]
        self._cni_requests = Counter("sknf_cni_requests", "CNI requests handled by the agent.", cni,
                                     registry=self._registry)
        self._cni_seconds = Histogram("sknf_cni_request_duration_seconds",
                                      "Time the agent took to handle a CNI request.", cni,
                                      buckets=CNI_BUCKETS, registry=self._registry)
        self._reconcile_errors = Counter("sknf_reconcile_errors", "Reconcile steps that failed.",
                                         ["node", "step"], registry=self._registry)

    @property
    def registry(self) -> CollectorRegistry:
        """Where other parts of the agent (peer health) add their instruments; scraped after the pods'."""
        return self._registry

    def observe_cni(self, command: str, result: str, seconds: float) -> None:
        """Count one CNI request; `result` is "success" or a short error kind (few distinct values)."""
        self._cni_requests.labels(self.node, command, result).inc()
        self._cni_seconds.labels(self.node, command, result).observe(seconds)

    def reconcile_error(self, step: str) -> None:
        self._reconcile_errors.labels(self.node, step).inc()

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """One scrape: (body, content type) in the format the Accept header prefers."""
        encoder, content_type = choose_encoder(accept)
        pods = render_snapshot(self._snapshot(), content_type.startswith(OPENMETRICS))
        return pods.encode() + encoder(self._registry), content_type  # OpenMetrics' "# EOF" comes last

    def serve(self, bind: tuple[str, int], ready_check: Callable[[], bool]) -> MetricsServer:
        """Serve /metrics, /healthz and /readyz on `bind` (e.g. cfg.metrics_host_port) in a daemon thread."""
        return MetricsServer(self.exposition, bind, ready_check)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, bind: tuple[str, int], exposition: Exposition, ready: Callable[[], bool]) -> None:
        self.address_family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
        self.exposition = exposition
        self.ready = ready
        super().__init__(bind, _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the address (socket.getfqdn): on a node whose resolver
        does not answer yet, it held the agent's start for the resolver's 5 s timeout."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body, content_type = self.server.exposition(self.headers.get("Accept", ""))
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

    def __init__(self, exposition: Exposition, bind: tuple[str, int], ready: Callable[[], bool]) -> None:
        self._httpd = _Server(bind, exposition, ready)
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="sknf-metrics", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
