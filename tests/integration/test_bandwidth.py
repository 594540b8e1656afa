"""Bandwidth-annotated pods in both datapaths: a pod added through the installed conflist with
`runtimeConfig.bandwidth` as containerd sends it starts, gets its shaping objects, and its traffic is
held to its rate in each direction (same node and across nodes), while an unshaped pod on the same
node runs far faster. Negative control: with the shaping broken by hand (agent stopped), the same
measurement runs far faster too, and a restarted agent puts the shaping back from its record. DEL
leaves no ifb, qdisc or record; bad limits are refused with code 7 and leave nothing."""

from __future__ import annotations

import contextlib
import ctypes
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from leftovers import managed_lab

from sknf import netlink, nsutil, shaping
from sknf.bench.bandwidth import PATHS, directions, extra_pod, iperf_servers
from sknf.datapath import bpfmaps, tc
from sknf.datapath.bpf import read_pinned_counters
from sknf.datapath.kernel import host_veth_stats
from sknf.lab import Lab, LabNode, LabPod, cni_exec
from sknf.lab.runtime import bandwidth, with_runtime_config
from sknf.pod import pod_mac

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "skw"
RATE = 50_000_000  # bit/s each way
SECONDS = 2  # per measurement of a shaped path, after 1 s omitted (the token bucket's initial burst)
QUICK = 1  # per measurement of a path that must run far faster
EGRESS, FROM_LOCAL, FROM_REMOTE = PATHS
TRANSFER_PORT = 5203
FLOOD_PORT = 5204
FLOOD_RATE = 5_000_000
SOL_PACKET, PACKET_QDISC_BYPASS = 263, 20


@pytest.fixture(scope="module", params=["kernel", "bpf"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    with managed_lab(PREFIX, nodes=2, pods_per_node=1, datapath=request.param) as built, \
            iperf_servers(built.state.pods):
        yield built


def n1(lab: Lab) -> LabNode:
    return lab.state.nodes[0]


def tc_json(node: LabNode, *argv: str) -> list[dict]:
    out = subprocess.run(["tc", "-j", "-n", node.netns, *argv], capture_output=True, text=True, check=True).stdout
    return json.loads(out or "[]")


def root_tbf(node: LabNode, dev: str) -> dict | None:
    qdiscs = tc_json(node, "qdisc", "show", "dev", dev)
    return next((q["options"] for q in qdiscs if q["kind"] == "tbf" and q.get("root")), None)


def links(node: LabNode) -> set[str]:
    with netlink.route(nsutil.netns_path(node.netns)) as ipr:
        return {link.get("IFLA_IFNAME") for link in ipr.get_links()}


def redirect_of(node: LabNode, dev: str) -> str | None:
    for f in tc_json(node, "filter", "show", "dev", dev, "ingress"):
        for action in f.get("options", {}).get("actions", []):
            if f["pref"] == shaping.FILTER_PRIO and action["kind"] == "mirred":
                return action["to_dev"]
    return None


def endpoint_flags(lab: Lab, node: LabNode, pod: LabPod) -> int:
    with bpfmaps.pinned(Path(f"/sys/fs/bpf/{PREFIX}-{node.name}") / "endpoints") as fd:
        entry = bpfmaps.lookup(fd, ctypes.c_uint32(_be32(pod.ip)), bpfmaps.EndpointInfo)
    return entry.flags


def _be32(ip: str) -> int:
    return int.from_bytes(socket.inet_aton(ip), "little")


def sknf_filters(node: LabNode, dev: str) -> set[str]:
    with netlink.route(nsutil.netns_path(node.netns)) as ipr:
        return {name for _, name, _ in tc.sknf_filters(ipr, netlink.link_index(ipr, dev))}


def assert_shaped(lab: Lab, pod: LabPod) -> None:
    """The kernel objects of a pod shaped at RATE both ways (read with tc, not with sknf's own code)."""
    node, ifb = n1(lab), shaping.ifb_name(pod.host_ifname)
    assert root_tbf(node, pod.host_ifname)["rate"] == RATE // 8
    assert ifb in links(node)
    assert root_tbf(node, ifb)["rate"] == RATE // 8
    assert redirect_of(node, pod.host_ifname) == ifb
    if lab.state.datapath == "bpf":
        assert endpoint_flags(lab, node, pod) == bpfmaps.ENDPOINT_SHAPED
        assert sknf_filters(node, pod.host_ifname) == {"sknf_from_shaped_pod", "sknf_to_pod"}


def pod_bytes(lab: Lab, pod: LabPod) -> tuple[int, int]:
    """(tx, rx) bytes of the pod as sknf counts them in this datapath (BPF maps, or the host veth's stats)."""
    with nsutil.entered(n1(lab).netns):
        if lab.state.datapath == "bpf":
            c = read_pinned_counters(Path(f"/sys/fs/bpf/{PREFIX}-{n1(lab).name}"))[pod.host_ifname]
            return c.tx_bytes, c.rx_bytes
        stats = host_veth_stats()[pod.host_ifname]
        return stats["rx_bytes"], stats["tx_bytes"]


def transfer(src: LabPod, dst: LabPod, nbytes: int) -> None:
    """nbytes over TCP src -> dst; returns once dst has read them all (so every frame has been counted)."""
    with nsutil.entered(dst.netns):
        listener = socket.create_server((dst.ip, TRANSFER_PORT))
    with nsutil.entered(src.netns):
        sender = socket.socket()
    got = 0
    with listener, sender:
        listener.settimeout(30)
        sender.settimeout(30)
        sender.connect((dst.ip, TRANSFER_PORT))
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(30)
            block = b"x" * 65536
            done = threading.Thread(target=lambda: [sender.sendall(block) for _ in range(nbytes // len(block))])
            done.start()
            while got < nbytes:
                chunk = conn.recv(1 << 20)
                assert chunk, f"connection closed after {got} of {nbytes} bytes"
                got += len(chunk)
            done.join()


def within_rate(measured: dict[str, float]) -> dict[str, str]:
    """The directions not held to the rate: above 1.25x (tighter than the issue's 2x: a shaped stream
    measures 0.956x, the headers' share, while a half-bypassed one was seen at 1.5x), or below a
    third of it (the pod must still work)."""
    return {k: f"{v / 1e6:.1f} Mbit/s" for k, v in measured.items() if not RATE / 3 <= v <= 1.25 * RATE}


def far_above_rate(measured: dict[str, float]) -> dict[str, str]:
    return {k: f"{v / 1e6:.1f} Mbit/s" for k, v in measured.items() if v <= 5 * RATE}


def test_shaped_pod_is_held_to_its_rates_and_del_leaves_nothing(lab: Lab) -> None:
    node = n1(lab)
    with extra_pod(lab, node, "n1bw", {"bandwidth": bandwidth(RATE, RATE)}) as pod:
        assert_shaped(lab, pod)
        shaped = directions(lab, pod, SECONDS)
        assert within_rate(shaped) == {}, shaped

        # Counted once per frame although each sent frame passes the ifb (8 MiB each way, ~5% headers).
        remote = next(p for p in lab.state.pods if p.name == "n2p1")
        tx0, rx0 = pod_bytes(lab, pod)
        transfer(pod, remote, 8 << 20)
        transfer(remote, pod, 8 << 20)
        tx1, rx1 = pod_bytes(lab, pod)
        assert 1.0 < (tx1 - tx0) / (8 << 20) < 1.3 and 1.0 < (rx1 - rx0) / (8 << 20) < 1.3, (tx1 - tx0, rx1 - rx0)

        # Negative control: the agent stopped, the shaping undone by hand as the bug did it.
        lab.stop_agent(node)
        with netlink.route(nsutil.netns_path(node.netns)) as ipr:
            if lab.state.datapath == "bpf":  # the fast path as before: redirect_peer in, from_pod out
                pins = Path(f"/sys/fs/bpf/{PREFIX}-{node.name}")
                with bpfmaps.pinned(pins / "endpoints") as fd:
                    key = ctypes.c_uint32(_be32(pod.ip))
                    entry = bpfmaps.lookup(fd, key, bpfmaps.EndpointInfo)
                    entry.flags = 0
                    bpfmaps.update(fd, key, entry)
                with bpfmaps.pinned(pins / "prog_from_pod") as prog:
                    tc.attach(ipr, netlink.link_index(ipr, pod.host_ifname), tc.INGRESS, prog, "sknf_from_pod")
            else:
                shaping.remove(ipr, pod.host_ifname)
        unshaped = directions(lab, pod, QUICK)
        assert far_above_rate(unshaped) == {}, unshaped

        # A restarted agent shapes the pod again from its record.
        lab.restart_agent(node)
        assert_shaped(lab, pod)
        again = directions(lab, pod, SECONDS, paths=(FROM_REMOTE,))
        assert within_rate(again) == {}, again
        host_ifname, ifb = pod.host_ifname, shaping.ifb_name(pod.host_ifname)
    assert {host_ifname, ifb} & links(node) == set()
    assert not (lab.node_dir(node.name) / "state" / shaping.RECORDS / host_ifname).exists()


@pytest.mark.parametrize("direction", ["ingress", "egress"])
def test_one_direction_shaped_leaves_the_other_free(lab: Lab, direction: str) -> None:
    """An ingress-only pod sends on the fast path in BPF mode, so nothing learned keeps its replies on
    the kernel path: only ENDPOINT_SHAPED takes frames for it past its host veth's qdisc."""
    node = n1(lab)
    limits = bandwidth(ingress_rate=RATE) if direction == "ingress" else bandwidth(egress_rate=RATE)
    with extra_pod(lab, node, f"n1{direction[:3]}", {"bandwidth": limits}) as pod:
        ifb = shaping.ifb_name(pod.host_ifname)
        if direction == "ingress":
            assert root_tbf(node, pod.host_ifname)["rate"] == RATE // 8
            assert ifb not in links(node) and redirect_of(node, pod.host_ifname) is None
        else:
            assert root_tbf(node, pod.host_ifname) is None and redirect_of(node, pod.host_ifname) == ifb
        if lab.state.datapath == "bpf":
            assert endpoint_flags(lab, node, pod) == (bpfmaps.ENDPOINT_SHAPED if direction == "ingress" else 0)
            program = "sknf_from_pod" if direction == "ingress" else "sknf_from_shaped_pod"
            assert sknf_filters(node, pod.host_ifname) == {program, "sknf_to_pod"}
        shaped = directions(lab, pod, SECONDS, paths=(FROM_LOCAL, FROM_REMOTE) if direction == "ingress" else (EGRESS,))
        free = directions(lab, pod, QUICK, paths=(EGRESS,) if direction == "ingress" else (FROM_LOCAL,))
    assert within_rate(shaped) == {}, shaped
    assert far_above_rate(free) == {}, free


def test_unshaped_pod_on_the_same_node_is_not_limited(lab: Lab) -> None:
    node = n1(lab)
    with extra_pod(lab, node, "n1free") as pod:
        assert root_tbf(node, pod.host_ifname) is None and redirect_of(node, pod.host_ifname) is None
        assert shaping.ifb_name(pod.host_ifname) not in links(node)
        measured = directions(lab, pod, QUICK, paths=(EGRESS, FROM_LOCAL))
    assert far_above_rate(measured) == {}, measured


def raw_flood_rate(src: LabPod, dst: LabPod, seconds: float = 1, warmup: float = 0.5) -> float:
    """Bit/s of UDP payload dst receives while src floods it from a packet socket with
    PACKET_QDISC_BYPASS (what a hostile pod with CAP_NET_RAW does to skip its own qdiscs), counted
    after warmup (the token bucket's initial burst)."""
    with nsutil.entered(dst.netns):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"\0" * 1400
    udp = struct.pack("!HHHH", 40000, FLOOD_PORT, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(src.ip), socket.inet_aton(dst.ip))
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    frame = bytes.fromhex(pod_mac(dst.container_id, "eth0").replace(":", "")) + \
        bytes.fromhex(pod_mac(src.container_id, "eth0").replace(":", "")) + b"\x08\x00" + ip + udp
    # The flood runs in a process of its own (a CPU of its own, no GIL shared with the receiver).
    code = ("import os, socket, sys, time\n"
            "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
            f"s.setsockopt({SOL_PACKET}, {PACKET_QDISC_BYPASS}, 1)\n"
            "s.bind(('eth0', 0))\n"
            "frame = bytes.fromhex(sys.argv[1])\n"
            f"end = time.monotonic() + {warmup + seconds + 0.5}\n"
            "while time.monotonic() < end:\n"
            "    for _ in range(1000):\n"
            "        try:\n"
            "            s.send(frame)\n"
            "        except OSError:\n"
            "            pass\n")
    with rx:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        rx.bind((dst.ip, FLOOD_PORT))
        rx.settimeout(0.2)
        sender = subprocess.Popen([sys.executable, "-c", code, frame.hex()], preexec_fn=nsutil.preexec_enter(src.netns))
        try:
            got, start = 0, time.monotonic()
            while (now := time.monotonic()) < start + warmup + seconds:
                with contextlib.suppress(TimeoutError):
                    n = len(rx.recv(65536))
                    got += n if now >= start + warmup else 0
        finally:
            sender.kill()
            sender.wait()
    return got * 8 / seconds


def _checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    total = (total & 0xFFFF) + (total >> 16)
    return ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF


def test_hostile_pod_cannot_bypass_its_egress_limit(lab: Lab) -> None:
    """Shaping is on the host side: a packet socket that skips the pod's own qdiscs changes nothing.
    Control: the same flood from an unshaped pod whose own eth0 has a tbf at the rate (shaping inside
    the pod) arrives far above the rate."""
    node = n1(lab)
    remote = next(p for p in lab.state.pods if p.name == "n2p1")
    # A 1 Mbit bucket: with the runtimes' burst ~4 s worth of the rate would pass at line rate first.
    # A lower rate than RATE: a packet socket in Python floods at only ~100 Mbit/s through the overlay.
    with extra_pod(lab, node, "n1raw", {"bandwidth": bandwidth(egress_rate=FLOOD_RATE, burst=1 << 20)}) as pod:
        shaped = raw_flood_rate(pod, remote)
    with extra_pod(lab, node, "n1rawfree") as pod:
        subprocess.run(["tc", "-n", pod.netns, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate",
                        str(FLOOD_RATE), "burst", "125000", "latency", "25ms"], check=True)
        free = raw_flood_rate(pod, remote)
    assert shaped <= 1.25 * FLOOD_RATE, f"{shaped / 1e6:.1f} Mbit/s"
    assert free > 5 * FLOOD_RATE, f"{free / 1e6:.1f} Mbit/s"


def test_check_verifies_the_shaping(lab: Lab) -> None:
    node = n1(lab)
    runtime_config = {"bandwidth": bandwidth(RATE, RATE)}
    with extra_pod(lab, node, "n1chk", runtime_config) as pod:
        sknf = lab.conflist(node)["plugins"][0]
        prev = {"cniVersion": "1.0.0", "ips": [{"address": f"{pod.ip}/16"}]}
        for rc, want in ((runtime_config, 0), ({"bandwidth": bandwidth(RATE, 2 * RATE)}, 110), ({}, 110)):
            netconf = {**sknf, "cniVersion": "1.0.0", "name": "sknf", "prevResult": prev, "runtimeConfig": rc}
            code, out = cni_exec(lab.plugin_dir, "CHECK", netconf, container_id=pod.container_id,
                                 netns=nsutil.netns_path(pod.netns))
            assert (code and out["code"]) == want, out


@pytest.mark.parametrize("limits", [
    {"ingressRate": RATE},  # rate without burst
    {"egressRate": RATE, "egressBurst": -1},
    {"egressRate": "50M", "egressBurst": 1 << 20},
    {"ingressRate": 10, "ingressBurst": 1 << 20},  # below kubelet's 1 kbit/s
    {"ingressRate": 2000, "ingressBurst": 1 << 20},  # a bucket (capped at ~4.3 s of tokens) below one frame
    {"egressRate": RATE, "egressBurst": 1 << 40},
])
def test_bad_limits_are_refused_and_leave_nothing(lab: Lab, limits: dict) -> None:
    node = n1(lab)
    before = links(node)
    state = lab.node_dir(node.name) / "state"
    records = sorted((state / shaping.RECORDS).glob("sknf*"))  # the lab's own shaped pod has one
    conflist = with_runtime_config(lab.conflist(node), {"bandwidth": limits})
    netconf = {**conflist["plugins"][0], "cniVersion": conflist["cniVersion"], "name": conflist["name"]}
    nsname = f"{PREFIX}-n1bad"
    subprocess.run(["ip", "netns", "add", nsname], check=True)
    try:
        code, out = cni_exec(lab.plugin_dir, "ADD", netconf, container_id="bad" * 8,
                             netns=nsutil.netns_path(nsname))
    finally:
        subprocess.run(["ip", "netns", "del", nsname], check=True)
    assert code == 1 and out["code"] == 7, out
    assert "bandwidth" in out["msg"], out
    assert links(node) == before
    assert sorted((state / shaping.RECORDS).glob("sknf*")) == records
    assert not any("bad" * 8 in p.read_text() for p in (state / "ipam").rglob("*") if p.is_file())
