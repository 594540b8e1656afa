"""sknf.datapath.bpfmaps reads and writes the maps as BCC lays them out: its hand-mirrored structs match the
ctypes BCC generates from bpf/lib/common.h, and both the agent's read and the pins-only read (`sknf stats`
with the agent down) give BCC's own per-CPU values, summed. BCC runs here, in the test, over the node's
pinned maps: the datapath itself never loads it."""

from __future__ import annotations

import ctypes
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from topo import Cluster, Node

from sknf.datapath import PodCounters, bpfload, bpfmaps
from sknf.datapath.bpf import BPF_DIR, BpfDatapath, _max_flows, read_pinned_counters

pytestmark = [pytest.mark.root, pytest.mark.bpf]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """One node of a quiet two-node cluster (no traffic: counters hold exactly what the test writes)."""
    cluster = Cluster(tmp_path, prefix="skh", nodes=2, pods_per_node=2)
    try:
        cluster.up()
        node = cluster.nodes[0]
        node.start(BpfDatapath)
        yield node
    finally:
        cluster.down()


@pytest.fixture
def bcc(node: Node) -> Iterator:
    """BCC's view of the node's pinned maps (the same sources compiled again, maps reopened by pin)."""
    bpf = bpfload.compile_bpf(BPF_DIR, node.cfg.bpf_pin_dir, _max_flows())
    try:
        yield bpf
    finally:
        bpf.cleanup()


def layout(struct: type[ctypes.Structure]) -> tuple[int, list[tuple[str, int, int]]]:
    fields = [(name, getattr(struct, name).offset, getattr(struct, name).size) for name, *_ in struct._fields_]
    return ctypes.sizeof(struct), fields


def test_structs_mirror_what_bcc_generates(node: Node, bcc) -> None:
    assert layout(bpfmaps.EndpointInfo) == layout(bcc[b"endpoints"].Leaf)
    assert layout(bpfmaps.CounterValues) == layout(bcc[b"pod_counters"].sLeaf)  # one CPU's share
    assert layout(bpfmaps.Config) == layout(bcc[b"config"].Leaf)
    assert layout(bpfmaps.FlowKey) == layout(bcc[b"kernel_flows"].Key)
    assert layout(bpfmaps.FlowState) == layout(bcc[b"kernel_flows"].Leaf)
    assert layout(bpfmaps.Config6) == layout(bcc[b"config6"].Leaf)
    assert layout(bpfmaps.Addr6) == layout(bcc[b"endpoints6"].Key)
    assert layout(bpfmaps.EndpointInfo) == layout(bcc[b"endpoints6"].Leaf)
    assert layout(bpfmaps.Flow6Key) == layout(bcc[b"kernel_flows6"].Key)
    assert layout(bpfmaps.FlowState) == layout(bcc[b"kernel_flows6"].Leaf)
    assert layout(bpfmaps.MacKey) == layout(bcc[b"local_macs"].Key)
    assert layout(bpfmaps.PodIdentity) == layout(bcc[b"pod_identity"].Leaf)
    assert layout(bpfmaps.SourceKey) == layout(bcc[b"pod_sources"].Key)
    assert layout(bpfmaps.PodIdentity) == layout(bcc[b"pod_sources"].Leaf)
    assert layout(bpfmaps.Source6Key) == layout(bcc[b"pod_sources6"].Key)
    assert layout(bpfmaps.PodIdentity) == layout(bcc[b"pod_sources6"].Leaf)
    assert ctypes.sizeof(bpfmaps.RefusedValues) == ctypes.sizeof(bcc[b"pod_refused"].sLeaf)  # packets[reason]
    assert ctypes.sizeof(bcc[b"flow_guard"].Leaf) == ctypes.sizeof(ctypes.c_uint64)
    with pytest.raises(bpfmaps.LayoutMismatch):  # a map read as the wrong struct fails, never misreads
        bpfmaps.read_map(bcc[b"pod_counters"].map_fd, ctypes.c_uint32, bpfmaps.EndpointInfo)


def test_agent_writes_what_bcc_reads(node: Node, bcc) -> None:
    """setup_node's config entry and attach_pod's endpoint entries, as BCC's own ctypes see them."""
    config = bcc[b"config"][bcc[b"config"].Key(0)]
    assert (config.vxlan_ifindex, bytes(config.gateway_mac)) == (
        node.nodenet.vxlan_ifindex, bytes.fromhex(node.nodenet.gateway_mac.replace(":", "")))
    endpoints = {k.value: v for k, v in bcc[b"endpoints"].items()}
    for pod in node.pods:
        entry = endpoints[int.from_bytes(socket.inet_aton(pod.ip), sys.byteorder)]
        assert (entry.ifindex, bytes(entry.mac)) == (pod.host_ifindex, bytes.fromhex(pod.mac.replace(":", "")))


def test_agent_and_pins_read_bccs_per_cpu_values(node: Node, bcc) -> None:
    (a, b), bpf = node.pods, bcc
    table = bpf[b"pod_counters"]
    leaf = table.Leaf()
    for cpu in range(table.total_cpu):
        for i, name in enumerate(bpfmaps.COUNTER_FIELDS):
            setattr(leaf[cpu], name, (cpu + 1) * 1_000_000_007 * (i + 1) + (1 << 40))
    table[table.Key(a.host_ifindex)] = leaf
    table.pop(table.Key(b.host_ifindex), None)  # b attached but never counted: reads zero
    per_cpu_sum = sum((cpu + 1) * 1_000_000_007 for cpu in range(table.total_cpu))
    want = {f: per_cpu_sum * (i + 1) + table.total_cpu * (1 << 40) for i, f in enumerate(bpfmaps.COUNTER_FIELDS)}

    by_agent = node.call(node.datapath.read_counters)
    by_pins = node.call(read_pinned_counters, node.cfg.bpf_pin_dir)
    for read in (by_agent, by_pins):
        assert set(read) == {a.host_ifname, b.host_ifname}
        got = read[a.host_ifname]
        assert {f: getattr(got, f) for f in bpfmaps.COUNTER_FIELDS} == want  # host veth drops: none here
        assert read[b.host_ifname] == PodCounters(fast_packets=0, kernel_packets=0,
                                                  refused=dict.fromkeys(bpfmaps.REFUSED_FIELDS, 0))


def test_nothing_pinned(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_pinned_counters(tmp_path)
