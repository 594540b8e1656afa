"""The learned-flow sweep's decisions and the BPF loader's small pure helpers (no root, no BCC)."""

from __future__ import annotations

import socket
import sys
from types import SimpleNamespace

from sknf.datapath import flows
from sknf.datapath.bpf import _be32, _ip, _port
from sknf.datapath.bpfload import _diagnostic

TCP, UDP, ICMP = socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.IPPROTO_ICMP
REPLY = ("10.244.1.12", "10.244.1.11", 8080, 40000, UDP)  # a backend's reply to a client


def test_a_flow_conntrack_knows_is_kept_and_unmarked() -> None:
    assert flows.plan_sweep({REPLY: False}, {REPLY}) == flows.SweepPlan([], [], [])
    assert flows.plan_sweep({REPLY: True}, {REPLY}) == flows.SweepPlan([], [REPLY], [])


def test_a_forgotten_flow_is_marked_then_deleted_one_sweep_later() -> None:
    assert flows.plan_sweep({REPLY: False}, set()) == flows.SweepPlan([REPLY], [], [])
    assert flows.plan_sweep({REPLY: True}, set()) == flows.SweepPlan([], [], [REPLY])


def test_conntrack_tuples_cover_both_directions_and_drop_icmp_ids() -> None:
    def tup(saddr, daddr, proto, sport=None, dport=None, family=socket.AF_INET):
        return SimpleNamespace(family=family, saddr=saddr, daddr=daddr, proto=proto, sport=sport, dport=dport)

    dnat = SimpleNamespace(tuple_orig=tup("10.244.1.11", "10.96.0.10", UDP, 40000, 53),
                           tuple_reply=tup("10.244.1.12", "10.244.1.11", UDP, 8080, 40000))
    ping = SimpleNamespace(tuple_orig=tup("10.244.1.11", "10.244.2.11", ICMP),
                           tuple_reply=tup("10.244.2.11", "10.244.1.11", ICMP))
    v6 = SimpleNamespace(tuple_orig=tup("fd00::1", "fd00::2", TCP, 1, 2, socket.AF_INET6),
                         tuple_reply=tup("fd00::2", "fd00::1", TCP, 2, 1, socket.AF_INET6))
    assert flows.conntrack_tuples([dnat, ping, v6]) == {
        ("10.244.1.11", "10.96.0.10", 40000, 53, UDP), REPLY,
        ("10.244.1.11", "10.244.2.11", 0, 0, ICMP), ("10.244.2.11", "10.244.1.11", 0, 0, ICMP)}


def test_network_order_round_trips() -> None:
    assert _ip(_be32("10.244.1.12")) == "10.244.1.12"
    assert _be32("10.0.0.1").to_bytes(4, sys.byteorder) == bytes([10, 0, 0, 1])  # memory order = wire order
    assert _port(socket.htons(8080)) == 8080


def test_diagnostic_picks_the_line_that_explains() -> None:
    clang = "In file included from x:\n/work/bpf/to_pod.c:5:1: error: unknown type name 'this'\n1 error generated.\n"
    assert _diagnostic(clang) == "/work/bpf/to_pod.c:5:1: error: unknown type name 'this'"
    verifier = "0: R1=ctx()\n5: (71) r0 = *(u8 *)(r1 +0)\nR1 offset is outside of the packet\nprocessed 6 insns\n"
    assert _diagnostic(verifier) == "R1 offset is outside of the packet"
    assert _diagnostic("") == ""
