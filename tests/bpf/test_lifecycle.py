"""Programs and map entries follow pods; pins carry forwarding and counters across agent restarts;
learned Service flows are forgotten only once conntrack has forgotten them."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SERVICES, SVC_UDP
from pyroute2 import Conntrack
from topo import Cluster, Node, Pod, Snapshot, Stream, counters, tcp_bulk, udp_exchange

from sknf import netlink, nsutil
from sknf.datapath import Endpoint, bpfmaps
from sknf.datapath import tc as tcmod
from sknf.datapath.bpf import BPF_DIR, PROGRAMS, BpfDatapath, _be32

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.slow]

MiB = 1 << 20


@pytest.fixture
def bpf(serving: Cluster) -> Cluster:
    for node in serving.nodes:
        node.start(BpfDatapath)
    return serving


def endpoint_ips(node: Node) -> dict[str, int]:
    """{pod IP: host ifindex} as the endpoints map holds them."""
    entries = bpfmaps.read_map(node.datapath.maps["endpoints"], ctypes.c_uint32, bpfmaps.EndpointInfo)
    return {socket.inet_ntoa(k.to_bytes(4, sys.byteorder)): v.ifindex for k, v in entries}


def counter_keys(node: Node) -> set[int]:
    return {k for k, _ in bpfmaps.read_map(node.datapath.maps["pod_counters"], ctypes.c_uint32, bpfmaps.CounterValues)}


def filters(node: Node, ifindex: int) -> set[str]:
    def read() -> set[str]:
        with netlink.route() as ipr:
            return {name for _hook, name, _prio in tcmod.sknf_filters(ipr, ifindex)}
    return node.call(read)


def test_attach_and_detach_follow_the_pod(bpf: Cluster) -> None:
    node, a, b = bpf.nodes[0], bpf.pod(1, 1), bpf.pod(1, 2)
    tcp_bulk(a, b.ip, MiB)
    assert endpoint_ips(node)[b.ip] == b.host_ifindex and b.host_ifindex in counter_keys(node)
    assert filters(node, b.host_ifindex) == {"sknf_from_pod", "sknf_to_pod"}

    node.call(node.datapath.detach_pod, b.endpoint)
    assert b.ip not in endpoint_ips(node) and b.host_ifindex not in counter_keys(node)
    assert filters(node, b.host_ifindex) == set()
    # b is still reachable, through the bridge: a's frames to it now take the kernel path
    snap = Snapshot(bpf, a)
    assert tcp_bulk(a, b.ip, MiB) == MiB
    c, _ = snap.delta(a)
    assert c["fast_packets"] == 0 and c["kernel_packets"] > 0

    node.call(node.datapath.attach_pod, b.endpoint)
    node.call(node.datapath.attach_pod, b.endpoint)  # idempotent
    snap = Snapshot(bpf, a, b)
    assert tcp_bulk(a, b.ip, MiB) == MiB
    c, _ = snap.delta(a)
    assert c["fast_packets"] > 0 and c["kernel_packets"] <= 4  # ARP only
    snap.assert_exact()


def test_detach_after_the_link_is_gone(bpf: Cluster) -> None:
    """DEL may come after the runtime removed the netns (and with it the veth): ifindex 0."""
    node, b = bpf.nodes[0], bpf.pod(1, 2)

    def unplug() -> None:
        with netlink.route() as ipr:
            netlink.delete_link(ipr, b.host_ifname)
    node.call(unplug)
    gone = Endpoint(ip=b.ip, mac=b.mac, host_ifname=b.host_ifname, host_ifindex=0, container_id=b.name,
                    ifname="eth0")
    node.call(node.datapath.detach_pod, gone)
    node.call(node.datapath.detach_pod, gone)  # and again: DEL is idempotent
    assert b.ip not in endpoint_ips(node) and b.host_ifindex not in counter_keys(node)


def test_sync_removes_stale_entries(bpf: Cluster) -> None:
    node, a, b = bpf.nodes[0], bpf.pod(1, 1), bpf.pod(1, 2)
    bpfmaps.update(node.datapath.maps["endpoints"], ctypes.c_uint32(_be32("10.244.1.99")),
                   bpfmaps.EndpointInfo(ifindex=4242))
    node.call(node.datapath.sync_endpoints, [a.endpoint])
    assert endpoint_ips(node) == {a.ip: a.host_ifindex}
    assert b.host_ifindex not in counter_keys(node)
    assert filters(node, a.host_ifindex) == {"sknf_from_pod", "sknf_to_pod"}


def test_restart_keeps_forwarding_and_counters(bpf: Cluster) -> None:
    """Each node's datapath runs in a real process; both are SIGKILLed under two streams and started again."""
    a, b, r = bpf.pod(1, 1), bpf.pod(1, 2), bpf.pod(2, 1)
    for node in bpf.nodes:
        node.stop()  # the fixture's in-process datapaths make way for processes (programs stay attached)
    with contextlib.ExitStack() as first:
        killed = [first.enter_context(node.datapath_process()) for node in bpf.nodes]
        snap = Snapshot(bpf, a, b, r)  # counters from the pins from here on
        cross, local = Stream(a, r), Stream(b, a)
        cross.wait_sent(4 * MiB)
        local.wait_sent(4 * MiB)
        before = counters(bpf, a)
        for proc in killed:
            proc.send_signal(signal.SIGKILL)  # a crash: no clean-up of any kind
            proc.wait()
        cross.wait_sent(cross.sent + 4 * MiB)  # forwarding with no agent at all
        local.wait_sent(local.sent + 2 * MiB)
        unattended = counters(bpf, a)  # what `sknf stats` reads with no agent
        assert unattended.tx_bytes > before.tx_bytes and unattended.fast_packets > before.fast_packets
    with contextlib.ExitStack() as second:
        for node in bpf.nodes:
            second.enter_context(node.datapath_process())  # new agents: reopen the pins, replace the filters
        after = counters(bpf, a)
        assert after.tx_bytes >= unattended.tx_bytes and after.fast_packets >= unattended.fast_packets
        cross.wait_sent(cross.sent + 8 * MiB)
        local.wait_sent(local.sent + 4 * MiB)
        assert cross.finish()[1] == cross.sent and local.finish()[1] == local.sent
        assert counters(bpf, a).fast_packets > after.fast_packets  # the new programs fast-path too
        snap.assert_exact()  # nothing lost or counted twice across the crash


def attached_programs(node: Node, ifname: str) -> dict[str, int]:
    """{filter name: program id} of the sknf filters on a link of the node (bpftool reads the kernel's view)."""
    out = subprocess.run(["bpftool", "-j", "net", "show", "dev", ifname], capture_output=True, text=True,
                         check=True, preexec_fn=nsutil.preexec_enter(node.netns)).stdout
    return {f["name"]: f["id"] for dev in json.loads(out) for f in dev.get("tc", [])
            if f["name"].startswith("sknf_")}


def pinned_programs(node: Node) -> dict[str, int]:
    """{program: id} of the programs pinned under the node's pin dir."""
    ids = {}
    for name in PROGRAMS:
        out = subprocess.run(["bpftool", "-j", "prog", "show", "pinned", str(node.cfg.bpf_pin_dir / f"prog_{name}")],
                             capture_output=True, text=True, check=True).stdout
        ids[name] = json.loads(out)["id"]
    return ids


def test_restart_reuses_pins_or_replaces_changed_programs(bpf: Cluster, tmp_path: Path) -> None:
    """Unchanged sources: the pinned programs are attached again, nothing is compiled. Changed sources: the
    loader compiles them, and every filter swaps to the new program under live traffic."""
    node, a, r = bpf.nodes[0], bpf.pod(1, 1), bpf.pod(2, 1)
    first = pinned_programs(node)
    assert attached_programs(node, a.host_ifname) == {"sknf_from_pod": first["from_pod"],
                                                      "sknf_to_pod": first["to_pod"]}
    node.stop()
    node.start(BpfDatapath)
    assert pinned_programs(node) == first
    changed = tmp_path / "bpf"
    shutil.copytree(BPF_DIR, changed)
    with (changed / "overlay.c").open("a") as f:
        f.write("/* a changed source: a new digest */\n")
    snap = Snapshot(bpf, a, r)
    stream = Stream(a, r)
    stream.wait_sent(4 * MiB)
    node.stop()
    node.start(functools.partial(BpfDatapath, bpf_dir=changed))
    second = pinned_programs(node)
    assert set(second.values()).isdisjoint(first.values())
    assert attached_programs(node, a.host_ifname) == {"sknf_from_pod": second["from_pod"],
                                                      "sknf_to_pod": second["to_pod"]}
    assert attached_programs(node, "vxsknf") == {"sknf_from_overlay": second["from_overlay"],
                                                 "sknf_to_overlay": second["to_overlay"]}
    stream.wait_sent(stream.sent + 4 * MiB)
    assert stream.finish()[1] == stream.sent
    snap.assert_exact()  # nothing lost or counted twice across the swap


def _ct_flush(pod_ip: str, sport: int | None = None) -> int:
    """Make conntrack forget every flow involving pod_ip (only those from client port sport, if given), as
    its timeouts eventually would."""
    n = 0
    with Conntrack() as ct:
        for entry in list(ct.dump_entries()):
            if pod_ip in (entry.tuple_orig.saddr, entry.tuple_orig.daddr, entry.tuple_reply.saddr) and \
                    sport in (None, entry.tuple_orig.sport):
                ct.delete(entry)
                n += 1
    return n


def _learned(node: Node, backend: Pod, client: Pod, sport: int) -> dict:
    return {t: ex for t, ex in node.call(node.datapath.learned_flows).items()
            if t == (backend.ip, client.ip, 8080, sport, socket.IPPROTO_UDP)}


def test_learned_flows_go_only_after_conntrack_forgets(bpf: Cluster) -> None:
    node = bpf.nodes[0]
    vip = next(iter(SERVICES))
    client, backend = bpf.pod(1, 1), bpf.pod(*SERVICES[vip])
    assert udp_exchange(client, vip, 3, 100, port=SVC_UDP, sport=40001) == 3
    assert list(_learned(node, backend, client, 40001).values()) == [False]

    node.call(node.datapath.sweep_flows)
    assert list(_learned(node, backend, client, 40001).values()) == [False]  # conntrack knows it: kept

    assert node.call(_ct_flush, backend.ip) > 0
    node.call(node.datapath.sweep_flows)
    assert list(_learned(node, backend, client, 40001).values()) == [True]  # exempt, still working
    # the same tuple comes back before the next sweep: re-learned, the mark is cleared, nothing breaks
    assert udp_exchange(client, vip, 3, 100, port=SVC_UDP, sport=40001) == 3
    assert list(_learned(node, backend, client, 40001).values()) == [False]
    node.call(node.datapath.sweep_flows)
    assert list(_learned(node, backend, client, 40001).values()) == [False]

    node.call(_ct_flush, backend.ip)
    node.call(node.datapath.sweep_flows)
    node.call(node.datapath.sweep_flows)
    assert _learned(node, backend, client, 40001) == {}
    assert udp_exchange(client, vip, 3, 100, port=SVC_UDP, sport=40001) == 3  # a new flow learns afresh


def test_sweeper_thread_runs_in_the_node(bpf: Cluster) -> None:
    """The agent's own sweeper (reconcile_interval apart) forgets a dead flow with no help, and keeps a live
    one learned and not exempt through many sweeps: it reads its own node's conntrack, not another's."""
    node = bpf.nodes[0]
    vip = next(iter(SERVICES))
    client, backend = bpf.pod(1, 1), bpf.pod(*SERVICES[vip])
    node.stop()
    node.cfg = dataclasses.replace(node.cfg, reconcile_interval=0.2)
    node.start(BpfDatapath)
    assert udp_exchange(client, vip, 3, 100, port=SVC_UDP, sport=40002) == 3  # to be forgotten
    assert udp_exchange(client, vip, 3, 100, port=SVC_UDP, sport=40003) == 3  # stays in conntrack
    assert node.call(_ct_flush, backend.ip, 40002) > 0
    deadline = time.monotonic() + 30
    while _learned(node, backend, client, 40002) and time.monotonic() < deadline:  # two sweeps: mark, delete
        assert list(_learned(node, backend, client, 40003).values()) == [False]
        time.sleep(0.1)
    assert _learned(node, backend, client, 40002) == {}
    for _ in range(15):  # 1.5 s more: about seven more sweeps
        assert list(_learned(node, backend, client, 40003).values()) == [False]
        time.sleep(0.1)
    assert udp_exchange(client, vip, 3, 100, port=SVC_UDP, sport=40003) == 3
