"""Conntrack over raw ctnetlink: targeted lookups and filtered dumps, decoded with struct.

Why not pyroute2's Conntrack: it can only dump the whole table and decodes every attribute of every
entry in Python (50,000 entries: ~18 s of CPU). The learned-flow sweep needs one answer per learned
tuple ("does conntrack still know it?"), and the seeding at a mode transition needs only the NATed
entries; both cost here in proportion to what they ask, not to the table's size:

- `lookup` sends one IPCTNL_MSG_CT_GET per tuple, many per sendmsg. The kernel finds an entry by
  either of its directions (both sit in one hash), so one request answers for both.
- `dump` asks the kernel to filter (CTA_STATUS/CTA_STATUS_MASK, CTA_FILTER on the protocol) and
  decodes only the tuples and the status of what comes back.

Everything works in the calling thread's network namespace (conntrack is per namespace).
"""

from __future__ import annotations

import errno
import itertools
import socket
import struct
from collections.abc import Iterable, Iterator
from typing import NamedTuple

NETLINK_NETFILTER = 12
NETLINK_CAP_ACK = 10
SO_RCVBUFFORCE = 33
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET = 0, 1
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x1, 0x4, 0x200, 0x400, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_TIMEOUT, CTA_FILTER, CTA_STATUS_MASK = 1, 2, 3, 7, 25, 26
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_FILTER_ORIG_FLAGS = 1
CTA_FILTER_F_PROTO_NUM = 1 << 3  # the kernel's CTA_FILTER_F_CTA_PROTO_NUM (libnetfilter_conntrack's too)
IPS_SRC_NAT, IPS_DST_NAT = 1 << 4, 1 << 5
PORT_PROTOS = (socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.IPPROTO_SCTP)
RCVBUF = 8 << 20  # room for a batch of replies (each is queued as a ~4 KiB buffer)
REPLY_ROOM = 8192  # receive-buffer bytes one queued reply may take: bounds a batch
MAX_BATCH = 256  # requests per sendmsg (~40 KiB: well inside the default send buffer)

_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")

# (saddr, daddr, sport, dport, proto), ports 0 for protocols without them: as the BPF programs key flows.
FlowTuple = tuple[str, str, int, int, int]


class Entry(NamedTuple):
    orig: FlowTuple
    reply: FlowTuple
    status: int


class ConntrackError(OSError):
    """ctnetlink refused a request (no nf_conntrack module, no permission, a bad request)."""


def _attr(kind: int, payload: bytes) -> bytes:
    head = _NLA.pack(_NLA.size + len(payload), kind)
    return head + payload + b"\0" * (-len(payload) % 4)


def _nested(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _tuple_attr(kind: int, t: FlowTuple) -> bytes:
    saddr, daddr, sport, dport, proto = t
    proto_attrs = [_attr(CTA_PROTO_NUM, bytes([proto]))]
    if proto in PORT_PROTOS:
        proto_attrs += [_attr(CTA_PROTO_SRC_PORT, struct.pack("!H", sport)),
                        _attr(CTA_PROTO_DST_PORT, struct.pack("!H", dport))]
    return _nested(kind, _nested(CTA_TUPLE_IP, _attr(CTA_IP_V4_SRC, socket.inet_aton(saddr)),
                                 _attr(CTA_IP_V4_DST, socket.inet_aton(daddr))),
                   _nested(CTA_TUPLE_PROTO, *proto_attrs))


def _attrs(data: bytes | memoryview, start: int = 0, end: int | None = None) -> Iterator[tuple[int, memoryview]]:
    view = memoryview(data)
    end = len(view) if end is None else end
    while start + _NLA.size <= end:
        length, kind = _NLA.unpack_from(view, start)
        if length < _NLA.size:
            return
        yield kind & ~NLA_F_NESTED, view[start + _NLA.size: start + length]
        start += (length + 3) & ~3


def _parse_tuple(data: memoryview) -> FlowTuple | None:
    """A CTA_TUPLE_* payload as a FlowTuple; None for anything but IPv4."""
    saddr = daddr = None
    proto = sport = dport = 0
    for kind, payload in _attrs(data):
        if kind == CTA_TUPLE_IP:
            for k, v in _attrs(payload):
                if k == CTA_IP_V4_SRC:
                    saddr = socket.inet_ntoa(v)
                elif k == CTA_IP_V4_DST:
                    daddr = socket.inet_ntoa(v)
        elif kind == CTA_TUPLE_PROTO:
            for k, v in _attrs(payload):
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
    for kind, payload in _attrs(msg, _NLMSG.size + _NFGEN.size):
        if kind == CTA_TUPLE_ORIG:
            orig = _parse_tuple(payload)
        elif kind == CTA_TUPLE_REPLY:
            reply = _parse_tuple(payload)
        elif kind == CTA_STATUS:
            status = struct.unpack("!I", payload)[0]
    if orig is None or reply is None:
        return None
    return Entry(orig, reply, status)


class Conntrack:
    """A ctnetlink socket in the calling thread's namespace; use as a context manager."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)  # capped by rmem_max
        self.sock.setsockopt(270, NETLINK_CAP_ACK, 1)  # SOL_NETLINK: errors without the request echoed
        self.sock.bind((0, 0))
        self.batch = min(MAX_BATCH, max(16, self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // REPLY_ROOM))
        self._seq = itertools.count(1)

    def __enter__(self) -> Conntrack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _message(self, msg: int, flags: int, payload: bytes) -> tuple[int, bytes]:
        seq = next(self._seq)
        body = _NFGEN.pack(socket.AF_INET, 0, 0) + payload
        return seq, _NLMSG.pack(_NLMSG.size + len(body), (NFNL_SUBSYS_CTNETLINK << 8) | msg, flags, seq, 0) + body

    def _replies(self) -> Iterator[tuple[int, int, memoryview]]:
        """(type, seq, message) of everything one recv returns."""
        data = memoryview(self.sock.recv(1 << 20))
        offset = 0
        while offset + _NLMSG.size <= len(data):
            length, kind, _flags, seq, _pid = _NLMSG.unpack_from(data, offset)
            if length < _NLMSG.size:
                return
            yield kind, seq, data[offset: offset + length]
            offset += (length + 3) & ~3

    def lookup(self, tuples: Iterable[FlowTuple]) -> set[FlowTuple]:
        """The tuples conntrack has an entry for, in either direction."""
        return set(self.entries(tuples))

    def entries(self, tuples: Iterable[FlowTuple]) -> dict[FlowTuple, Entry | None]:
        """The entry of each tuple conntrack knows (in either direction); None if it cannot be parsed."""
        pending = list(tuples)
        found: dict[FlowTuple, Entry | None] = {}
        for i in range(0, len(pending), self.batch):
            sent: dict[int, FlowTuple] = {}
            buf = []
            for t in pending[i: i + self.batch]:
                seq, msg = self._message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST, _tuple_attr(CTA_TUPLE_ORIG, t))
                sent[seq] = t
                buf.append(msg)
            self.sock.sendall(b"".join(buf))
            while sent:
                for kind, seq, msg in self._replies():
                    t = sent.pop(seq, None)
                    if t is None:
                        continue
                    if kind == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", msg, _NLMSG.size)[0]
                        if code not in (0, errno.ENOENT):
                            raise ConntrackError(code, f"conntrack lookup: {errno.errorcode.get(code, code)}")
                    else:
                        found[t] = _parse_entry(msg)
        return found

    def dump(self, status: int = 0, proto: int | None = None) -> Iterator[Entry]:
        """IPv4 entries whose status has every bit of `status` set (kernel-filtered), optionally of one
        protocol only; each entry decoded to its two tuples and status."""
        payload = b""
        if status:
            payload += _attr(CTA_STATUS, struct.pack("!I", status)) + _attr(CTA_STATUS_MASK, struct.pack("!I", status))
        if proto is not None:
            payload += _nested(CTA_TUPLE_ORIG, _nested(CTA_TUPLE_PROTO, _attr(CTA_PROTO_NUM, bytes([proto]))))
            payload += _nested(CTA_FILTER, _attr(CTA_FILTER_ORIG_FLAGS, struct.pack("=I", CTA_FILTER_F_PROTO_NUM)))
        seq, msg = self._message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, payload)
        self.sock.sendall(msg)
        while True:
            for kind, got, reply in self._replies():
                if got != seq:
                    continue
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", reply, _NLMSG.size)[0]
                    if code == 0:
                        continue
                    raise ConntrackError(code, f"conntrack dump: {errno.errorcode.get(code, code)}")
                entry = _parse_entry(reply)
                # The kernel matches status under the mask; a kernel without CTA_STATUS_MASK ignores it.
                if entry is not None and entry.status & status == status:
                    yield entry

    def create(self, entries: Iterable[tuple[FlowTuple, FlowTuple]], timeout: int) -> None:
        """Insert entries (original tuple, reply tuple) with a timeout in seconds: for benchmarks and
        tests that need a populated table without traffic. Stops at the first refusal (EEXIST too)."""
        pending = list(entries)
        for i in range(0, len(pending), self.batch):
            sent = set()
            buf = []
            for orig, reply in pending[i: i + self.batch]:
                payload = (_tuple_attr(CTA_TUPLE_ORIG, orig) + _tuple_attr(CTA_TUPLE_REPLY, reply)
                           + _attr(CTA_TIMEOUT, struct.pack("!I", timeout)))
                seq, msg = self._message(IPCTNL_MSG_CT_NEW, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK,
                                         payload)
                sent.add(seq)
                buf.append(msg)
            self.sock.sendall(b"".join(buf))
            while sent:
                for kind, seq, msg in self._replies():
                    if seq not in sent or kind != NLMSG_ERROR:
                        continue
                    sent.discard(seq)
                    code = -struct.unpack_from("=i", msg, _NLMSG.size)[0]
                    if code:
                        raise ConntrackError(code, f"conntrack create: {errno.errorcode.get(code, code)}")
