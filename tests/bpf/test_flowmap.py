"""The learned-flow map: conntrack lookups by tuple, and a full map that degrades to the kernel path
instead of silently breaking Services, then recovers once the sweep has made room."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SERVICES, SVC_UDP, install_services
from topo import Cluster, Snapshot, servers, tcp_bulk, tcp_who, udp_exchange

from sknf import conntrack
from sknf.datapath import bpfmaps, flows
from sknf.datapath.bpf import BPF_DIR, BpfDatapath, _flow_key
from sknf.metrics import render_snapshot, take_snapshot

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.slow]

CAPACITY = 64
UDP = socket.IPPROTO_UDP


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two nodes with ClusterIP rules and test servers (as conftest's `serving`), shared by the module."""
    c = Cluster(tmp_path_factory.mktemp("flowmap"), prefix="skqm")
    try:
        c.up()
        install_services(c)
        targets = {p.name: p.netns for n in c.nodes for p in n.pods}
        with servers(targets):
            yield c
    finally:
        c.down()


def test_lookup_finds_entries_by_either_direction(cluster: Cluster) -> None:
    node = cluster.nodes[1]
    orig = ("10.244.2.11", "10.96.7.7", 41000, 80, socket.IPPROTO_TCP)
    reply = ("10.244.2.12", "10.244.2.11", 8080, 41000, socket.IPPROTO_TCP)
    unknown = ("10.244.2.12", "10.244.2.11", 8080, 41001, socket.IPPROTO_TCP)

    def run() -> tuple[set, set, set]:
        with conntrack.Conntrack() as ct:
            ct.create([(orig, reply)], timeout=60)
            with pytest.raises(conntrack.ConntrackError):  # bad input: a clear error
                ct.create([(orig, reply)], timeout=60)
            many = [((f"10.9.{i >> 8}.{i & 255}", "10.9.255.1", 5000, 53, UDP),
                     ("10.9.255.1", f"10.9.{i >> 8}.{i & 255}", 53, 5000, UDP)) for i in range(600)]
            ct.create(many, timeout=60)  # more than one batch
            found = ct.lookup([orig, reply, unknown])
            batch = ct.lookup([r for _, r in many] + [o for o, _ in many])
            icmp = {("10.9.0.1", "10.9.255.1", 0, 0, socket.IPPROTO_ICMP)}
            alive = flows.alive([*icmp, reply, unknown])
            ct.create([(orig6, reply6)], timeout=60)
            return found, batch, alive, ct.lookup([orig6, unknown6]), flows.alive([reply6, unknown6])
    orig6 = ("fd00:10:244:2::b", "fd00:10:96::7", 41000, 80, socket.IPPROTO_TCP)
    reply6 = ("fd00:10:244:2::c", "fd00:10:244:2::b", 8080, 41000, socket.IPPROTO_TCP)
    unknown6 = ("fd00:10:244:2::c", "fd00:10:244:2::b", 8080, 41001, socket.IPPROTO_TCP)
    found, batch, alive, found6, alive6 = node.call(run)
    assert found == {orig, reply}
    assert len(batch) == 1200
    assert alive == {reply}  # no ICMP entry: the filtered dump finds none
    assert found6 == {orig6} and alive6 == {reply6}  # IPv6 tuples: the same lookups


def _fill(dp: BpfDatapath, n: int) -> None:
    """Learned entries no conntrack entry backs (what a busy node's map holds): the sweep forgets them."""
    for i in range(n):
        bpfmaps.update(dp.maps["kernel_flows"], _flow_key((f"10.244.200.{i}", "10.244.201.1", 9, 9, UDP)),
                       bpfmaps.FlowState(0))


def _restart(cluster: Cluster, bpf_dir: Path = BPF_DIR) -> None:
    for node in cluster.nodes:
        node.stop()
        shutil.rmtree(node.cfg.bpf_pin_dir, ignore_errors=True)  # a map of CAPACITY entries from scratch
        node.cfg = dataclasses.replace(node.cfg, flow_map_capacity=CAPACITY)
        node.start(functools.partial(BpfDatapath, bpf_dir=bpf_dir))


def test_a_full_map_degrades_to_the_kernel_path_and_recovers(cluster: Cluster) -> None:
    _restart(cluster)
    node = cluster.nodes[0]
    dp: BpfDatapath = node.datapath
    client = cluster.pod(1, 1)
    table = dp.flow_table()
    assert (table.capacity, table.full, table.syncing) == (CAPACITY, False, False)
    _fill(dp, CAPACITY - dp.flow_table().entries)
    assert dp.flow_table().entries == CAPACITY

    for vip, where in SERVICES.items():  # same-node and cross-node backends: no room to learn
        assert udp_exchange(client, vip, 20, 100, port=SVC_UDP, sport=42000) == 20
        assert tcp_who(client, vip, 80) == (client.ip, cluster.pod(*where).name)
    table = dp.flow_table()
    assert table.full and table.kernel_only and table.failed_learns > 0
    metrics = render_snapshot(node.call(take_snapshot, "n1", _NoLeases(), dp, peers=1))
    assert 'sknf_flow_map_full{node="n1"} 1' in metrics
    assert f'sknf_flow_map_capacity_entries{{node="n1"}} {CAPACITY}' in metrics
    # degraded: even plain pod-to-pod traffic goes through the bridge
    snap = Snapshot(cluster, client)
    assert tcp_bulk(client, cluster.pod(1, 2).ip, 1 << 20) == 1 << 20
    assert snap.delta(client)[0]["fast_packets"] == 0

    node.call(dp.sweep_flows)  # the filler entries are unknown to conntrack: marked exempt
    assert dp.flow_table().full
    node.call(dp.sweep_flows)  # ... and deleted: room again; conntrack's NATed flows seeded, flag cleared
    table = dp.flow_table()
    assert not table.full and table.entries < CAPACITY * 0.9
    learned = node.call(dp.learned_flows)
    backend = cluster.pod(*SERVICES["10.96.0.10"])
    assert (backend.ip, client.ip, 8080, 42000, UDP) in learned  # its learn had failed: seeded from conntrack
    for vip in SERVICES:
        assert udp_exchange(client, vip, 20, 100, port=SVC_UDP, sport=42000) == 20
    metrics = render_snapshot(node.call(take_snapshot, "n1", _NoLeases(), dp, peers=1))
    assert 'sknf_flow_map_full{node="n1"} 0' in metrics
    snap = Snapshot(cluster, client)
    assert tcp_bulk(client, cluster.pod(2, 2).ip, 1 << 20) == 1 << 20
    assert snap.delta(client)[0]["fast_packets"] > 0  # the fast path is back


def test_without_the_guard_a_full_map_breaks_services(cluster: Cluster, tmp_path: Path) -> None:
    """Negative control: programs that ignore the guard fast-path un-NATed replies once a learn fails."""
    broken = tmp_path / "bpf"
    shutil.copytree(BPF_DIR, broken)
    flows_h = broken / "lib" / "flows.h"
    text = flows_h.read_text()
    assert "\tif (flows_guarded())\n\t\treturn 1;\n" in text
    flows_h.write_text(text.replace("\tif (flows_guarded())\n\t\treturn 1;\n", ""))
    try:
        _restart(cluster, broken)
        dp = cluster.nodes[0].datapath
        _fill(dp, CAPACITY - dp.flow_table().entries)
        client = cluster.pod(1, 1)
        assert udp_exchange(client, "10.96.0.10", 3, 100, port=SVC_UDP, sport=42100) == 0
        assert dp.flow_table().full  # the flag was set, nobody read it
    finally:
        _restart(cluster)


class _NoLeases:
    """An IPAM store with no pods: the metrics under test are node-wide."""

    capacity = 0

    def current(self) -> list:
        return []


def test_guard_slots_match_the_programs() -> None:
    text = (BPF_DIR / "lib" / "maps.h").read_text()
    from sknf.datapath import bpf

    for name, slot in (("FULL", bpf.GUARD_FULL), ("SYNCING", bpf.GUARD_SYNCING),
                       ("FAILED_LEARNS", bpf.GUARD_FAILED_LEARNS)):
        assert f"#define FLOW_GUARD_{name} {slot}" in text
    assert ctypes.sizeof(ctypes.c_uint64) == 8


def test_a_new_capacity_recreates_the_map_with_its_entries(cluster: Cluster) -> None:
    """Capacity follows the setting (else nf_conntrack_max) across restarts: BCC would reuse the old pin."""
    _restart(cluster)
    node, client = cluster.nodes[0], cluster.pod(1, 1)
    assert udp_exchange(client, "10.96.0.10", 3, 100, port=SVC_UDP, sport=42200) == 3
    _fill(node.datapath, 10)
    before = node.call(node.datapath.learned_flows)
    node.stop()
    node.cfg = dataclasses.replace(node.cfg, flow_map_capacity=2 * CAPACITY)
    node.start(BpfDatapath)
    table = node.datapath.flow_table()
    assert (table.capacity, table.syncing) == (2 * CAPACITY, False)
    assert before.items() <= node.call(node.datapath.learned_flows).items()  # every entry copied
    assert not (node.cfg.bpf_pin_dir / "kernel_flows_retired").exists()
    assert udp_exchange(client, "10.96.0.10", 3, 100, port=SVC_UDP, sport=42200) == 3
