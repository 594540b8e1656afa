"""rtnetlink in bulk: many requests per sendmsg with every ack checked, and dumps decoded lean.

Why not pyroute2 here: it costs ~0.2-0.5 ms of Python per request (its asyncio core, message objects)
and ~0.3 ms per decoded link, so 5,000 FDB entries took 1-4 s to program and a 1,000-pod node spent
most of its idle CPU decoding the link dump of each reconcile. The few request and dump kinds the
reconcile repeats at scale are encoded and decoded here with struct, over `sknf.nlsock`'s batching
socket (as `sknf.conntrack` does for ctnetlink); everything else stays on pyroute2.

- `Rtnl.apply` sends requests in batches of at most `batch` (sized so their acks fit the receive
  buffer), each with NLM_F_ACK, and returns the error of every request that failed, by its key: the
  caller decides which codes are benign and names the entries that were not.
- The dumps ask the kernel to filter (NETLINK_GET_STRICT_CHK: one device's FDB, one routing table,
  one link kind, one link's addresses, no statistics) and decode only the attributes sknf reads;
  `Rtnl.link_stats` asks for nothing but the links' statistics.
- `Rtnl.ipv6_conf` reads links of other namespaces from this one (IFLA_TARGET_NETNSID), many per
  sendmsg: the reconcile checks every pod's IPv6 settings without entering its namespace.

Everything works in the calling thread's network namespace.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Hashable, Iterable, Iterator
from typing import NamedTuple

from sknf.nlsock import (
    NLM_F_ACK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_REPLACE,
    NLMSG,
    NLMSG_ERROR,
    NetlinkSocket,
    attr,
    attrs,
    error_code,
    nested,
)

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_GETLINK, RTM_GETADDR = 16, 18, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
RTM_NEWQDISC, RTM_DELQDISC, RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 36, 37, 44, 45, 46
RTM_GETSTATS = 94
IFLA_STATS_LINK_64 = 1
RTMGRP_TC = 0x8  # the multicast group of tc changes (RTNLGRP_TC)
AF_BRIDGE = 7
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER = 1, 3, 4, 5, 10
IFLA_LINKINFO, IFLA_IFALIAS, IFLA_AF_SPEC, IFLA_EXT_MASK = 18, 20, 26, 29
IFLA_LINK_NETNSID, IFLA_TARGET_NETNSID = 37, 46
IFLA_INFO_KIND = 1
IFLA_INET6_CONF = 2  # in IFLA_AF_SPEC's AF_INET6 nest: the device's IPv6 settings (DEVCONF_* order)
IFA_ADDRESS = 1
RTEXT_FILTER_SKIP_STATS = 1 << 3
IFF_UP = 0x1
NDA_DST, NDA_LLADDR = 1, 2
NUD_PERMANENT_NOARP = 0x80 | 0x40  # what `bridge fdb append` (and pyroute2) set on a static entry
NTF_SELF = 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_NAME, TCA_BPF_ID = 7, 11
RT_TABLE_COMPAT = 252  # rtm_table for ids above 255 (RTA_TABLE holds the real one)
RTPROT_STATIC, RTN_UNICAST = 4, 1
ACK_ROOM = 2048  # receive-buffer bytes one queued ack may take (a small skb's truesize, rounded up)
LINK_ROOM = 8192  # ... and one link message (if_nlmsg_size's worst case, allocated per reply)
MAX_BATCH = 512  # requests per sendmsg
ZERO_MAC = b"\0" * 6

_NDMSG = struct.Struct("=BBHiHBB")
_RTMSG = struct.Struct("=BBBBBBBBI")
_IFINFO = struct.Struct("=BBHiII")
_IFADDR = struct.Struct("=BBBBI")
_IF_STATS = struct.Struct("=BBHII")
_STATS64 = struct.Struct("=8Q")  # the head of struct rtnl_link_stats64
_TCMSG = struct.Struct("=BBHiIII")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
_U32_LINK_FIELDS = {IFLA_MTU: "IFLA_MTU", IFLA_MASTER: "IFLA_MASTER", IFLA_LINK: "IFLA_LINK"}
_LINK_ATTRS = frozenset((IFLA_IFNAME, IFLA_ADDRESS, IFLA_IFALIAS, IFLA_LINKINFO, IFLA_LINK_NETNSID, *_U32_LINK_FIELDS))
_AF_SPEC = frozenset((IFLA_AF_SPEC,))
_ADDR_ATTRS = frozenset((IFA_ADDRESS,))
_STATS_ATTRS = frozenset((IFLA_STATS_LINK_64,))

Request = tuple[Hashable, int, int, bytes]  # (key for errors, message type, extra flags, body)


class LinkStats(NamedTuple):
    """The head of a link's struct rtnl_link_stats64."""

    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int
    rx_errors: int
    tx_errors: int
    rx_dropped: int
    tx_dropped: int


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _mac_text(raw: memoryview) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _ip_text(raw: memoryview) -> str:
    return str(ipaddress.ip_address(bytes(raw)))


def _rtm_table(table: int) -> int:
    return RT_TABLE_COMPAT if table > 255 else table


def fdb_request(op: str, ifindex: int, mac: str, dst: str) -> tuple[int, int, bytes]:
    """(type, flags, body) of `bridge fdb append|del <mac> dev <ifindex> dst <dst> self permanent`."""
    kind, flags = {"append": (RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_APPEND), "del": (RTM_DELNEIGH, 0)}[op]
    body = (_NDMSG.pack(AF_BRIDGE, 0, 0, ifindex, NUD_PERMANENT_NOARP, NTF_SELF, 0)
            + attr(NDA_LLADDR, _mac_bytes(mac)) + attr(NDA_DST, ipaddress.ip_address(dst).packed))
    return kind, flags, body


def route_request(op: str, table: int, dst: str, gateway: str | None = None, oif: int = 0,
                  dst_len: int | None = None) -> tuple[int, int, bytes]:
    """(type, flags, body) of `ip route replace|del <dst>/<dst_len> [via gateway dev oif] table <table>`."""
    address = ipaddress.ip_address(dst)
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    plen = address.max_prefixlen if dst_len is None else dst_len
    nlas = attr(RTA_DST, address.packed)
    if op == "replace":
        kind, flags = RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE
        head = _RTMSG.pack(family, plen, 0, 0, _rtm_table(table), RTPROT_STATIC, 0, RTN_UNICAST, 0)
        if gateway is not None:
            nlas += attr(RTA_GATEWAY, ipaddress.ip_address(gateway).packed)
        if oif:
            nlas += attr(RTA_OIF, _U32.pack(oif))
    else:
        kind, flags = RTM_DELROUTE, 0
        head = _RTMSG.pack(family, plen, 0, 0, _rtm_table(table), 0, 0, 0, 0)
    return kind, flags, head + nlas + attr(RTA_TABLE, _U32.pack(table))


class BulkError(OSError):
    """Requests the kernel refused: `failed` maps each one's key to its errno."""

    def __init__(self, failed: dict[Hashable, int]) -> None:
        self.failed = failed
        shown = ", ".join(f"{key}: {errno.errorcode.get(code, code)}" for key, code in list(failed.items())[:10])
        more = f" and {len(failed) - 10} more" if len(failed) > 10 else ""
        code = next(iter(failed.values()))
        super().__init__(code, f"{len(failed)} rtnetlink requests refused: {shown}{more}")


class Rtnl(NetlinkSocket):
    """A raw rtnetlink socket in the calling thread's namespace; use as a context manager."""

    def __init__(self) -> None:
        super().__init__(NETLINK_ROUTE, ACK_ROOM, MAX_BATCH, strict=True)
        rcvbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.get_batch = min(MAX_BATCH, max(1, rcvbuf // LINK_ROOM))  # GETs answered with a whole link each

    def apply(self, requests: Iterable[Request], benign: Iterable[int] = ()) -> None:
        """Send every request (acked); raises BulkError naming each one the kernel refused with a code
        not in `benign` (EEXIST for an append, ENOENT for a delete...).

        A refusal does not stop the others: rtnetlink handles each message of a sendmsg on its own.
        """
        ok = set(benign)
        failed: dict[Hashable, int] = {}
        acked = ((key, kind, NLM_F_ACK | flags, body) for key, kind, flags, body in requests)
        for key, _kind, msg in self.exchange(acked):
            code = error_code(msg)
            if code and code not in ok:
                failed[key] = code
        if failed:
            raise BulkError(failed)

    def dump(self, kind: int, body: bytes) -> Iterator[memoryview]:
        """The messages of one (kernel-filtered) dump request."""
        return self.dump_messages(kind, 0, body, f"rtnetlink dump {kind}")

    # -- the dumps the reconcile repeats ---------------------------------------------------------

    def fdb(self, ifindex: int) -> Iterator[tuple[str, str]]:
        """(MAC, remote address) of the device's own FDB entries that have a remote (a VXLAN's)."""
        body = _NDMSG.pack(AF_BRIDGE, 0, 0, ifindex, 0, 0, 0)
        start = NLMSG.size + _NDMSG.size
        for msg in self.dump(RTM_GETNEIGH, body):
            if _I32.unpack_from(msg, NLMSG.size + 4)[0] != ifindex:
                continue
            mac = dst = None
            for kind, payload in attrs(msg, start):
                if kind == NDA_LLADDR:
                    mac = _mac_text(payload)
                elif kind == NDA_DST:
                    dst = _ip_text(payload)
            if mac is not None and dst is not None:
                yield mac, dst

    def routes(self, family: int, table: int) -> dict[tuple[str, int], tuple[str | None, int | None]]:
        """{(destination, prefix length): (gateway, oif)} of one routing table."""
        body = _RTMSG.pack(family, 0, 0, 0, _rtm_table(table), 0, 0, 0, 0)
        body += attr(RTA_TABLE, _U32.pack(table))
        out: dict[tuple[str, int], tuple[str | None, int | None]] = {}
        start = NLMSG.size + _RTMSG.size
        try:
            msgs = list(self.dump(RTM_GETROUTE, body))
        except OSError as e:
            if e.errno == errno.ENOENT:  # the table does not exist (yet): no routes
                return out
            raise
        for msg in msgs:
            fam, dst_len, _src_len, _tos, rtm_table = msg[NLMSG.size: NLMSG.size + 5]
            got_table, dst, gateway, oif = rtm_table, None, None, None
            for kind, payload in attrs(msg, start):
                if kind == RTA_TABLE:
                    got_table = _U32.unpack(payload)[0]
                elif kind == RTA_DST:
                    dst = _ip_text(payload)
                elif kind == RTA_GATEWAY:
                    gateway = _ip_text(payload)
                elif kind == RTA_OIF:
                    oif = _U32.unpack(payload)[0]
            if got_table == table and fam == family:
                out[(dst or ("0.0.0.0" if family == socket.AF_INET else "::"), dst_len)] = (gateway, oif)
        return out

    def links(self, kind: str) -> Iterator[dict]:
        """Every link of one kind (veth, ...), as the few fields sknf reads, keyed like pyroute2's
        messages ("index", "state", "IFLA_IFNAME", "IFLA_MTU", "IFLA_MASTER", "IFLA_LINK",
        "IFLA_LINK_NETNSID", "IFLA_ADDRESS", "IFLA_IFALIAS"), so its callers read either alike."""
        body = (_IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0)
                + nested(IFLA_LINKINFO, attr(IFLA_INFO_KIND, kind.encode()))
                + attr(IFLA_EXT_MASK, _U32.pack(RTEXT_FILTER_SKIP_STATS)))
        start = NLMSG.size + _IFINFO.size
        want = kind.encode()
        for msg in self.dump(RTM_GETLINK, body):
            _fam, _pad, _type, index, flags, _change = _IFINFO.unpack_from(msg, NLMSG.size)
            link: dict = {"index": index, "state": "up" if flags & IFF_UP else "down"}
            got_kind = None
            for k, payload in attrs(msg, start, _LINK_ATTRS):
                if k == IFLA_IFNAME:
                    link["IFLA_IFNAME"] = bytes(payload).rstrip(b"\0").decode()
                elif k in _U32_LINK_FIELDS:
                    link[_U32_LINK_FIELDS[k]] = _U32.unpack(payload)[0]
                elif k == IFLA_ADDRESS:
                    link["IFLA_ADDRESS"] = _mac_text(payload)
                elif k == IFLA_IFALIAS:
                    link["IFLA_IFALIAS"] = bytes(payload).rstrip(b"\0").decode(errors="replace")
                elif k == IFLA_LINK_NETNSID:  # the peer's namespace (a veth whose other end is elsewhere)
                    link["IFLA_LINK_NETNSID"] = _I32.unpack(payload)[0]
                elif k == IFLA_LINKINFO:
                    for ik, ipayload in attrs(payload, 0):
                        if ik == IFLA_INFO_KIND:
                            got_kind = bytes(ipayload).rstrip(b"\0")
            if got_kind == want:  # a kernel that ignores the filter still answers correctly
                yield link

    def addresses(self, index: int) -> list[tuple[str, int]]:
        """(address, prefix length) of one link's addresses, both families. The kernel filters by link:
        pyroute2's get_addr(index=) dumps every address of the namespace (each host veth's IPv6
        link-local one: 1,000 pods cost 0.5 s of decoding) and filters afterwards."""
        out = []
        for msg in self.dump(RTM_GETADDR, _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, index)):
            _family, plen, _flags, _scope, got = _IFADDR.unpack_from(msg, NLMSG.size)
            if got == index:  # a kernel that ignores the filter still answers correctly
                out += [(_ip_text(payload), plen) for _, payload in attrs(msg, NLMSG.size + _IFADDR.size, _ADDR_ATTRS)]
        return out

    def ipv6_conf(self, links: Iterable[tuple[Hashable, int, int]]) -> dict[Hashable, tuple[int, ...] | None]:
        """The IPv6 settings (IFLA_INET6_CONF: one int per DEVCONF_*) of links in other namespaces, each
        given as (key, the namespace's id here, its ifindex there), asked from this namespace
        (IFLA_TARGET_NETNSID) many per sendmsg. None: the link has no IPv6 state (an MTU below 1280);
        a link that is gone, or a namespace this one has no id for, is left out."""
        pending = [(key, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, index, 0, 0) + attr(IFLA_TARGET_NETNSID, _I32.pack(nsid))
                    + attr(IFLA_EXT_MASK, _U32.pack(RTEXT_FILTER_SKIP_STATS))) for key, nsid, index in links]
        out: dict[Hashable, tuple[int, ...] | None] = {}
        answers = frozenset((RTM_NEWLINK, NLMSG_ERROR))
        for i in range(0, len(pending), self.get_batch):
            chunk = [(key, RTM_GETLINK, 0, body) for key, body in pending[i: i + self.get_batch]]
            for key, kind, msg in self.exchange(chunk, answers):
                if kind != RTM_NEWLINK:
                    continue  # NLMSG_ERROR: gone (ENODEV), or no such namespace id (EINVAL)
                out[key] = None
                for _, spec in attrs(msg, NLMSG.size + _IFINFO.size, _AF_SPEC):
                    for family, nest in attrs(spec, 0):
                        for k, conf in attrs(nest, 0) if family == socket.AF_INET6 else ():
                            if k == IFLA_INET6_CONF:
                                out[key] = struct.unpack(f"={len(conf) // 4}i", conf)
        return out

    def link_stats(self) -> dict[int, LinkStats]:
        """{ifindex: statistics} of every link (RTM_GETSTATS, only the 64-bit link statistics: ~0.2 KiB per
        link; a link dump carries them among ~45 attributes, /proc/net/dev as text to parse)."""
        body = _IF_STATS.pack(socket.AF_UNSPEC, 0, 0, 0, 1 << (IFLA_STATS_LINK_64 - 1))
        out = {}
        for msg in self.dump(RTM_GETSTATS, body):
            index = _IF_STATS.unpack_from(msg, NLMSG.size)[3]
            for _, payload in attrs(msg, NLMSG.size + _IF_STATS.size, _STATS_ATTRS):
                out[index] = LinkStats._make(_STATS64.unpack_from(payload))
        return out

    def bpf_filters(self, ifindex: int, parent: int) -> list[tuple[str, int]]:
        """(name, program id) of the cls_bpf filters on one hook of a link; [] when the link or its
        qdisc is gone."""
        body = _TCMSG.pack(socket.AF_UNSPEC, 0, 0, ifindex, 0, parent, 0)
        start = NLMSG.size + _TCMSG.size
        out = []
        try:
            msgs = list(self.dump(RTM_GETTFILTER, body))
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                return out
            raise
        for msg in msgs:
            kind = name = prog = None
            for k, payload in attrs(msg, start):
                if k == TCA_KIND:
                    kind = bytes(payload).rstrip(b"\0")
                elif k == TCA_OPTIONS:
                    for ok, opayload in attrs(payload, 0):
                        if ok == TCA_BPF_NAME:
                            name = bytes(opayload).rstrip(b"\0").decode(errors="replace")
                        elif ok == TCA_BPF_ID:
                            prog = _U32.unpack(opayload)[0]
            if kind == b"bpf" and name is not None and prog is not None:
                out.append((name, prog))
        return out


class TcEvents:
    """The links whose tc qdiscs or filters changed since the last drain (the RTNLGRP_TC notifications):
    the reconcile re-checks only those instead of dumping every pod's filters each round."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_ROUTE)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self.sock.bind((0, RTMGRP_TC))
        except OSError:
            self.sock.close()
            raise

    def drain(self) -> set[int] | None:
        """Ifindexes of the links touched since the last call; None when notifications were lost (the
        receive buffer overflowed): then anything may have changed."""
        touched: set[int] = set()
        lost = False
        while True:
            try:
                data = memoryview(self.sock.recv(1 << 16))
            except BlockingIOError:
                return None if lost else touched
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                lost = True
                continue
            offset = 0
            while offset + NLMSG.size + _TCMSG.size <= len(data):
                length, kind, _flags, _seq, _pid = NLMSG.unpack_from(data, offset)
                if length < NLMSG.size:
                    break
                if kind in (RTM_NEWQDISC, RTM_DELQDISC, RTM_NEWTFILTER, RTM_DELTFILTER):
                    touched.add(_TCMSG.unpack_from(data, offset + NLMSG.size)[3])
                offset += (length + 3) & ~3

    def close(self) -> None:
        self.sock.close()
