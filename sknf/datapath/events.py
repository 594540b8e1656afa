"""The programs' flow events (bpf/lib/events.h), read from the pinned ring buffer without BCC.

Why libbpf's ring_buffer API through ctypes: the agent already maps libbpf for every other map
(bpfmaps), and libbpf owns the ring buffer's memory protocol (mmap of the consumer and producer
pages, record headers, busy and discarded bits, wrap-around), which a hand-written reader would have
to copy. Each record costs one Python callback (a few µs); a thread polls the buffer's epoll fd with
a short timeout so it stops promptly.

The ring buffer has one consumer position: only one reader may drain it (the agent). Events the
programs could not queue because the buffer was full are counted per CPU in events_lost.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sknf.datapath import REFUSED_REASONS, bpfmaps

log = logging.getLogger(__name__)

RINGBUF_TYPE = 27  # BPF_MAP_TYPE_RINGBUF
KINDS = {1: "flow", 2: "drop"}  # enum event_kind
HOOKS = {1: "from-pod", 2: "to-pod", 3: "from-overlay"}  # enum event_hook
PATHS = {1: "fast", 2: "kernel", 3: "dropped"}  # enum event_path
DROP_REASONS = (*REFUSED_REASONS, "redirect", "policy")  # enum refused_reason, DROP_REDIRECT, DROP_POLICY
ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
POLL_MS = 200  # how long a poll blocks: bounds how long stop() waits


class FlowEventStruct(ctypes.Structure):
    """struct flow_event (bpf/lib/events.h); ports and ethertype in network order."""

    _fields_ = [("time_ns", ctypes.c_uint64), ("saddr", ctypes.c_uint8 * 16), ("daddr", ctypes.c_uint8 * 16),
                ("ifindex", ctypes.c_uint32), ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16),
                ("ethertype", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("kind", ctypes.c_uint8),
                ("hook", ctypes.c_uint8), ("path", ctypes.c_uint8), ("reason", ctypes.c_uint8),
                ("pad", ctypes.c_uint8)]


@dataclass(frozen=True, slots=True)
class RawEvent:
    """One decoded event, before the agent resolves its addresses."""

    time: float  # wall clock, seconds
    kind: str  # "flow" (a new flow) or "drop"
    hook: str  # where it was seen: from-pod, to-pod, from-overlay
    path: str  # fast, kernel or dropped
    reason: str  # a drop's reason, else ""
    src: str  # address ("" when the frame had none: a drop of a non-IP frame)
    dst: str
    proto: int
    sport: int
    dport: int
    ifindex: int
    ethertype: int


def _addr(raw: bytes) -> str:
    if not any(raw):
        return ""
    ip = ipaddress.IPv6Address(raw)
    return str(ip.ipv4_mapped or ip)


def decode(data: bytes, boot_offset: float) -> RawEvent:
    """A ring-buffer record as a RawEvent; boot_offset converts CLOCK_BOOTTIME to the wall clock."""
    if len(data) < ctypes.sizeof(FlowEventStruct):
        raise bpfmaps.LayoutMismatch(f"flow event of {len(data)} bytes, sknf reads "
                                     f"{ctypes.sizeof(FlowEventStruct)}")
    ev = FlowEventStruct.from_buffer_copy(data)
    kind = KINDS.get(ev.kind, str(ev.kind))
    reason = (DROP_REASONS[ev.reason] if ev.reason < len(DROP_REASONS) else str(ev.reason)) if kind == "drop" else ""
    return RawEvent(time=ev.time_ns / 1e9 + boot_offset, kind=kind, hook=HOOKS.get(ev.hook, str(ev.hook)),
                    path=PATHS.get(ev.path, str(ev.path)), reason=reason, src=_addr(bytes(ev.saddr)),
                    dst=_addr(bytes(ev.daddr)), proto=ev.proto, sport=int.from_bytes(ev.sport.to_bytes(2, "little"),
                                                                                       "big"),
                    dport=int.from_bytes(ev.dport.to_bytes(2, "little"), "big"), ifindex=ev.ifindex,
                    ethertype=int.from_bytes(ev.ethertype.to_bytes(2, "little"), "big"))


def boot_offset() -> float:
    """Wall clock minus CLOCK_BOOTTIME (what bpf_ktime_get_boot_ns counts)."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def lost(fd: int) -> int:
    """Events the full ring buffer refused, summed over CPUs (events_lost, slot 0)."""
    per_cpu = (ctypes.c_uint64 * bpfmaps.possible_cpus())()
    bpfmaps.check_layout(fd, ctypes.c_uint32, ctypes.c_uint64)
    if bpfmaps._libbpf().bpf_map_lookup_elem(fd, ctypes.byref(ctypes.c_uint32(0)), per_cpu) < 0:
        raise bpfmaps._oserror("cannot read events_lost")
    return sum(per_cpu)


_SAMPLE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


def _ring_api() -> ctypes.CDLL:
    lib = bpfmaps._libbpf()
    lib.ring_buffer__new.restype = ctypes.c_void_p
    lib.ring_buffer__new.argtypes = [ctypes.c_int, _SAMPLE, ctypes.c_void_p, ctypes.c_void_p]
    lib.ring_buffer__poll.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.ring_buffer__free.argtypes = [ctypes.c_void_p]
    return lib


class RingReader:
    """Drains the events ring buffer in a thread of its own, handing each decoded event to sink."""

    def __init__(self, fd: int, sink: Callable[[RawEvent], None]) -> None:
        info = bpfmaps.map_info(fd)
        if info.type != RINGBUF_TYPE:
            raise bpfmaps.LayoutMismatch(f"BPF map {info.id} is not a ring buffer (type {info.type})")
        self._sink = sink
        self._offset = boot_offset()
        self._lib = _ring_api()
        self._callback = _SAMPLE(self._sample)  # kept referenced for as long as libbpf may call it
        self._ring = self._lib.ring_buffer__new(fd, self._callback, None, None)
        if not self._ring:
            raise bpfmaps._oserror("cannot open the events ring buffer")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sknf-flow-events", daemon=True)
        self._thread.start()

    def _sample(self, _ctx: int, data: int, size: int) -> int:
        try:
            self._sink(decode(ctypes.string_at(data, size), self._offset))
        except Exception:  # one bad record must not stop the reader (libbpf stops on a non-zero return)
            log.exception("flow event dropped")
        return 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            rc = self._lib.ring_buffer__poll(self._ring, POLL_MS)  # -errno on failure
            if rc < 0 and rc != -errno.EINTR and not self._stop.is_set():
                log.warning("flow events: ring buffer poll: %s", os.strerror(-rc))
                self._stop.wait(1.0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._lib.ring_buffer__free(self._ring)
