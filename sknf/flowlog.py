"""`sknf flows`: the BPF datapath's flow events (new flows, drops), resolved to who sent and received them.

The programs report events through a ring buffer (bpf/lib/events.h, read by sknf.datapath.events);
the agent resolves each event once, as it arrives, and keeps the last CAPACITY of them in a ring
(`FlowLog`), served over its socket as {"op": "flows"}. Resolving on arrival is what can name a
flow's ends at all: a pod deleted a minute later, or conntrack's entry of a Service flow, is gone by
the time someone asks. Addresses resolve as far as this node knows: its own pods by their leases
(namespace/pod), other pods by the peer whose pod subnet holds them, node addresses (underlay and
gateway) by peer, a ClusterIP by conntrack (the flow's original destination, DNATed to a backend),
everything else as "world".

Memory: CAPACITY events of ~0.3 KiB each (a slotted record, a float, the ports; the parties are
shared through the resolver's cache), 1.1 MiB for 4,096 (tests/unit/test_flowlog.py measures it),
plus the cache of at most CACHE_LIMIT resolved addresses (~1 MiB when every address differs).

The socket protocol is one request, one reply; following is a long poll: {"op": "flows", "after":
<seq>, "wait": <s>} answers as soon as an event newer than seq exists, or after wait seconds.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sknf import api, cni, conntrack, stats
from sknf.config import Config, Network
from sknf.datapath.events import RawEvent
from sknf.peers import Node, pod_subnets

log = logging.getLogger(__name__)

CAPACITY = 4096  # events the agent keeps
MAX_WAIT = 20.0  # longest long poll (the client's socket timeout is 30 s)
CONNTRACK_GRACE = 0.05  # a Service flow's first frame may be read before its conntrack entry is confirmed
CACHE_LIMIT = 4096  # resolved addresses kept between refreshes (world addresses are unbounded)
REFRESH = 1.0  # seconds between re-reads of the leases, peers and interface names
FRESH = 0.1  # ... and at least between re-reads for a local address or device not known yet (a pod just added)
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
NO_EVENTS = 3  # `sknf flows` exit status: this node's datapath has no flow events (kernel datapath)


@dataclass(frozen=True, slots=True)
class Party:
    """One end of a flow as this node knows it."""

    ip: str
    kind: str  # pod (this node's), remote-pod, node, service, cluster, world; "" without an address
    namespace: str = ""
    pod: str = ""
    node: str = ""

    def label(self, port: int = 0) -> str:
        """How a table shows it: this node's pods by name, everything else by address and what it is."""
        at = f":{port}" if port else ""
        if self.kind == "pod" and self.pod:
            return (f"{self.namespace}/{self.pod}" if self.namespace else self.pod) + at
        if not self.ip:
            return "-"
        what = {"pod": f"pod on {self.node}", "remote-pod": f"pod on {self.node}", "node": f"node {self.node}"}
        return f"{self.ip}{at} ({what.get(self.kind, self.kind)})"

    def to_json(self) -> dict[str, str]:
        return {k: v for k, v in (("ip", self.ip), ("kind", self.kind), ("namespace", self.namespace),
                                  ("pod", self.pod), ("node", self.node)) if v}


@dataclass(frozen=True, slots=True)
class Flow:
    """One event, resolved."""

    seq: int
    time: float
    kind: str  # "flow" (new) or "drop"
    path: str  # fast, kernel, dropped
    reason: str  # a drop's
    hook: str  # from-pod, to-pod, from-overlay
    device: str  # the hook's interface
    proto: int
    src: Party
    sport: int
    dst: Party
    dport: int
    backend: Party | None = None  # a Service flow: where conntrack sent it
    backend_port: int = 0

    def parties(self) -> Iterable[Party]:
        return (self.src, self.dst, *((self.backend,) if self.backend else ()))

    def to_json(self) -> dict[str, Any]:
        out = {"seq": self.seq, "time": self.time, "kind": self.kind, "path": self.path, "hook": self.hook,
               "device": self.device, "protocol": PROTOCOLS.get(self.proto, str(self.proto)),
               "src": {**self.src.to_json(), "port": self.sport}, "dst": {**self.dst.to_json(), "port": self.dport}}
        if self.reason:
            out["reason"] = self.reason
        if self.backend is not None:
            out["backend"] = {**self.backend.to_json(), "port": self.backend_port}
        return out


@dataclass(frozen=True)
class NodeView:
    """What the agent knows about the cluster, for resolving addresses."""

    node: str
    clusters: tuple[Network, ...]  # one per family
    leases: list  # sknf.ipam.Lease
    peers: list[Node]  # this node included


class Resolver:
    """Addresses and interfaces to names, from a NodeView re-read every REFRESH seconds, and sooner (FRESH)
    for an address of this node's subnet or a device it does not know yet: a pod's first frames follow
    its ADD by milliseconds."""

    def __init__(self, view: Callable[[], NodeView]) -> None:
        self._view = view
        self._read_at = -REFRESH
        self._clusters: tuple[Network, ...] = ()
        self._node = ""
        self._known: dict[str, Party] = {}
        self._subnets: list[tuple[Network, str]] = []
        self._devices: dict[int, str] = {}
        self._cache: dict[str, Party] = {}

    def _refresh(self, every: float = REFRESH) -> bool:
        """Re-read the view if it is older than `every` seconds; True if it was."""
        now = time.monotonic()
        if now - self._read_at < every:
            return False
        self._read_at = now
        try:
            view = self._view()
        except Exception as e:  # a lease store being rebuilt: resolve with what was read before
            log.warning("flow events: cannot read the node's leases and peers (%s); names may be stale", e)
            return False
        self._node, self._clusters = view.node, view.clusters
        known: dict[str, Party] = {}
        subnets = []
        for peer in view.peers:
            known[peer.underlay_ip] = Party(peer.underlay_ip, "node", node=peer.name)
            for net in pod_subnets(peer.pod_cidr):  # one per family
                gateway = str(net.network_address + 1)
                known[gateway] = Party(gateway, "node", node=peer.name)
                subnets.append((net, peer.name))
        for lease in view.leases:
            for ip in filter(None, (str(lease.ip), str(lease.ip6 or ""))):
                known[ip] = Party(ip, "pod", lease.namespace, lease.pod or lease.container_id[:12], view.node)
        self._known, self._subnets, self._cache = known, subnets, {}
        self._devices = dict(socket.if_nameindex())
        return True

    def party(self, ip: str) -> Party:
        self._refresh()
        found = self._lookup(ip)
        if found.kind == "pod" and not found.pod and self._refresh(FRESH):
            found = self._lookup(ip)
        return found

    def _lookup(self, ip: str) -> Party:
        if (found := self._known.get(ip) or self._cache.get(ip)) is not None:
            return found
        found = self._classify(ip)
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[ip] = found
        return found

    def _classify(self, ip: str) -> Party:
        if not ip:
            return Party("", "")
        addr = ipaddress.ip_address(ip)
        for net, node in self._subnets:
            if addr in net:
                return Party(ip, "pod" if node == self._node else "remote-pod", node=node)
        if any(addr in net for net in self._clusters):
            return Party(ip, "cluster")
        return Party(ip, "world")

    def device(self, ifindex: int) -> str:
        self._refresh()
        if ifindex not in self._devices:
            self._refresh(FRESH)
        return self._devices.get(ifindex, str(ifindex))


class FlowLog:
    """The last CAPACITY events, resolved; fed by the ring-buffer reader's thread, read by socket handlers."""

    def __init__(self, resolver: Resolver, lost: Callable[[], int], capacity: int = CAPACITY) -> None:
        self._resolver = resolver
        self._lost = lost
        self._events: deque[Flow] = deque(maxlen=capacity)
        self._cond = threading.Condition()
        self._seq = 0
        self._conntrack: conntrack.Conntrack | None = None

    def add(self, raw: RawEvent) -> None:
        """Resolve one event and keep it (the reader thread calls this for every event)."""
        r = self._resolver
        src, dst = r.party(raw.src), r.party(raw.dst)
        backend, backend_port = None, 0
        if raw.kind == "flow" and dst.kind == "world" and raw.proto in conntrack.PORT_PROTOS:
            original = self._service_backend(raw)
            if original is not None:
                dst = Party(raw.dst, "service")
                backend, backend_port = r.party(original[0]), original[2]
        with self._cond:
            self._seq += 1
            self._events.append(Flow(self._seq, raw.time, raw.kind, raw.path, raw.reason, raw.hook,
                                     r.device(raw.ifindex), raw.proto, src, raw.sport, dst, raw.dport, backend,
                                     backend_port))
            self._cond.notify_all()

    def _service_backend(self, raw: RawEvent) -> conntrack.FlowTuple | None:
        """The reply tuple of a flow conntrack DNATed (its destination was a Service), else None."""
        t = (raw.src, raw.dst, raw.sport, raw.dport, raw.proto)
        entry = self._conntrack_entry(t)
        wait = raw.time + CONNTRACK_GRACE - time.time()
        if entry is None and wait > 0:
            time.sleep(wait)  # the entry is confirmed once the frame has left the node's stack
            entry = self._conntrack_entry(t)
        return entry.reply if entry is not None and entry.reply[0] != raw.dst else None

    def _conntrack_entry(self, t: conntrack.FlowTuple) -> conntrack.Entry | None:
        try:
            if self._conntrack is None:
                self._conntrack = conntrack.Conntrack()  # in the reader's thread: the agent's namespace
            return self._conntrack.entries([t]).get(t)
        except OSError as e:
            log.debug("flow events: no conntrack lookup (%s)", e)
            if self._conntrack is not None:
                self._conntrack.close()
                self._conntrack = None
            return None

    def query(self, req: dict[str, Any]) -> dict[str, Any]:
        """{"op": "flows"}: events newer than "after" (else the last "last"), of pods matching "namespace" and
        "pod" (as `sknf stats` matches them), waiting up to "wait" seconds for one to arrive."""
        after, last, wait = req.get("after"), req.get("last", 100), req.get("wait", 0)
        namespace, pod = req.get("namespace"), req.get("pod")
        if after is not None and (not isinstance(after, int) or isinstance(after, bool) or after < 0):
            raise cni.CniError(cni.INVALID_CONFIG, "after must be a non-negative integer")
        if not isinstance(last, int) or isinstance(last, bool) or last < 0:
            raise cni.CniError(cni.INVALID_CONFIG, "last must be a non-negative integer")
        if not isinstance(wait, int | float) or isinstance(wait, bool) or not 0 <= wait <= MAX_WAIT:
            raise cni.CniError(cni.INVALID_CONFIG, f"wait must be between 0 and {MAX_WAIT:.0f} seconds")
        if not all(v is None or isinstance(v, str) for v in (namespace, pod)):
            raise cni.CniError(cni.INVALID_CONFIG, "namespace and pod must be strings")
        with self._cond:
            if after is not None and wait:
                self._cond.wait_for(lambda: self._seq > after, timeout=wait)
            start = after if after is not None else 0
            shown = [f for f in self._events if f.seq > start and _matches(f, namespace, pod)]
            if after is None:
                shown = shown[-last:] if last else []
            oldest = self._events[0].seq if self._events else self._seq + 1
            newest = self._seq
        return {"datapath": "bpf", "events": [f.to_json() for f in shown], "next": newest,
                "missed": max(0, oldest - 1 - after) if after is not None else 0, "lost": self._lost(),
                "capacity": self._events.maxlen}


def _matches(flow: Flow, namespace: str | None, pod: str | None) -> bool:
    if namespace is None and pod is None:
        return True
    return any(p.kind == "pod" and p.pod and stats.matches({"namespace": p.namespace, "pod": p.pod}, namespace, pod)
               for p in flow.parties())


def unavailable(mode: str, why: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The {"op": "flows"} handler of an agent without flow events (kernel datapath, flow_events off)."""
    return lambda _req: {"datapath": mode, "unavailable": why, "events": []}


# ---- command line --------------------------------------------------------------------------------------

def _endpoint(party: dict[str, Any]) -> str:
    p = Party(party.get("ip", ""), party.get("kind", ""), party.get("namespace", ""), party.get("pod", ""),
              party.get("node", ""))
    return p.label(party.get("port", 0))


def render_line(ev: dict[str, Any]) -> str:
    """One event as a table row."""
    stamp = datetime.fromtimestamp(ev["time"]).strftime("%H:%M:%S.%f")[:-3]
    what = f"DROP {ev['reason']}" if ev["kind"] == "drop" else f"new {ev['path']}"
    dst = _endpoint(ev["dst"])
    if (b := ev.get("backend")) is not None:
        dst += f" => {_endpoint(b)}"
    return f"{stamp:<12} {what:<18} {ev['protocol']:<6} {_endpoint(ev['src'])} -> {dst}  [{ev['hook']} {ev['device']}]"


HEADER = f"{'TIME':<12} {'EVENT':<18} {'PROTO':<6} SOURCE -> DESTINATION (=> SERVICE BACKEND)  [HOOK DEVICE]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Flow events of this node's eBPF datapath: every new flow (its first frame this node "
                          "sees) and every dropped frame, with source and destination resolved. Asks the agent, "
                          f"which keeps the last {CAPACITY}. Exit 1: no agent; {NO_EVENTS}: the node runs the "
                          "kernel datapath, which has no flow events.")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing events as they arrive")
    parser.add_argument("-n", "--namespace", help="only flows of pods in this namespace (this node's pods)")
    parser.add_argument("--pod", help="only flows of pods whose name contains this, or matches it as a glob (*?[)")
    parser.add_argument("--last", type=int, default=20, help="how many past events to show first (default 20)")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table",
                        help="table, or json: one event per line")
    parser.add_argument("-c", "--config", type=Path, help="the agent's configuration file (for its socket path)")
    parser.add_argument("--socket", type=Path, help="agent socket (default: the configuration's, else "
                        "/run/sknf/sknf.sock)")


def _ask(sock: Path, req: dict[str, Any]) -> dict[str, Any]:
    reply = api.request(sock, {"op": "flows", **req}, timeout=MAX_WAIT + 10)
    if not reply["ok"]:
        err = reply.get("error") or {}
        raise stats.SourceError(f"agent at {sock} refused the flows query: {err.get('msg', err)}")
    return reply["result"]


def run(args: argparse.Namespace) -> int:
    if args.last < 0:
        print("sknf flows: --last must be at least 0", file=sys.stderr)
        return 2
    cfg = stats.agent_config(args.config) if args.config else None
    sock = args.socket or (cfg.socket_path if cfg else Config.run_dir / "sknf.sock")
    filters = {"namespace": args.namespace, "pod": args.pod}
    try:
        reply = _ask(sock, {"last": args.last, **filters})
        if reply.get("unavailable"):
            print(f"sknf flows: no flow events on this node: {reply['unavailable']}", file=sys.stderr)
            return NO_EVENTS
        if reply.get("lost"):
            print(f"sknf flows: {reply['lost']} events lost since the programs were loaded (the ring buffer was "
                  "full: the agent was down or could not keep up)", file=sys.stderr)
        if args.output == "table":
            print(HEADER)
        while True:
            for ev in reply["events"]:
                print(json.dumps(ev) if args.output == "json" else render_line(ev), flush=args.follow)
            if reply.get("missed"):
                print(f"sknf flows: {reply['missed']} events fell out of the agent's buffer", file=sys.stderr)
            if not args.follow:
                return 0
            reply = _ask(sock, {"after": reply["next"], "wait": MAX_WAIT / 2, **filters})
    except OSError as e:
        print(f"sknf flows: {stats._agent_problem(sock, e)}", file=sys.stderr)
        return 1
    except stats.SourceError as e:
        print(f"sknf flows: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
