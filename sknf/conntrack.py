"""Conntrack over raw ctnetlink: targeted lookups and filtered dumps, decoded with struct.

Why not pyroute2's Conntrack: it can only dump the whole table and decodes every attribute of every
entry in Python (50,000 entries: ~18 s of CPU). The learned-flow sweep needs one answer per learned
tuple ("does conntrack still know it?"), and the seeding at a mode transition needs only the NATed
entries; both cost here in proportion to what they ask, not to the table's size:

- `lookup` sends one IPCTNL_MSG_CT_GET per tuple, many per sendmsg (`sknf.nlsock`'s batching socket,
  shared with `sknf.rtbulk`). The kernel finds an entry by
  either of its directions (both sit in one hash), so one request answers for both.
- `dump` asks the kernel to filter (CTA_STATUS/CTA_STATUS_MASK, CTA_FILTER on the protocol) and
  decodes only the tuples and the status of what comes back.

Everything works in the calling thread's network namespace (conntrack is per namespace).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from sknf.nlsock import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLMSG,
    NLMSG_ERROR,
    NetlinkSocket,
    attr,
    attrs,
    error_code,
    nested,
)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET = 0, 1
CT_NEW, CT_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW, (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_TIMEOUT, CTA_FILTER, CTA_STATUS_MASK = 1, 2, 3, 7, 25, 26
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_FILTER_ORIG_FLAGS = 1
CTA_FILTER_F_PROTO_NUM = 1 << 3  # the kernel's CTA_FILTER_F_CTA_PROTO_NUM (libnetfilter_conntrack's too)
IPS_SRC_NAT, IPS_DST_NAT = 1 << 4, 1 << 5
PORT_PROTOS = (socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.IPPROTO_SCTP)
# {family: (source attribute, destination attribute)} of CTA_TUPLE_IP
_ADDRESS_ATTRS = {socket.AF_INET: (CTA_IP_V4_SRC, CTA_IP_V4_DST), socket.AF_INET6: (CTA_IP_V6_SRC, CTA_IP_V6_DST)}
REPLY_ROOM = 8192  # receive-buffer bytes one queued reply may take: bounds a batch
MAX_BATCH = 256  # requests per sendmsg (~40 KiB: well inside the default send buffer)

_NFGEN = struct.Struct("=BBH")

# (saddr, daddr, sport, dport, proto), ports 0 for protocols without them: as the BPF programs key flows.
FlowTuple = tuple[str, str, int, int, int]


class Entry(NamedTuple):
    orig: FlowTuple
    reply: FlowTuple
    status: int


class ConntrackError(OSError):
    """ctnetlink refused a request (no nf_conntrack module, no permission, a bad request)."""


def family_of(t: FlowTuple) -> int:
    return socket.AF_INET6 if ":" in t[0] else socket.AF_INET


def _request(payload: bytes, family: int = socket.AF_INET) -> bytes:
    """A ctnetlink request's body: the nfgenmsg header (its address family), then its attributes."""
    return _NFGEN.pack(family, 0, 0) + payload


def _tuple_attr(kind: int, t: FlowTuple) -> bytes:
    saddr, daddr, sport, dport, proto = t
    family = family_of(t)
    src, dst = _ADDRESS_ATTRS[family]
    proto_attrs = [attr(CTA_PROTO_NUM, bytes([proto]))]
    if proto in PORT_PROTOS:
        proto_attrs += [attr(CTA_PROTO_SRC_PORT, struct.pack("!H", sport)),
                        attr(CTA_PROTO_DST_PORT, struct.pack("!H", dport))]
    return nested(kind, nested(CTA_TUPLE_IP, attr(src, socket.inet_pton(family, saddr)),
                                 attr(dst, socket.inet_pton(family, daddr))),
                   nested(CTA_TUPLE_PROTO, *proto_attrs))


def _parse_tuple(data: memoryview) -> FlowTuple | None:
    """A CTA_TUPLE_* payload as a FlowTuple (IPv4 or IPv6)."""
    saddr = daddr = None
    proto = sport = dport = 0
    for kind, payload in attrs(data):
        if kind == CTA_TUPLE_IP:
            for k, v in attrs(payload):
                if k in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    saddr = socket.inet_ntop(socket.AF_INET if k == CTA_IP_V4_SRC else socket.AF_INET6, v)
                elif k in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    daddr = socket.inet_ntop(socket.AF_INET if k == CTA_IP_V4_DST else socket.AF_INET6, v)
        elif kind == CTA_TUPLE_PROTO:
            for k, v in attrs(payload):
                if k == CTA_PROTO_NUM:
                    proto = v[0]
                elif k == CTA_PROTO_SRC_PORT:
                    sport = struct.unpack("!H", v)[0]
                elif k == CTA_PROTO_DST_PORT:
                    dport = struct.unpack("!H", v)[0]
    if saddr is None or daddr is None:
        return None
    if proto not in PORT_PROTOS:
        sport = dport = 0
    return saddr, daddr, sport, dport, proto


def _parse_entry(msg: memoryview) -> Entry | None:
    orig = reply = None
    status = 0
    for kind, payload in attrs(msg, NLMSG.size + _NFGEN.size):
        if kind == CTA_TUPLE_ORIG:
            orig = _parse_tuple(payload)
        elif kind == CTA_TUPLE_REPLY:
            reply = _parse_tuple(payload)
        elif kind == CTA_STATUS:
            status = struct.unpack("!I", payload)[0]
    if orig is None or reply is None:
        return None
    return Entry(orig, reply, status)


class Conntrack(NetlinkSocket):
    """A ctnetlink socket in the calling thread's namespace; use as a context manager."""

    def __init__(self) -> None:
        super().__init__(NETLINK_NETFILTER, REPLY_ROOM, MAX_BATCH)

    def lookup(self, tuples: Iterable[FlowTuple]) -> set[FlowTuple]:
        """The tuples conntrack has an entry for, in either direction."""
        return set(self.entries(tuples))

    def entries(self, tuples: Iterable[FlowTuple]) -> dict[FlowTuple, Entry | None]:
        """The entry of each tuple conntrack knows (in either direction); None if it cannot be parsed."""
        found: dict[FlowTuple, Entry | None] = {}
        gets = ((t, CT_GET, 0, _request(_tuple_attr(CTA_TUPLE_ORIG, t), family_of(t))) for t in tuples)
        for t, kind, msg in self.exchange(gets, answers=frozenset((NLMSG_ERROR, CT_NEW))):
            if kind == NLMSG_ERROR:
                code = error_code(msg)
                if code not in (0, errno.ENOENT):
                    raise ConntrackError(code, f"conntrack lookup: {errno.errorcode.get(code, code)}")
            else:
                found[t] = _parse_entry(msg)
        return found

    def dump(self, status: int = 0, proto: int | None = None, family: int = socket.AF_INET) -> Iterator[Entry]:
        """Entries of one address family whose status has every bit of `status` set (kernel-filtered),
        optionally of one protocol only; each entry decoded to its two tuples and status."""
        payload = b""
        if status:
            payload += attr(CTA_STATUS, struct.pack("!I", status)) + attr(CTA_STATUS_MASK, struct.pack("!I", status))
        if proto is not None:
            payload += nested(CTA_TUPLE_ORIG, nested(CTA_TUPLE_PROTO, attr(CTA_PROTO_NUM, bytes([proto]))))
            payload += nested(CTA_FILTER, attr(CTA_FILTER_ORIG_FLAGS, struct.pack("=I", CTA_FILTER_F_PROTO_NUM)))
        for reply in self.dump_messages(CT_GET, 0, _request(payload, family), "conntrack dump", ConntrackError):
            entry = _parse_entry(reply)
            # The kernel matches status under the mask; a kernel without CTA_STATUS_MASK ignores it.
            if entry is not None and entry.status & status == status:
                yield entry

    def create(self, entries: Iterable[tuple[FlowTuple, FlowTuple]], timeout: int) -> None:
        """Insert entries (original tuple, reply tuple) with a timeout in seconds: for benchmarks and
        tests that need a populated table without traffic. Stops at the first refusal (EEXIST too)."""
        new = ((None, CT_NEW, NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK,
                _request(_tuple_attr(CTA_TUPLE_ORIG, orig) + _tuple_attr(CTA_TUPLE_REPLY, reply)
                         + attr(CTA_TIMEOUT, struct.pack("!I", timeout)), family_of(orig)))
               for orig, reply in entries)
        for _, _, msg in self.exchange(new):
            if code := error_code(msg):
                raise ConntrackError(code, f"conntrack create: {errno.errorcode.get(code, code)}")
