"""A raw netlink socket that sends requests in batches and matches each reply to its request.

Shared by `sknf.rtbulk` (rtnetlink) and `sknf.conntrack` (ctnetlink): both exist because pyroute2 costs
too much Python per message at scale, and both need the same few things done the same way:

- a receive buffer forced large (SO_RCVBUFFORCE, as root), and acks without the request echoed
  (NETLINK_CAP_ACK), so that a batch's replies fit it: `batch` is sized from the buffer the kernel
  granted and the room one queued reply may take;
- many requests per sendmsg, each reply matched to its request by sequence number (`exchange`);
- a dump with its errors (NLMSG_ERROR, or the errno NLMSG_DONE carries) raised (`dump_messages`);
- attributes encoded and decoded with struct (`attr`, `nested`, `attrs`).

Everything works in the calling thread's network namespace.
"""

from __future__ import annotations

import errno
import itertools
import socket
import struct
from collections.abc import Hashable, Iterable, Iterator
from typing import Self, TypeVar

SOL_NETLINK = 270
NETLINK_CAP_ACK, NETLINK_GET_STRICT_CHK = 10, 12
SO_RCVBUFFORCE = 33
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 0x100, 0x200, 0x400, 0x800
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
RCVBUF = 8 << 20

NLMSG = struct.Struct("=IHHII")
NLA = struct.Struct("=HH")
_I32 = struct.Struct("=i")

K = TypeVar("K", bound=Hashable)


def attr(kind: int, payload: bytes) -> bytes:
    return NLA.pack(NLA.size + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def attrs(data: bytes | memoryview, start: int = 0,
          wanted: frozenset[int] | None = None) -> Iterator[tuple[int, memoryview]]:
    """(type, payload) of each attribute from start on; with `wanted`, only those types (the others are
    skipped without slicing: a link message carries ~45 attributes, sknf reads 7)."""
    view = memoryview(data)
    end = len(view)
    unpack = NLA.unpack_from
    while start + NLA.size <= end:
        length, kind = unpack(view, start)
        if length < NLA.size:
            return
        kind &= ~NLA_F_NESTED
        if wanted is None or kind in wanted:
            yield kind, view[start + NLA.size: start + length]
        start += (length + 3) & ~3


def error_code(msg: memoryview) -> int:
    """The errno of an NLMSG_ERROR (0: an ack), or of an NLMSG_DONE that carries one."""
    return -_I32.unpack_from(msg, NLMSG.size)[0] if len(msg) >= NLMSG.size + 4 else 0


class NetlinkSocket:
    """A raw netlink socket of `protocol` in the calling thread's namespace; use as a context manager.

    `reply_room`: the receive-buffer bytes one queued reply may take; with `max_batch` it bounds how many
    requests go out per sendmsg. `strict`: NETLINK_GET_STRICT_CHK, so that dumps are filtered by the kernel.
    """

    def __init__(self, protocol: int, reply_room: int, max_batch: int, *, strict: bool = False) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        try:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except PermissionError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)  # capped by rmem_max
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # acks without the request echoed
            if strict:
                self.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            self.sock.bind((0, 0))
            rcvbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        except OSError:
            self.sock.close()
            raise
        self.batch = min(max_batch, max(16, rcvbuf // reply_room))
        self._seq = itertools.count(1)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def message(self, kind: int, flags: int, body: bytes) -> tuple[int, bytes]:
        """(sequence number, the request): a message of type `kind` with NLM_F_REQUEST and `flags`."""
        seq = next(self._seq)
        return seq, NLMSG.pack(NLMSG.size + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body

    def replies(self) -> Iterator[tuple[int, int, memoryview]]:
        """(type, seq, message) of everything one recv returns."""
        data = memoryview(self.sock.recv(1 << 20))
        offset = 0
        while offset + NLMSG.size <= len(data):
            length, kind, _flags, seq, _pid = NLMSG.unpack_from(data, offset)
            if length < NLMSG.size:
                return
            yield kind, seq, data[offset: offset + length]
            offset += (length + 3) & ~3

    def exchange(self, requests: Iterable[tuple[K, int, int, bytes]],
                 answers: frozenset[int] = frozenset((NLMSG_ERROR,))) -> Iterator[tuple[K, int, memoryview]]:
        """Send requests (key, type, flags, body), `batch` per sendmsg, and yield (key, reply type,
        message) for each one's reply: the first message of a type in `answers` that carries its sequence
        number (an ack or error; with the answer types of a GET too). All of a batch's replies are read
        before the next batch goes out, so they never overflow the receive buffer."""
        pending = list(requests)
        for i in range(0, len(pending), self.batch):
            sent: dict[int, K] = {}
            buf = []
            for key, kind, flags, body in pending[i: i + self.batch]:
                seq, msg = self.message(kind, flags, body)
                sent[seq] = key
                buf.append(msg)
            self.sock.sendall(b"".join(buf))
            while sent:
                for kind, seq, msg in self.replies():
                    if kind in answers and seq in sent:
                        yield sent.pop(seq), kind, msg

    def dump_messages(self, kind: int, flags: int, body: bytes, what: str,
             error: type[OSError] = OSError) -> Iterator[memoryview]:
        """The messages of one (kernel-filtered) dump request; a refusal raises `error` naming `what`."""
        seq, msg = self.message(kind, NLM_F_DUMP | flags, body)
        self.sock.sendall(msg)
        while True:
            for got, reply_seq, reply in self.replies():
                if reply_seq != seq:
                    continue
                if got in (NLMSG_DONE, NLMSG_ERROR):  # DONE's payload is the dump's errno (0, or why it stopped)
                    if code := error_code(reply):
                        raise error(code, f"{what}: {errno.errorcode.get(code, code)}")
                    if got == NLMSG_DONE:
                        return
                    continue
                yield reply
