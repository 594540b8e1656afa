"""sknf's BPF maps through libbpf and ctypes, without BCC and without compiling anything.

Why not BCC's tables: they cost one lookup syscall and a few Python objects per entry (50 ms for a
scrape of 2,000 pods), and reading a node whose agent is down would mean compiling all of bpf/ just
to learn the map layouts (~0.5 s per `sknf stats`). Here every map is read in a few batch syscalls,
from an agent's open fds or from the pins alone. The agent writes entries here too: it never loads
BCC (see bpfload), so the pins are all it has.

The structs below mirror bpf/lib/common.h by hand. Each read checks the map's key and value sizes
against them (a changed struct fails loudly instead of being misread), and tests/bpf/test_maps.py
compares them field by field with the ctypes BCC generates from the C source.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sknf.datapath import REFUSED_REASONS

COUNTER_FIELDS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "fast_packets", "kernel_packets", "drops")
REFUSED_FIELDS = REFUSED_REASONS  # enum refused_reason's order
PERCPU_TYPES = {5, 6, 10}  # BPF_MAP_TYPE_PERCPU_HASH, _PERCPU_ARRAY, _LRU_PERCPU_HASH
BATCH = 512  # entries per syscall: few calls, and buffers stay small on many-CPU nodes


class EndpointInfo(ctypes.Structure):
    """struct endpoint_info: the endpoints map's value (key: the pod's IPv4 address, __be32)."""

    _fields_ = [("ifindex", ctypes.c_uint32), ("mac", ctypes.c_uint8 * 6), ("flags", ctypes.c_uint16)]


ENDPOINT_SHAPED = 0x1  # endpoint_info.flags (bpf/lib/common.h): deliver through the bridge, never redirect
ENDPOINT_POLICY = 0x2  # a NetworkPolicy selects it, too big for the maps: the kernel path (nftables enforces)
ENDPOINT_INGRESS = 0x4  # the programs decide its ingress from policy_rules (bpf/lib/policy.h)
ENDPOINT_EGRESS = 0x8  # and its egress
ENDPOINT_POLICY_GEN = 0x10  # which generation of its policy_rules entries is live
POLICY_FLAGS = ENDPOINT_POLICY | ENDPOINT_INGRESS | ENDPOINT_EGRESS | ENDPOINT_POLICY_GEN
POLICY_INGRESS, POLICY_EGRESS, POLICY_GEN = 0, 1, 2  # policy_key.direction
POLICY_KEY_BITS = 64  # policy_key: endpoint and direction before the peer's prefix
POLICY_PORTS = 16  # SKNF_POLICY_PORTS


class MacKey(ctypes.Structure):
    """struct mac_key: the local_macs map's key (value: the host veth's ifindex, __u32)."""

    _fields_ = [("mac", ctypes.c_uint8 * 6), ("pad", ctypes.c_uint16)]


class Config(ctypes.Structure):
    """struct sknf_config: the one-slot config map's value (key: 0); addresses in network order."""

    _fields_ = [("cluster_net", ctypes.c_uint32), ("cluster_mask", ctypes.c_uint32), ("pod_net", ctypes.c_uint32),
                ("pod_mask", ctypes.c_uint32), ("vxlan_ifindex", ctypes.c_uint32),
                ("gateway_mac", ctypes.c_uint8 * 6), ("pad", ctypes.c_uint16)]


class Config6(ctypes.Structure):
    """struct sknf_config6: the one-slot config6 map's value (key: 0); network order, all zero without IPv6."""

    _fields_ = [("cluster_net", ctypes.c_uint8 * 16), ("cluster_mask", ctypes.c_uint8 * 16),
                ("pod_net", ctypes.c_uint8 * 16), ("pod_mask", ctypes.c_uint8 * 16)]


class Addr6(ctypes.Structure):
    """struct addr6: the endpoints6 map's key, an IPv6 address (network order)."""

    _fields_ = [("a", ctypes.c_uint8 * 16)]


class FlowKey(ctypes.Structure):
    """struct flow_key: the kernel_flows map's key; addresses and ports in network order."""

    _fields_ = [("saddr", ctypes.c_uint32), ("daddr", ctypes.c_uint32), ("sport", ctypes.c_uint16),
                ("dport", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class Flow6Key(ctypes.Structure):
    """struct flow6_key: the kernel_flows6 map's key; as FlowKey, with IPv6 addresses."""

    _fields_ = [("saddr", ctypes.c_uint8 * 16), ("daddr", ctypes.c_uint8 * 16), ("sport", ctypes.c_uint16),
                ("dport", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class FlowState(ctypes.Structure):
    """struct flow_state: the kernel_flows map's value."""

    _fields_ = [("exempt", ctypes.c_uint32)]


class PolicyKey(ctypes.Structure):
    """struct policy_key: the policy_rules LPM trie's key; endpoint and peer in network order."""

    _fields_ = [("prefixlen", ctypes.c_uint32), ("endpoint", ctypes.c_uint32), ("direction", ctypes.c_uint32),
                ("peer", ctypes.c_uint32)]


class PortRange(ctypes.Structure):
    """struct port_range: destination ports first..last (host order) of one IP protocol."""

    _fields_ = [("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8), ("first", ctypes.c_uint16),
                ("last", ctypes.c_uint16)]


class PolicyPorts(ctypes.Structure):
    """struct policy_ports: policy_rules' value, what a peer prefix may use."""

    _fields_ = [("any", ctypes.c_uint8), ("count", ctypes.c_uint8), ("pad", ctypes.c_uint16),
                ("ranges", PortRange * POLICY_PORTS)]


class PolicyFlow(ctypes.Structure):
    """struct policy_flow: the policy_flows map's value (key: struct flow_key, canonical)."""

    _fields_ = [("last_seen", ctypes.c_uint64), ("closing", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class PodIdentity(ctypes.Structure):
    """struct pod_identity: the pod_identity map's value (key: the host veth's ifindex)."""

    _fields_ = [("mac", ctypes.c_uint8 * 6), ("pad", ctypes.c_uint16)]


class SourceKey(ctypes.Structure):
    """struct source_key: the pod_sources map's key (value: struct pod_identity); the address in network order."""

    _fields_ = [("ifindex", ctypes.c_uint32), ("addr", ctypes.c_uint32)]


class Source6Key(ctypes.Structure):
    """struct source6_key: the pod_sources6 map's key (value: struct pod_identity)."""

    _fields_ = [("ifindex", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16)]


class RefusedValues(ctypes.Structure):
    """struct refused_counters: one CPU's share of a pod_refused entry (key: the host veth's ifindex)."""

    _fields_ = [(name, ctypes.c_uint64) for name in REFUSED_FIELDS]


class CounterValues(ctypes.Structure):
    """struct pod_counters: one CPU's share of a pod_counters entry (key: the host veth's ifindex)."""

    _fields_ = [(name, ctypes.c_uint64) for name in COUNTER_FIELDS]


class _MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info (linux/bpf.h); the kernel fills only as much as is passed."""

    _fields_ = [(name, ctypes.c_uint32) for name in
                ("type", "id", "key_size", "value_size", "max_entries", "map_flags")]


class _ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info (linux/bpf.h)."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32)]


class LayoutMismatch(RuntimeError):
    """A map's entries are not the size of the struct sknf reads them as (agent and reader differ)."""


@functools.cache
def _libbpf() -> ctypes.CDLL:
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)  # python3-bpfcc depends on it
    lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.bpf_map_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
    lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
    lib.bpf_map_get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.bpf_map_lookup_batch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
    return lib


def _oserror(what: str, filename: str | None = None) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}", filename)


def open_pinned(path: Path) -> int:
    """An fd of the map or program pinned at path (the caller closes it); FileNotFoundError when nothing
    is pinned there."""
    fd = _libbpf().bpf_obj_get(str(path).encode())
    if fd < 0:
        raise _oserror("cannot open pinned object", str(path))
    return fd


@contextlib.contextmanager
def pinned(path: Path) -> Iterator[int]:
    """An fd of the map pinned at path, closed on exit; FileNotFoundError when nothing is pinned there."""
    fd = open_pinned(path)
    try:
        yield fd
    finally:
        os.close(fd)


def read_map(fd: int, key_type: Any, value_type: Any) -> list[tuple[Any, Any]]:
    """Every (key, value) of a hash map; a per-CPU map's value is an array of value_type, one per CPU.

    Integer keys come back as ints, struct values as ctypes objects.
    """
    lib = _libbpf()
    info = check_layout(fd, key_type, value_type)
    if info.type in PERCPU_TYPES:
        value_type = value_type * possible_cpus()
    entries: list[tuple[Any, Any]] = []
    token, next_token, count = ctypes.c_uint32(), ctypes.c_uint32(), ctypes.c_uint32()
    start = None  # no token: from the first bucket
    while True:
        # Fresh buffers per batch: the values returned are views into them.
        keys, values = (key_type * BATCH)(), (value_type * BATCH)()
        count.value = BATCH
        rc = lib.bpf_map_lookup_batch(fd, start, ctypes.byref(next_token), keys, values, ctypes.byref(count),
                                      None)
        if rc < 0 and ctypes.get_errno() != errno.ENOENT:  # ENOENT: the last batch
            raise _oserror(f"cannot read BPF map {info.id}")
        entries += zip(keys[: count.value], values[: count.value], strict=True)
        if rc < 0:
            return entries
        token.value = next_token.value
        start = ctypes.byref(token)


def keys(fd: int, key_type: Any) -> list[Any]:
    """Every key of a map without batch lookups (an LPM trie), one syscall per key."""
    lib = _libbpf()
    out: list[Any] = []
    prev = None
    while True:
        key = key_type()
        if lib.bpf_map_get_next_key(fd, None if prev is None else ctypes.byref(prev), ctypes.byref(key)) < 0:
            if ctypes.get_errno() == errno.ENOENT:
                return out
            raise _oserror("cannot read BPF map keys")
        out.append(key)
        prev = key


def possible_cpus() -> int:
    """How many values a per-CPU map entry holds (possible CPUs, not just online ones)."""
    return _libbpf().libbpf_num_possible_cpus()


def map_info(fd: int) -> _MapInfo:
    """The map's type, id, key and value sizes and max_entries."""
    info, size = _MapInfo(), ctypes.c_uint32(ctypes.sizeof(_MapInfo))
    if _libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) < 0:
        raise _oserror("cannot read map info")
    return info


def prog_id(fd: int) -> int:
    """The kernel's id of a loaded program (what a tc filter dump names it by)."""
    info, size = _ProgInfo(), ctypes.c_uint32(ctypes.sizeof(_ProgInfo))
    if _libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) < 0:
        raise _oserror("cannot read program info")
    return info.id


def _raw_batches(fd: int) -> Iterator[tuple[_MapInfo, bytes, bytes, int]]:
    """(info, keys, values, how many) of each batch of a map that is not per-CPU, read into scratch
    buffers: no Python object per entry. The buffers are reused: use each batch before the next."""
    lib = _libbpf()
    info = map_info(fd)
    if info.type in PERCPU_TYPES:
        raise LayoutMismatch(f"BPF map {info.id} is per-CPU: read it with read_map")
    keys, values = ctypes.create_string_buffer(info.key_size * BATCH), ctypes.create_string_buffer(
        info.value_size * BATCH)
    token, next_token, got = ctypes.c_uint32(), ctypes.c_uint32(), ctypes.c_uint32()
    start = None
    while True:
        got.value = BATCH
        rc = lib.bpf_map_lookup_batch(fd, start, ctypes.byref(next_token), keys, values, ctypes.byref(got), None)
        if rc < 0 and ctypes.get_errno() != errno.ENOENT:  # ENOENT: the last batch
            raise _oserror(f"cannot read BPF map {info.id}")
        yield info, keys, values, got.value
        if rc < 0:
            return
        token.value = next_token.value
        start = ctypes.byref(token)


def count(fd: int) -> int:
    """How many entries a hash map (not per-CPU) holds."""
    return sum(n for _, _, _, n in _raw_batches(fd))


def read_raw(fd: int) -> dict[bytes, bytes]:
    """Every entry of a hash map that is not per-CPU, as {key bytes: value bytes}: for comparing a map
    with what it should hold without a ctypes object per entry."""
    out = {}
    for info, keys, values, n in _raw_batches(fd):
        k, v, ks, vs = keys.raw, values.raw, info.key_size, info.value_size
        out.update((k[i * ks:(i + 1) * ks], v[i * vs:(i + 1) * vs]) for i in range(n))
    return out


def check_layout(fd: int, key_type: Any, value_type: Any) -> _MapInfo:
    """The map's info; LayoutMismatch unless its keys and values are the size of these types."""
    info = map_info(fd)
    if (info.key_size, info.value_size) != (ctypes.sizeof(key_type), ctypes.sizeof(value_type)):
        raise LayoutMismatch(f"BPF map {info.id} holds {info.key_size}-byte keys and {info.value_size}-byte "
                             f"values, sknf reads {ctypes.sizeof(key_type)} and {ctypes.sizeof(value_type)}")
    if info.type in PERCPU_TYPES and ctypes.sizeof(value_type) % 8:
        raise LayoutMismatch("per-CPU values must be a multiple of 8 bytes (the kernel pads them)")
    return info


def lookup(fd: int, key: Any, value_type: Any) -> Any:
    """The value under key (a ctypes object) in a map that is not per-CPU, or None."""
    value = value_type()
    if _libbpf().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value)) < 0:
        if ctypes.get_errno() == errno.ENOENT:
            return None
        raise _oserror("cannot look up a BPF map entry")
    return value


def update(fd: int, key: Any, value: Any) -> None:
    """Create or overwrite one entry (key and value are ctypes objects of the map's layout)."""
    if _libbpf().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), 0) < 0:
        raise _oserror("cannot write a BPF map entry")


def delete(fd: int, key: Any) -> bool:
    """Remove one entry; False if it was already gone (a racing packet, sweep or DEL)."""
    if _libbpf().bpf_map_delete_elem(fd, ctypes.byref(key)) < 0:
        if ctypes.get_errno() == errno.ENOENT:
            return False
        raise _oserror("cannot delete a BPF map entry")
    return True


def sum_cpus(per_cpu: Any, fields: tuple[str, ...] = COUNTER_FIELDS) -> dict[str, int]:
    """A per-CPU value of u64 fields (pod_counters, pod_refused) summed over CPUs: {field: total}."""
    words = memoryview(per_cpu).cast("B").cast("Q")  # the per-CPU structs as one run of u64
    n = len(fields)
    return {name: sum(words[i::n]) for i, name in enumerate(fields)}
