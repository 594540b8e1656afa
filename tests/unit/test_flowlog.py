"""Flow events without a kernel: decoding the programs' records, resolving addresses, the agent's bounded
log and its long poll, the table, and what `sknf flows` says on a node without flow events."""

from __future__ import annotations

import ctypes
import gc
import ipaddress
import os
import socket
import threading
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest

from sknf import api, cni, flowlog
from sknf.agent import Agent
from sknf.cli import main
from sknf.datapath import events
from sknf.datapath.events import FlowEventStruct, RawEvent
from sknf.ipam import Lease
from sknf.peers import Node


def record(src: bytes, dst: bytes, **fields: int) -> bytes:
    ev = FlowEventStruct(**fields)
    ev.saddr[:] = src
    ev.daddr[:] = dst
    return bytes(ev)


def mapped(ip: str) -> bytes:
    return bytes(10) + b"\xff\xff" + socket.inet_aton(ip)


def test_struct_is_the_c_layout() -> None:
    assert ctypes.sizeof(FlowEventStruct) == 56  # struct flow_event in bpf/lib/events.h
    assert FlowEventStruct.ifindex.offset == 40 and FlowEventStruct.proto.offset == 50


def test_decode_ipv4_flow() -> None:
    raw = record(mapped("10.244.1.2"), mapped("10.96.0.10"), time_ns=2_000_000_000, ifindex=7,
                 sport=socket.htons(40000), dport=socket.htons(80), ethertype=socket.htons(0x0800), proto=6,
                 kind=1, hook=1, path=2)
    ev = events.decode(raw, boot_offset=1000.0)
    assert ev == RawEvent(time=1002.0, kind="flow", hook="from-pod", path="kernel", reason="", src="10.244.1.2",
                          dst="10.96.0.10", proto=6, sport=40000, dport=80, ifindex=7, ethertype=0x0800)


def test_decode_drops_of_ipv6_and_addressless_frames() -> None:
    v6 = ipaddress.IPv6Address("fe80::1").packed
    ev = events.decode(record(v6, ipaddress.IPv6Address("ff02::1").packed, kind=2, hook=1, path=3, reason=3,
                              proto=58), 0.0)
    assert (ev.kind, ev.reason, ev.src, ev.dst, ev.path) == ("drop", "ipv6", "fe80::1", "ff02::1", "dropped")
    ev = events.decode(record(bytes(16), bytes(16), kind=2, reason=5), 0.0)
    assert (ev.reason, ev.src, ev.dst) == ("redirect", "", "")  # DROP_REDIRECT, no addresses


def test_decode_refuses_a_short_record() -> None:
    with pytest.raises(events.bpfmaps.LayoutMismatch):
        events.decode(b"\0" * 40, 0.0)


def view() -> flowlog.NodeView:
    """A dual-stack node: its peers' subnets one per family, a lease with both addresses."""
    leases = [Lease(ipaddress.IPv4Address("10.244.1.2"), "c" * 64, "eth0", "default", "web", "sknf1",
                    ip6=ipaddress.IPv6Address("fd00:10:244:1::2")),
              Lease(ipaddress.IPv4Address("10.244.1.3"), "d" * 64, "eth0")]
    peers = [Node("n1", "198.51.100.11", "10.244.1.0/24,fd00:10:244:1::/64"),
             Node("n2", "198.51.100.12", "10.244.2.0/24,fd00:10:244:2::/64")]
    return flowlog.NodeView("n1", (ipaddress.IPv4Network("10.244.0.0/16"), ipaddress.IPv6Network("fd00:10:244::/56")),
                            leases, peers)


@pytest.mark.parametrize(("ip", "kind", "label"), [
    ("10.244.1.2", "pod", "default/web:80"),
    ("10.244.1.3", "pod", "dddddddddddd:80"),  # a runtime without K8S_* args: the container ID
    ("10.244.1.9", "pod", "10.244.1.9:80 (pod on n1)"),  # this node's subnet, no lease (yet)
    ("10.244.2.7", "remote-pod", "10.244.2.7:80 (pod on n2)"),
    ("10.244.2.1", "node", "10.244.2.1:80 (node n2)"),  # n2's gateway
    ("198.51.100.12", "node", "198.51.100.12:80 (node n2)"),
    ("10.244.9.9", "cluster", "10.244.9.9:80 (cluster)"),  # no node holds that subnet
    ("203.0.113.10", "world", "203.0.113.10:80 (world)"),
    ("fe80::1", "world", "fe80::1:80 (world)"),
    ("fd00:10:244:1::2", "pod", "default/web:80"),  # the same pod by its IPv6 lease
    ("fd00:10:244:2::7", "remote-pod", "fd00:10:244:2::7:80 (pod on n2)"),
    ("fd00:10:244:2::1", "node", "fd00:10:244:2::1:80 (node n2)"),
    ("fd00:10:244:9::9", "cluster", "fd00:10:244:9::9:80 (cluster)"),
])
def test_resolution(ip: str, kind: str, label: str) -> None:
    party = flowlog.Resolver(view).party(ip)
    assert party.kind == kind and party.label(80) == label


def test_a_pod_just_added_is_named_without_waiting_for_the_next_refresh() -> None:
    current = view()
    resolver = flowlog.Resolver(lambda: current)
    assert resolver.party("10.244.1.9").pod == ""  # no lease yet
    current.leases.append(Lease(ipaddress.IPv4Address("10.244.1.9"), "e" * 64, "eth0", "default", "new"))
    time.sleep(flowlog.FRESH * 1.5)  # well before REFRESH
    assert resolver.party("10.244.1.9").label() == "default/new"
    assert resolver.party("203.0.113.10").kind == "world"


def raw(src: str = "10.244.1.2", dst: str = "10.244.2.7", kind: str = "flow", proto: int = 6,
        dport: int = 8080) -> RawEvent:
    return RawEvent(time=time.time(), kind=kind, hook="from-pod", path="fast", reason="", src=src, dst=dst,
                    proto=proto, sport=40000, dport=dport, ifindex=1, ethertype=0x0800)


def test_log_is_bounded_and_says_what_fell_out() -> None:
    log = flowlog.FlowLog(flowlog.Resolver(view), lost=lambda: 7, capacity=3)
    for _ in range(5):
        log.add(raw())
    reply = log.query({"last": 10})
    assert [e["seq"] for e in reply["events"]] == [3, 4, 5]
    assert (reply["next"], reply["lost"], reply["capacity"]) == (5, 7, 3)
    assert log.query({"after": 1})["missed"] == 1  # seq 2 is gone
    assert [e["seq"] for e in log.query({"last": 2})["events"]] == [4, 5]
    assert log.query({"last": 0})["events"] == []


def test_filters_match_this_nodes_pods_on_either_end() -> None:
    log = flowlog.FlowLog(flowlog.Resolver(view), lost=lambda: 0)
    log.add(raw())  # default/web -> remote pod
    log.add(raw(src="10.244.2.7", dst="10.244.1.3"))  # remote -> the unnamed pod
    log.add(raw(src="203.0.113.10", dst="10.244.1.2", kind="drop"))
    assert [e["seq"] for e in log.query({"pod": "web"})["events"]] == [1, 3]
    assert [e["seq"] for e in log.query({"pod": "w*", "namespace": "default"})["events"]] == [1, 3]
    assert log.query({"namespace": "kube-system"})["events"] == []


def test_long_poll_answers_when_an_event_arrives() -> None:
    log = flowlog.FlowLog(flowlog.Resolver(view), lost=lambda: 0)
    log.add(raw())
    timer = threading.Timer(0.2, log.add, [raw(dport=9)])
    timer.start()
    reply = log.query({"after": 1, "wait": 10})
    timer.join()
    assert [e["dst"]["port"] for e in reply["events"]] == [9] and reply["next"] == 2
    assert log.query({"after": 2, "wait": 0.05})["events"] == []  # nothing new: empty after the wait


@pytest.mark.parametrize("req", [{"after": -1}, {"after": "1"}, {"last": True}, {"wait": 999},
                                 {"wait": "1"}, {"pod": 3}])
def test_bad_queries_are_refused(req: dict) -> None:
    with pytest.raises(cni.CniError):
        flowlog.FlowLog(flowlog.Resolver(view), lost=lambda: 0).query(req)


def test_a_service_flow_names_its_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """conntrack's entry of a DNATed flow gives the backend; a flow conntrack did not rewrite stays world."""
    class FakeConntrack:
        def entries(self, tuples):
            return {t: SimpleNamespace(reply=("10.244.2.7", t[0], 8080, t[2], t[4]) if t[1] == "10.96.0.10"
                                       else (t[1], t[0], t[3], t[2], t[4])) for t in tuples}

    monkeypatch.setattr(flowlog.conntrack, "Conntrack", FakeConntrack)
    log = flowlog.FlowLog(flowlog.Resolver(view), lost=lambda: 0)
    log.add(raw(dst="10.96.0.10", dport=80))
    log.add(raw(dst="203.0.113.10", dport=80))
    svc, world = log.query({})["events"]
    assert svc["dst"]["kind"] == "service" and svc["backend"] == {"ip": "10.244.2.7", "kind": "remote-pod",
                                                                  "node": "n2", "port": 8080}
    assert world["dst"]["kind"] == "world" and "backend" not in world
    line = flowlog.render_line(svc)
    assert "default/web:40000 -> 10.96.0.10:80 (service) => 10.244.2.7:8080 (pod on n2)" in line


def test_memory_of_a_full_log() -> None:
    """docs/observability.md states the bound: the full log of CAPACITY events stays under 1.5 MiB."""
    resolver = flowlog.Resolver(view)
    resolver.party("10.244.1.2")  # the node's tables read: the log's share is what is measured
    log = flowlog.FlowLog(resolver, lost=lambda: 0)
    nets = ("203.0.113", "10.244.2")  # the Internet, another node's pods; sources: this node's two pods
    records = [record(mapped(f"10.244.1.{i % 2 + 2}"), mapped(f"{nets[i % 2]}.{i % 250}"), time_ns=i, kind=1, hook=1,
                      path=1, proto=6, sport=socket.htons(30000 + i), dport=socket.htons(443), ifindex=1)
               for i in range(flowlog.CAPACITY)]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for data in records:  # as the reader does: decode, then resolve and keep
        log.add(events.decode(data, 0.0))
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    print(f"{used / 2**20:.2f} MiB, {used / flowlog.CAPACITY:.0f} bytes per event")
    assert used < 1.5 * 2**20, used / flowlog.CAPACITY


@pytest.mark.parametrize("mode", ["kernel", "bpf"])
def test_no_flow_events_is_said_and_has_its_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      mode: str) -> None:
    """The kernel datapath (or flow_events: false) answers that it has no events; the CLI exits NO_EVENTS."""
    agent = SimpleNamespace(flows=None, datapath=SimpleNamespace(mode=mode))
    server = api.serve(tmp_path / "run" / "sknf.sock", {"flows": Agent.flows_handler(agent)}, peer_uid=os.getuid())
    try:
        assert main(["flows", "--socket", str(server.path)]) == flowlog.NO_EVENTS
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert ("kernel datapath has no flow events" if mode == "kernel" else "flow_events: false") in err


def test_no_agent_is_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["flows", "--socket", str(tmp_path / "none.sock")]) == 1
    assert "no agent socket" in capsys.readouterr().err
