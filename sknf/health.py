"""Peer health: the agent pings every peer over the underlay and over the overlay, and remembers who answered.

Why it looks like this:
- Two probes per peer say where a fault is: an ICMP echo to the peer's node address (the underlay
  itself) and one to the peer's gateway address on its `brsknf` (inside VXLAN, so it needs UDP 4789
  open both ways and the peer's `vxsknf` up). Underlay answers but overlay does not: the VXLAN port is
  blocked or the peer's overlay device is gone; neither answers: the node or the network between is.
- At most PROBES_PER_SECOND probes leave a node, shared by the background cycle and `sknf doctor`'s
  on-demand rounds (one pacer), so 5,000 peers take 200 s per cycle instead of flooding the underlay.
  Every peer is probed once per cycle (CYCLE seconds, longer when the cap needs it); a peer that did not
  answer is probed again every RETRY seconds, so a repaired peer is seen within seconds.
- One raw ICMP socket per round and family (ICMPv6 echoes over an IPv6 underlay, or to an IPv6-only
  cluster's gateways; the agent is root; unprivileged ping sockets need a ping_group_range
  most nodes do not grant), replies matched by (address, id, sequence). The thread sleeps between
  probes; its CPU time is counted (`cpu_seconds`, a metric) so its cost stays visible.
- Exported: how many peers are reachable and unreachable (by fault) and an RTT histogram per path,
  never a series per peer (5,000 peers would be 5,000 series per node).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sknf.peers import Node, pod_subnets

log = logging.getLogger(__name__)

PROBES_PER_SECOND = 50.0
CYCLE = 60.0  # seconds between two probes of one peer (longer when PROBES_PER_SECOND needs it)
RETRY = 5.0  # an unreachable peer is probed again this soon
TIMEOUT = 1.0  # a probe without an answer after this long failed
ROUND_CHUNK = 100  # probes between two looks at the peer list (2 s at the cap): 5,000 peers removed
# mid-cycle were probed on for minutes (10,000 probes at 50 a second)
FRESH_LIMIT = 100  # an on-demand round (sknf doctor) probes afresh only up to this many (2 s at the cap)
RTT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
PATHS = ("underlay", "overlay")
ICMP_ECHO, ICMP_ECHO_REPLY = 8, 0
ICMP6_ECHO, ICMP6_ECHO_REPLY = 128, 129  # the kernel fills in an ICMPv6 raw socket's checksums


@dataclass(frozen=True)
class Target:
    peer: str
    path: str  # "underlay" (the peer's node address) or "overlay" (its gateway, through VXLAN)
    address: str


@dataclass(frozen=True)
class Outcome:
    rtt: float | None  # None: no answer within TIMEOUT
    at: float  # unix time of the probe


def targets_of(peers: Iterable[Node], self_name: str) -> list[Target]:
    """Two probes per other node; the overlay one only where its pod subnet (hence gateway) is known."""
    out = []
    for p in sorted(peers, key=lambda n: n.name):
        if p.name == self_name:
            continue
        out.append(Target(p.name, "underlay", p.underlay_ip))
        if p.pod_cidr:  # the first family's gateway (IPv4 in a dual-stack cluster)
            out.append(Target(p.name, "overlay", str(pod_subnets(p.pod_cidr)[0].network_address + 1)))
    return out


class Pacer:
    """Hands out send slots at most `rate` per second to every caller together."""

    def __init__(self, rate: float = PROBES_PER_SECOND) -> None:
        self.interval = 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """The monotonic time at which the caller may send its next probe (that slot is now taken)."""
        with self._lock:
            slot = max(time.monotonic(), self._next)
            self._next = slot + self.interval
            return slot


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, family: int = 4) -> bytes:
    payload = b"sknf-health"
    if family == 6:
        return struct.pack("!BBHHH", ICMP6_ECHO, 0, 0, ident, seq) + payload
    header = struct.pack("!BBHHH", ICMP_ECHO, 0, 0, ident, seq)
    return struct.pack("!BBHHH", ICMP_ECHO, 0, _checksum(header + payload), ident, seq) + payload


def _family(address: str) -> int:
    return 6 if ":" in address else 4


def _open(family: int) -> socket.socket:
    if family == 6:
        return socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)


def _echo_reply(data: bytes, family: int) -> tuple[int, int] | None:
    """(id, sequence) of an echo reply as a raw socket of this family returns it (IPv4 with its header,
    ICMPv6 without), else None."""
    icmp = data[(data[0] & 0x0F) * 4:] if family == 4 else data
    if len(icmp) < 8:
        return None
    kind, _code, _sum, rid, seq = struct.unpack("!BBHHH", icmp[:8])
    return (rid, seq) if kind == (ICMP_ECHO_REPLY if family == 4 else ICMP6_ECHO_REPLY) else None


def probe(targets: list[Target], pacer: Pacer, timeout: float = TIMEOUT,
          stop: threading.Event | None = None) -> dict[Target, Outcome]:
    """One round: an echo to each target, paced, replies collected while waiting for the next slot."""
    ident = random.randrange(1, 1 << 16)
    pending: dict[tuple[str, int], tuple[Target, float]] = {}
    rtts: dict[Target, float] = {}
    started = time.time()
    with contextlib.ExitStack() as stack:
        socks = {f: stack.enter_context(_open(f)) for f in sorted({_family(t.address) for t in targets})}
        for sock in socks.values():
            sock.setblocking(False)
        family_of = {sock: f for f, sock in socks.items()}

        def drain(until: float) -> None:
            while pending:
                left = until - time.monotonic()
                ready = select.select(list(socks.values()), [], [], max(left, 0.0))[0]
                if not ready:
                    if left <= 0:
                        return
                    continue
                for sock in ready:
                    try:
                        data, addr = sock.recvfrom(2048)
                    except BlockingIOError:
                        continue
                    reply = _echo_reply(data, family_of[sock])
                    src = str(ipaddress.ip_address(addr[0].split("%")[0]))
                    if reply is not None and reply[0] == ident and (src, reply[1]) in pending:
                        target, sent = pending.pop((src, reply[1]))
                        rtts[target] = time.monotonic() - sent

        last = time.monotonic()
        for seq, target in enumerate(targets):
            if stop is not None and stop.is_set():
                break
            slot = pacer.reserve()
            drain(slot)
            if (wait := slot - time.monotonic()) > 0:
                time.sleep(wait)
            last = time.monotonic()
            family = _family(target.address)
            key = (str(ipaddress.ip_address(target.address)), seq & 0xFFFF)
            pending[key] = (target, last)
            try:
                socks[family].sendto(echo_request(ident, seq & 0xFFFF, family), (target.address, 0))
            except OSError:  # no route, unreachable at once: the probe failed
                pending.pop(key, None)
        drain(last + timeout)
    return {t: Outcome(rtts.get(t), started) for t in targets}


class PeerHealth:
    """The agent's prober thread and what it learnt; `report()` is the agent's answer to {"op": "health"}."""

    def __init__(self, node_name: str, peers: Callable[[], list[Node]], registry: CollectorRegistry | None = None,
                 *, rate: float = PROBES_PER_SECOND, cycle: float = CYCLE, retry: float = RETRY,
                 timeout: float = TIMEOUT) -> None:
        self.node_name = node_name
        self._peers = peers
        self.pacer = Pacer(rate)
        self.rate, self.cycle_min, self.retry, self.timeout = rate, cycle, retry, timeout
        self._results: dict[Target, Outcome] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.cpu_seconds = 0.0
        self.probes_sent = 0
        self.last_cycle: float | None = None  # unix time the last full cycle began
        self._rtt = Histogram("sknf_peer_rtt_seconds", "Round-trip time of the agent's peer probes.",
                              ["node", "path"], buckets=RTT_BUCKETS, registry=registry)
        if registry is not None:
            registry.register(_Collector(self))
        self._thread = threading.Thread(target=self._run, name="sknf-peer-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def cycle_seconds(self, probes: int) -> float:
        return max(self.cycle_min, probes / self.rate)

    def _round(self, targets: list[Target]) -> None:
        cpu = time.thread_time()
        try:
            got = probe(targets, self.pacer, self.timeout, self._stop)
        except OSError as e:  # no CAP_NET_RAW: say so once per round, keep the thread
            log.warning("peer health: cannot send ICMP probes: %s", e)
            return
        finally:
            elapsed = time.thread_time() - cpu
        with self._lock:
            self.cpu_seconds += elapsed
            self.probes_sent += len(got)
            live = set(targets_of(self._peers(), self.node_name))
            self._results = {t: o for t, o in {**self._results, **got}.items() if t in live}
        for target, outcome in got.items():
            if outcome.rtt is not None:
                self._rtt.labels(self.node_name, target.path).observe(outcome.rtt)

    def _run(self) -> None:
        while not self._stop.is_set():
            targets = targets_of(self._peers(), self.node_name)
            began = time.monotonic()
            self.last_cycle = time.time()
            for i in range(0, len(targets), ROUND_CHUNK):  # a peer removed mid-cycle is not probed on
                live = set(targets_of(self._peers(), self.node_name))
                chunk = [t for t in targets[i:i + ROUND_CHUNK] if t in live]
                if self._stop.is_set():
                    return
                if chunk:
                    self._round(chunk)
            end = began + self.cycle_seconds(len(targets))
            while not self._stop.is_set() and (left := end - time.monotonic()) > 0:
                if self._stop.wait(min(left, self.retry)):
                    return
                failed = [t for t in self.failed() if t in set(targets_of(self._peers(), self.node_name))]
                if failed and end - time.monotonic() > 0:
                    self._round(failed)

    def failed(self) -> list[Target]:
        with self._lock:
            return [t for t, o in self._results.items() if o.rtt is None]

    def probe_now(self, limit: int = FRESH_LIMIT) -> bool:
        """Probe every peer now if that takes at most `limit` probes; False when the cycle's results must do."""
        targets = targets_of(self._peers(), self.node_name)
        if not targets or len(targets) > limit:
            return False
        self._round(targets)
        return True

    def peer_states(self) -> list[dict[str, Any]]:
        """Per peer: each path's last outcome, and whether and where it is at fault."""
        with self._lock:
            results = dict(self._results)
        out = []
        by_peer: dict[str, dict[str, tuple[Target, Outcome | None]]] = {}
        for target in targets_of(self._peers(), self.node_name):
            by_peer.setdefault(target.peer, {})[target.path] = (target, results.get(target))
        for name, paths in by_peer.items():
            row: dict[str, Any] = {"name": name}
            for path, (target, outcome) in paths.items():
                row[path] = {"address": target.address, "probed": outcome is not None,
                             "ok": outcome is not None and outcome.rtt is not None,
                             "rtt": outcome.rtt if outcome else None, "at": outcome.at if outcome else None}
            row["state"] = verdict(row)
            out.append(row)
        return out

    def report(self, fresh: bool = False) -> dict[str, Any]:
        probed_now = self.probe_now() if fresh else False
        peers = self.peer_states()
        return {"fresh": probed_now, "rate_cap": self.rate,
                "cycle_seconds": self.cycle_seconds(len(targets_of(self._peers(), self.node_name))),
                "last_cycle": self.last_cycle, "probes_sent": self.probes_sent,
                "cpu_seconds": round(self.cpu_seconds, 6), "peers": peers}


def verdict(row: dict[str, Any]) -> str:
    """"reachable", "pending" (not probed yet), "underlay" or "overlay" (the path at fault), or
    "icmp-filtered" (the underlay ignores pings but the overlay works: pods are fine)."""
    under, over = row.get("underlay"), row.get("overlay")
    if not under or not under["probed"] or (over and not over["probed"]):
        return "pending"
    if over is None:
        return "reachable" if under["ok"] else "underlay"
    if over["ok"]:
        return "reachable" if under["ok"] else "icmp-filtered"
    return "overlay" if under["ok"] else "underlay"


class _Collector:
    """Counts of reachable and unreachable peers, read at scrape time (no series per peer)."""

    def __init__(self, health: PeerHealth) -> None:
        self.health = health

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable:
        node = self.health.node_name
        states = [p["state"] for p in self.health.peer_states()]
        reachable = GaugeMetricFamily("sknf_peers_reachable", "Peers whose probes were all answered in the last "
                                      "round (a filtered underlay ping with a working overlay counts).",
                                      labels=["node"])
        reachable.add_metric([node], sum(s in ("reachable", "icmp-filtered") for s in states))
        unreachable = GaugeMetricFamily("sknf_peers_unreachable", "Peers that did not answer, by the path at fault.",
                                        labels=["node", "fault"])
        for fault in PATHS:
            unreachable.add_metric([node, fault], sum(s == fault for s in states))
        cpu = CounterMetricFamily("sknf_peer_probe_cpu_seconds", "CPU time the peer prober used.", labels=["node"])
        cpu.add_metric([node], self.health.cpu_seconds)
        return [reachable, unreachable, cpu]
