"""The learned-flow sweep's decisions and the BPF loader's small pure helpers (no root, no BCC)."""

from __future__ import annotations

import socket
import struct
import sys

from sknf import conntrack, nlsock
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


def _entry_message(orig: tuple, reply: tuple, status: int) -> bytes:
    """A ctnetlink NEW message as the kernel sends it (netlink and nfgen headers, then attributes)."""
    body = (conntrack._NFGEN.pack(socket.AF_INET, 0, 0) + conntrack._tuple_attr(conntrack.CTA_TUPLE_ORIG, orig)
            + conntrack._tuple_attr(conntrack.CTA_TUPLE_REPLY, reply)
            + nlsock.attr(conntrack.CTA_STATUS, struct.pack("!I", status)))
    return nlsock.NLMSG.pack(nlsock.NLMSG.size + len(body), 0x100, 0, 1, 0) + body


def test_ctnetlink_entries_decode_to_flow_tuples() -> None:
    dnat = ("10.244.1.11", "10.96.0.10", 40000, 53, UDP)
    msg = _entry_message(dnat, REPLY, conntrack.IPS_DST_NAT | 0x8)
    assert conntrack._parse_entry(memoryview(msg)) == conntrack.Entry(dnat, REPLY, conntrack.IPS_DST_NAT | 0x8)
    ping = ("10.244.1.11", "10.244.2.11", 0, 0, ICMP)  # sent without ICMP ids: keyed without ports
    back = ("10.244.2.11", "10.244.1.11", 0, 0, ICMP)
    assert conntrack._parse_entry(memoryview(_entry_message(ping, back, 0))) == conntrack.Entry(ping, back, 0)
    dnat6 = ("fd00:10:244:1::b", "fd00:10:96::a", 40000, 53, UDP)  # IPv6: CTA_IP_V6_* attributes
    reply6 = ("fd00:10:244:2::b", "fd00:10:244:1::b", 53, 40000, UDP)
    assert b"\xfd\x00\x00\x10" in conntrack._tuple_attr(conntrack.CTA_TUPLE_ORIG, dnat6)
    assert conntrack._parse_entry(memoryview(_entry_message(dnat6, reply6, conntrack.IPS_DST_NAT))) == \
        conntrack.Entry(dnat6, reply6, conntrack.IPS_DST_NAT)


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
