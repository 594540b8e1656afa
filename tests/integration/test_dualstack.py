"""Dual-stack in both datapaths: one lab per datapath whose pods have IPv4 and IPv6 (IPv4 underlay). The
whole matrix runs, IPv6 rows included (pod<->pod on a node and across, node->pod with its source kept,
pod->Internet masqueraded, pod->IPv6 ClusterIP TCP and UDP through kube-proxy-style ip6tables NAT); the
pods' IPv6 settings are as sknf made them; IPv6 traffic is counted; and IPv6 impersonation fails and is
counted: a forged IPv6 source, a neighbour advertisement for another pod's address, NDP whose
link-layer address option is another pod's MAC, a router advertisement. One negative control removes
the guard and shows them succeeding; the agent's reconcile then restores it.

Cast (a 2-node lab, 2 pods per node): the attacker is n2p1; its victim is n1p1 (another node); the
observer n2p2 shares the attacker's node.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from frames import ETH_P_IPV6, checksum, ether, listening, mac_bytes, mac_of, marker, router_advertisement, send
from leftovers import assert_lab_gone
from test_doctor import assert_all_ok, run_doctor
from test_lab import direct_from_a_service_port
from test_spoofing import defence_removed, in_node, node, pod, refused, remove_pod_guard, wait_counted
from test_transitions import BLOCK, ServedStream

from sknf import api, doctor, netlink, nsutil, stats
from sknf.config import BRIDGE, VXLAN
from sknf.datapath import bpfmaps, link_local
from sknf.datapath.bpf import _flow_key, _flow_tuple
from sknf.lab import Lab, LabPod, bulk, cni_exec, ipv6_rows, who

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "sk6"
PORT = 9
UPGRADE_PORT = 9110  # and the next: our own servers', DNATed from a ClusterIP (the lab's servers own 8080)


def ip6(src: str, dst: str, nh: int, body: bytes, hops: int = 64) -> bytes:
    """An IPv6 packet around an upper-layer body whose checksum is at `at` (UDP 6, ICMPv6 2): filled in."""
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    at = 6 if nh == 17 else 2
    pseudo = s + d + struct.pack("!I3xB", len(body), nh)
    body = body[:at] + struct.pack("!H", checksum(pseudo + body[:at] + b"\0\0" + body[at + 2:])) + body[at + 2:]
    return struct.pack("!IHBB16s16s", 0x60000000, len(body), nh, hops, s, d) + body


def udp6(src: str, dst: str, payload: bytes) -> bytes:
    return ip6(src, dst, 17, struct.pack("!HHHH", 40000, PORT, 8 + len(payload), 0) + payload)


def lla_option(kind: int, mac: str) -> bytes:
    """A source (1) or target (2) link-layer address option."""
    return struct.pack("!BB6s", kind, 1, mac_bytes(mac))


def neighbour_advertisement(src: str, dst: str, target: str, mac: str, before: bytes = b"") -> bytes:
    """An unsolicited NA with the override flag: `target` is at `mac` (its target link-layer address option,
    after the options `before`)."""
    body = struct.pack("!BBHI16s", 136, 0, 0, 0x20000000, socket.inet_pton(socket.AF_INET6, target))
    return ip6(src, dst, 58, body + before + lla_option(2, mac), hops=255)


def neighbour_solicitation(src: str, dst: str, target: str, mac: str) -> bytes:
    """An NS for `target` saying `src` is at `mac` (its source link-layer address option)."""
    body = struct.pack("!BBHI16s", 135, 0, 0, 0, socket.inet_pton(socket.AF_INET6, target))
    return ip6(src, dst, 58, body + lla_option(1, mac), hops=255)


def router_solicitation(src: str, dst: str, mac: str) -> bytes:
    """An RS saying `src` is at `mac` (a router, such as the node, takes its source link-layer address)."""
    return ip6(src, dst, 58, struct.pack("!BBHI", 133, 0, 0, 0) + lla_option(1, mac), hops=255)


def neighbour_mac6(netns: str, ip: str) -> str | None:
    with netlink.route(nsutil.netns_path(netns)) as ipr:
        for n in ipr.get_neighbours(family=socket.AF_INET6, dst=ip):
            return n.get("NDA_LLADDR")
    return None


def forget_neighbour(p: LabPod, ip: str) -> None:
    with netlink.route(nsutil.netns_path(p.netns)) as ipr, contextlib.suppress(Exception):
        ipr.neigh("del", dst=ip, ifindex=netlink.link_index(ipr, "eth0"), family=socket.AF_INET6)


@pytest.fixture(scope="module", params=["kernel", "bpf"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    pids: list[int] = []
    try:
        with Lab(prefix=PREFIX, nodes=2, pods_per_node=2, datapath=request.param, dual_stack=True) as built:
            pids = [n.agent_pid for n in built.state.nodes]
            yield built
            pids += [n.agent_pid for n in built.state.nodes]
    finally:
        assert_lab_gone(PREFIX, pids)


def test_the_whole_matrix_runs_for_both_families(lab: Lab) -> None:
    results = lab.check(bulk_bytes=1 << 20)
    bad = [r for r in results if not r.ok]
    assert not bad, "\n".join(f"{r.flow}: {r.src} -> {r.dst}: {r.detail}" for r in bad)
    flows = {r.flow for r in results}
    assert {"IPv6 pod->pod same node", "IPv6 pod->pod across nodes", "IPv6 pod->Internet (SNAT)",
            "IPv6 node->pod (own), source kept", "IPv6 node->pod (other), source kept",
            "IPv6 pod->ClusterIP TCP same node", "IPv6 pod->ClusterIP UDP across nodes",
            "IPv6 full-MTU datagram across nodes"} <= flows
    # pairs, Internet per pod, Services not its own, node x pod, the full-MTU datagram
    assert len(ipv6_rows(lab)) == 12 + 4 + 12 + 8 + 1
    # Nothing honest was refused: not the kernel's own IPv6 (DAD, MLD, NDP) since each pod came up, either.
    for p in lab.state.pods:
        assert not any(refused(lab, p).values()), (p.name, refused(lab, p))


def test_pods_and_nodes_are_set_up_for_both_families(lab: Lab) -> None:
    p, n = pod(lab, "n1p1"), node(lab, "n1")
    assert p.ip.startswith("10.244.1.") and p.ip6.startswith("fd00:10:244:1::")
    with nsutil.entered(p.netns):
        conf = Path("/proc/sys/net/ipv6/conf/eth0")
        assert [(conf / k).read_text().strip() for k in ("disable_ipv6", "accept_ra", "accept_redirects")] == \
            ["0", "0", "0"]
    with netlink.route(nsutil.netns_path(p.netns)) as ipr:
        eth0 = netlink.link_index(ipr, "eth0")
        addrs = {f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(family=socket.AF_INET6, index=eth0)}
        gws = [r.get("RTA_GATEWAY") for r in ipr.get_default_routes(family=socket.AF_INET6)]
    assert addrs == {f"{p.ip6}/56", f"{link_local(mac_of(p))}/64"}  # the guard's link-local is the kernel's
    assert gws == [n.gateway_ip6]
    assert f"inet6 {n.gateway_ip6}/56" in in_node(n, "ip", "-6", "addr", "show", "dev", BRIDGE)
    with nsutil.entered(n.netns):
        for dev in (BRIDGE, VXLAN):
            assert Path(f"/proc/sys/net/ipv6/conf/{dev}/accept_ra").read_text().strip() == "0"
    assert "MASQUERADE" in in_node(n, "ip6tables-nft", "-t", "nat", "-S", "SKNF-POSTROUTING")


def test_check_verifies_both_families(lab: Lab) -> None:
    """CHECK passes with both addresses in prevResult, and fails once the pod lost its IPv6 route."""
    p = pod(lab, "n2p2")
    sknf = lab.conflist(node(lab, p.node))["plugins"][0]
    prev = {"cniVersion": "1.0.0", "ips": [{"address": f"{p.ip}/16"}, {"address": f"{p.ip6}/56"}]}

    def check(previous: dict) -> tuple[int, dict | None]:
        netconf = {**sknf, "cniVersion": "1.0.0", "name": "sknf", "prevResult": previous}
        return cni_exec(lab.plugin_dir, "CHECK", netconf, container_id=p.container_id,
                        netns=nsutil.netns_path(p.netns))

    assert check(prev) == (0, None)
    code, out = check({**prev, "ips": [{"address": "fd00:10:244:2::99/56"}]})
    assert (code, out["code"]) == (1, 110), out
    route = in_node(p, "ip", "-6", "route", "show", "default").split()
    in_node(p, "ip", "-6", "route", "del", "default")
    try:
        code, out = check(prev)
        assert (code, out["code"]) == (1, 110) and "default route via None" in out["msg"], out
    finally:
        in_node(p, "ip", "-6", "route", "add", *route[:5])
    assert check(prev) == (0, None)


def test_doctor_checks_the_gateway_of_each_family(lab: Lab) -> None:
    """The agent is stopped while doctor looks: its reconcile would put the address back under doctor
    (pod-subnet reads the lease store, no agent needed); restarted, it does."""
    n = node(lab, "n1")
    assert_all_ok(n)
    lab.stop_agent(n)
    try:
        in_node(n, "ip", "-6", "addr", "del", f"{n.gateway_ip6}/56", "dev", BRIDGE)
        _, found = run_doctor(n)
        assert found["pod-subnet"].status == doctor.FAIL and n.gateway_ip6 in found["pod-subnet"].message
    finally:
        lab.restart_agent(n)
    deadline = time.monotonic() + 10
    while n.gateway_ip6 not in in_node(n, "ip", "-6", "addr", "show", "dev", BRIDGE) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert_all_ok(n)


def test_doctor_checks_the_ipv6_side_as_the_ipv4_one(lab: Lab) -> None:
    """What breaks pod IPv6 on a node FAILs naming it: a route inside the IPv6 cluster CIDR past brsknf, a
    FORWARD DROP in the other backend's ip6tables, a missing IPv6 masquerade, IPv6 forwarding off, RAs
    taken on brsknf. The last three the agent repairs, so it is stopped meanwhile; then all is OK again."""
    n = node(lab, "n1")
    assert_all_ok(n)
    shadow = ["fd00:10:244:7::/64", "dev", "lo"]
    in_node(n, "ip", "-6", "route", "add", *shadow)
    in_node(n, "ip6tables-legacy", "-w", "-P", "FORWARD", "DROP")
    try:
        _, found = run_doctor(n)
        assert found["routes"].status == doctor.FAIL
        assert "fd00:10:244:7::/64 dev lo (table main)" in found["routes"].message
        assert found["forward"].status == doctor.FAIL
        assert "FORWARD policy DROP in ip6tables-legacy, where sknf's rules are not" in found["forward"].message
    finally:
        in_node(n, "ip", "-6", "route", "del", *shadow)
        in_node(n, "ip6tables-legacy", "-w", "-P", "FORWARD", "ACCEPT")
    with defence_removed(lab, n, lambda: None):
        in_node(n, "ip6tables-nft", "-w", "-t", "nat", "-F", "SKNF-POSTROUTING")
        in_node(n, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=0", f"net.ipv6.conf.{BRIDGE}.accept_ra=2")
        _, found = run_doctor(n)
        assert found["sknf-rules"].status == doctor.FAIL
        assert "ip6tables nat/SKNF-POSTROUTING: masquerade of fd00:10:244::/56" in found["sknf-rules"].message
        assert found["sysctls"].status == doctor.FAIL
        assert "net.ipv6.conf.all.forwarding is not 1" in found["sysctls"].message
        assert f"{BRIDGE} accepts router advertisements (accept_ra=2)" in found["sysctls"].message
    assert_all_ok(n)  # the restarted agent's first reconcile repaired them


def test_stats_list_both_addresses(lab: Lab) -> None:
    p = pod(lab, "n1p1")
    reply = stats.query_agent(lab.node_dir(p.node) / "run" / "sknf.sock")
    (row,) = [r for r in reply["pods"] if r["host_ifname"] == p.host_ifname]
    assert row["ips"] == [p.ip, p.ip6]


def rows(lab: Lab, node_name: str) -> dict[str, dict]:
    reply = stats.query_agent(lab.node_dir(node_name) / "run" / "sknf.sock")
    return {r["pod"]: r for r in reply["pods"]}


def test_ipv6_traffic_is_counted_like_ipv4(lab: Lab) -> None:
    """The IPv4 counter tests' tolerance: payload plus headers, a few percent more, never less."""
    a, b = pod(lab, "n1p1"), pod(lab, "n2p1")
    before_a, before_b = rows(lab, a.node)[a.name], rows(lab, b.node)[b.name]
    nbytes = 16 << 20
    ok, detail = bulk(a.netns, b.ip6, nbytes)
    assert ok, detail
    after_a, after_b = rows(lab, a.node)[a.name], rows(lab, b.node)[b.name]
    sent = after_a["tx_bytes"] - before_a["tx_bytes"]
    received = after_b["rx_bytes"] - before_b["rx_bytes"]
    assert nbytes <= sent <= nbytes * 1.08, (sent, nbytes)
    assert nbytes <= received <= nbytes * 1.08, (received, nbytes)


def hop_by_hop(packet: bytes) -> bytes:
    """The IPv6 packet with an empty hop-by-hop options header (PadN) before its upper-layer header."""
    nh, length = packet[6], struct.unpack("!H", packet[4:6])[0]
    return packet[:4] + struct.pack("!HBB", length + 8, 0, packet[7]) + packet[8:40] + \
        bytes([nh, 0, 1, 4, 0, 0, 0, 0]) + packet[40:]


def counted(lab: Lab, p: LabPod, before: dict, enough: Callable[[dict], bool]) -> dict:
    """The pod's counters minus `before`, once `enough` says they hold (or after 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        now = rows(lab, p.node)[p.name]
        delta = {k: now[k] - before[k] for k in ("tx_packets", "rx_packets", "fast_packets", "kernel_packets")}
        if enough(delta) or time.monotonic() > deadline:
            return delta
        time.sleep(0.2)


def mostly_fast(delta: dict) -> bool:
    return delta["fast_packets"] >= 0.9 * (delta["tx_packets"] + delta["rx_packets"])


def test_ipv6_takes_the_fast_path_as_ipv4_does(lab: Lab) -> None:
    """BPF: IPv6 TCP to a pod on the node and on another goes by the fast path (nearly every frame counted fast
    at both ends); a frame with an extension header takes the kernel path, as everything parse_ipv6 does not
    read; an IPv6 ClusterIP connection's reply tuple is learned into kernel_flows6 on the client's node (the
    backend's replies must meet conntrack's reverse NAT there: the matrix's ClusterIP rows fail without it).
    The kernel datapath has no fast path, and its rows say so."""
    a = pod(lab, "n1p1")
    if lab.state.datapath == "kernel":
        assert rows(lab, a.node)[a.name]["fast_packets"] is None
        return
    for b in (pod(lab, "n1p2"), pod(lab, "n2p1")):
        before_a, before_b = rows(lab, a.node)[a.name], rows(lab, b.node)[b.name]
        ok, detail = bulk(a.netns, b.ip6, 4 << 20)
        assert ok, detail
        for p, before in ((a, before_a), (b, before_b)):
            delta = counted(lab, p, before, mostly_fast)
            assert delta["tx_packets"] + delta["rx_packets"] > 40, (p.name, delta)  # GSO: up to 64 KiB a frame
            assert mostly_fast(delta), (p.name, b.name, delta)

    b = pod(lab, "n2p1")
    frames = [ether(mac_of(b), mac_of(a), ETH_P_IPV6, hop_by_hop(udp6(a.ip6, b.ip6, marker(f"hbh{i}"))))
              for i in range(20)]
    before_a = rows(lab, a.node)[a.name]
    send(a.netns, *frames)
    delta = counted(lab, a, before_a, lambda d: d["kernel_packets"] >= 20)
    assert delta["kernel_packets"] >= 20 and delta["fast_packets"] < 20, delta

    svc = next(s for s in lab.services() if s.family == 6 and s.proto == "tcp" and s.endpoints[0][2] != a.node)
    backend_ip, backend_port = svc.endpoints[0][0], svc.endpoints[0][1]
    assert who(a.netns, svc.cluster_ip, svc.port)[0] == a.ip6
    with bpfmaps.pinned(Path(f"/sys/fs/bpf/{PREFIX}-{a.node}") / "kernel_flows6") as fd:
        learned = [_flow_tuple(k) for k, _ in bpfmaps.read_map(fd, bpfmaps.Flow6Key, bpfmaps.FlowState)]
    assert any(t[:3] == (backend_ip, a.ip6, backend_port) and t[4] == socket.IPPROTO_TCP for t in learned), learned


def test_ipv6_to_a_node_whose_programs_lack_ipv6_takes_its_kernel_path(lab: Lab) -> None:
    """BPF, mid-upgrade: a node whose programs do not fast-path IPv6 (its config6 empty: programs from before
    the IPv6 fast path, or before its agent set the node up) still exchanges IPv6 with a node whose programs
    do. Its agent paused (its reconcile would write config6 back), IPv6 TCP from the other node is delivered
    through its bridge: every frame at its end is counted on the kernel path, while the sender's end is fast.
    Resumed, the reconcile restores config6 and the receiver's end goes fast too. Kernel datapath: no
    programs."""
    a, b = pod(lab, "n1p1"), pod(lab, "n2p1")
    pins = Path(f"/sys/fs/bpf/{PREFIX}-{b.node}")
    if lab.state.datapath == "kernel":
        assert not pins.exists()
        return
    agent = node(lab, b.node).agent_pid
    before_a, before_b = rows(lab, a.node)[a.name], rows(lab, b.node)[b.name]
    with bpfmaps.pinned(pins / "config6") as fd:
        config6 = bytes(bpfmaps.lookup(fd, ctypes.c_uint32(0), bpfmaps.Config6))
        assert any(config6)
        os.kill(agent, signal.SIGSTOP)
        try:
            bpfmaps.update(fd, ctypes.c_uint32(0), bpfmaps.Config6())
            ok, detail = bulk(a.netns, b.ip6, 4 << 20)
        finally:
            os.kill(agent, signal.SIGCONT)
        assert ok, detail
        delta_a = counted(lab, a, before_a, mostly_fast)
        delta_b = counted(lab, b, before_b, lambda d: d["kernel_packets"] >= 40)
        assert mostly_fast(delta_a), delta_a
        assert delta_b["kernel_packets"] >= 0.9 * (delta_b["tx_packets"] + delta_b["rx_packets"]) > 36, delta_b
        assert delta_b["fast_packets"] < 0.1 * (delta_b["tx_packets"] + delta_b["rx_packets"]), delta_b
        deadline = time.monotonic() + 15
        while bytes(bpfmaps.lookup(fd, ctypes.c_uint32(0), bpfmaps.Config6)) != config6:
            assert time.monotonic() < deadline, "the reconcile did not restore config6"
            time.sleep(0.2)
    before_b = rows(lab, b.node)[b.name]
    ok, detail = bulk(a.netns, b.ip6, 4 << 20)
    assert ok, detail
    delta_b = counted(lab, b, before_b, mostly_fast)
    assert mostly_fast(delta_b), delta_b


def flow_events(lab: Lab, n: str, **req: object) -> dict:
    reply = api.request(lab.node_dir(n) / "run" / "sknf.sock", {"op": "flows", **req})
    assert reply["ok"], reply
    return reply["result"]


def test_ipv6_flows_are_reported_with_both_ends_named(lab: Lab) -> None:
    """BPF: an IPv6 connection across nodes is a flow event on the sender's node, fast path, its ends the
    pods by name (the IPv6 lease and the peer's IPv6 subnet). The kernel datapath has no flow events."""
    a, b = pod(lab, "n1p2"), pod(lab, "n2p2")
    if lab.state.datapath == "kernel":
        assert flow_events(lab, a.node)["unavailable"]
        return
    since = flow_events(lab, a.node, last=0)["next"]
    assert who(a.netns, b.ip6) == (a.ip6, b.name)
    deadline, seen = time.monotonic() + 5, []
    while time.monotonic() < deadline:
        reply = flow_events(lab, a.node, after=since, wait=1)
        seen += reply["events"]
        since = reply["next"]
        if any(e["kind"] == "flow" and e["dst"]["ip"] == b.ip6 for e in seen):
            break
    (ev,) = [e for e in seen if e["kind"] == "flow" and e["dst"]["ip"] == b.ip6 and e["src"]["ip"] == a.ip6]
    assert (ev["protocol"], ev["path"], ev["hook"]) == ("tcp", "fast", "from-pod")
    assert (ev["src"]["kind"], ev["src"]["pod"]) == ("pod", a.name)
    assert (ev["dst"]["kind"], ev["dst"]["node"]) == ("remote-pod", b.node)


def program_id(pins: Path) -> int:
    with bpfmaps.pinned(pins / "prog_from_pod") as fd:
        return bpfmaps.prog_id(fd)


def test_an_upgrade_that_adds_the_ipv6_flow_map_keeps_live_ipv6_service_flows(lab: Lab) -> None:
    """BPF: agents from before the IPv6 fast path had no kernel_flows6. With it gone from the pins (the loader
    then builds the programs again and creates it empty), quiet IPv6 connections through a ClusterIP whose
    backend is on another node live on: their reply tuples are seeded from conntrack before any frame takes
    the fast path. Negative control: one of them loses its seeded entry and breaks (the backend's reply goes
    straight to the client, un-NATed). Kernel datapath: no programs, nothing to upgrade."""
    client, n1 = pod(lab, "n1p2"), node(lab, "n1")
    pins = Path(f"/sys/fs/bpf/{PREFIX}-n1")
    if lab.state.datapath == "kernel":
        assert not pins.exists()
        return
    svc = next(s for s in lab.services() if s.name == "pod-n2p1" and s.proto == "tcp" and s.family == 6)
    backend = pod(lab, "n2p1")
    nat = ["PREROUTING", "-d", f"{svc.cluster_ip}/128", "-p", "tcp", "--dport", f"{UPGRADE_PORT}:{UPGRADE_PORT + 1}",
           "-j", "DNAT", "--to-destination", f"[{backend.ip6}]"]
    in_node(n1, "ip6tables", "-w", "-t", "nat", "-I", *nat)
    streams: list[ServedStream] = []
    try:
        for port in (UPGRADE_PORT, UPGRADE_PORT + 1):
            streams.append(ServedStream(client, backend, svc.cluster_ip, port, quiet=True))
        assert all(s.wait_received(BLOCK) for s in streams)
        before = program_id(pins)
        (pins / "kernel_flows6").unlink()
        lab.restart_agent(n1)
        assert program_id(pins) != before  # loaded again, over a new, empty kernel_flows6
        keys = [_flow_key((backend.ip6, client.ip6, s.server_port, s.client_port, socket.IPPROTO_TCP)) for s in streams]
        with bpfmaps.pinned(pins / "kernel_flows6") as fd:
            assert all(bpfmaps.lookup(fd, k, bpfmaps.FlowState) is not None for k in keys)  # seeded
            assert bpfmaps.delete(fd, keys[1])  # the negative control
        for s in streams:
            s.flowing.set()
        assert streams[0].wait_received(streams[0].nsent + 8 * BLOCK), streams[0]
        assert not streams[1].wait_received(streams[1].nsent + 8 * BLOCK, timeout=4), "an unseeded flow survived"
    finally:
        for s in streams:
            s.finish()
        in_node(n1, "ip6tables", "-w", "-t", "nat", "-D", *nat)
    assert streams[0].intact(), streams[0]
    assert not streams[1].intact()


@pytest.mark.parametrize("where", ["same node", "across nodes"])
def test_a_direct_ipv6_connection_from_a_service_connections_port(lab: Lab, where: str) -> None:
    """As test_lab's IPv4 test: an IPv6 connection straight to a backend from the port of the pod's open
    connection through the backend's IPv6 ClusterIP works (conntrack moves it to another port)."""
    direct_from_a_service_port(lab, where, "open", family=6)


def test_the_reconcile_restores_ipv6_after_the_mtu_went_below_1280(lab: Lab) -> None:
    """Below 1280 the kernel drops a device's IPv6; back above, it recreates it with its defaults (taking
    RAs, no address). The agent's next reconcile makes it what the ADD made."""
    p, peer = pod(lab, "n1p2"), pod(lab, "n2p2")
    conf = Path("/proc/sys/net/ipv6/conf/eth0/accept_ra")
    with netlink.route(nsutil.netns_path(p.netns)) as ipr:
        eth0 = netlink.link_index(ipr, "eth0")
        mtu = ipr.link("get", index=eth0)[0].get("IFLA_MTU")
        ipr.link("set", index=eth0, mtu=1200)
        ipr.link("set", index=eth0, mtu=mtu)
        with nsutil.entered(p.netns):
            assert conf.read_text().strip() == "1"  # the kernel's default: what the agent must undo
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with nsutil.entered(p.netns):
                restored = conf.read_text().strip() == "0"
            if restored and ipr.get_default_routes(family=socket.AF_INET6):
                break
            time.sleep(0.2)
    with nsutil.entered(p.netns):
        assert conf.read_text().strip() == "0"
    assert who(p.netns, peer.ip6) == (p.ip6, peer.name)
    assert who(peer.netns, p.ip6) == (peer.ip6, p.name)


def attacks(lab: Lab) -> tuple[list[bytes], list[bytes], bytes, bytes]:
    """(forged-source frames and their markers, the NA hijacking the victim's address, the RA), from n2p1."""
    attacker, victim, observer = pod(lab, "n2p1"), pod(lab, "n1p1"), pod(lab, "n2p2")
    me, ll = mac_of(attacker), link_local(mac_of(attacker))
    as_victim, as_node = marker("v6pod"), marker("v6node")
    forged = [ether(mac_of(observer), me, ETH_P_IPV6, udp6(victim.ip6, observer.ip6, as_victim)),
              ether(mac_of(observer), me, ETH_P_IPV6, udp6(node(lab, "n1").gateway_ip6, observer.ip6, as_node))]
    na = ether(mac_of(observer), me, ETH_P_IPV6, neighbour_advertisement(ll, observer.ip6, victim.ip6, me))
    ra = ether("33:33:00:00:00:01", me, ETH_P_IPV6, router_advertisement(me))
    return forged, [as_victim, as_node], na, ra


def test_ipv6_impersonation_is_refused_and_counted(lab: Lab) -> None:
    attacker, victim, observer = pod(lab, "n2p1"), pod(lab, "n1p1"), pod(lab, "n2p2")
    forged, markers, na, ra = attacks(lab)
    before = refused(lab, attacker)
    honest = marker("v6own")
    with listening(observer.netns) as seen:
        send(attacker.netns, ether(mac_of(observer), mac_of(attacker), ETH_P_IPV6,
                                   udp6(attacker.ip6, observer.ip6, honest)), *forged)
        assert seen(honest), "the attacker's own IPv6 frame must arrive (or this test proves nothing)"
        assert not any(seen(m) for m in markers), "a frame with another's IPv6 source was delivered"
    wait_counted(lab, attacker, "spoofed_ip", before["spoofed_ip"], 2)

    assert who(observer.netns, victim.ip6) == (observer.ip6, victim.name)  # the observer has a neighbour entry
    assert neighbour_mac6(observer.netns, victim.ip6) == mac_of(victim)
    own_na = ether(mac_of(observer), mac_of(attacker), ETH_P_IPV6,
                   neighbour_advertisement(attacker.ip6, observer.ip6, attacker.ip6, mac_of(attacker)))
    with listening(observer.netns) as seen:
        send(attacker.netns, na, own_na, ra)
        assert seen(own_na[14 + 40:]), "an NA for the pod's own address must pass"
        assert not seen(na[14 + 40:]) and not seen(ra[14 + 40:])
    assert neighbour_mac6(observer.netns, victim.ip6) == mac_of(victim), "the NA took over the victim's address"
    wait_counted(lab, attacker, "spoofed_arp", before["spoofed_arp"])
    wait_counted(lab, attacker, "ipv6", before["ipv6"])
    for where in (observer, *lab.state.nodes):  # nobody took the RA's prefix or route
        assert "2001:db8:bad" not in in_node(where, "ip", "-6", "addr")
        assert "proto ra" not in in_node(where, "ip", "-6", "route")
    assert who(attacker.netns, observer.ip6) == (attacker.ip6, observer.name)


def forged_link_layer(lab: Lab) -> dict[str, bytes]:
    """NDP for the attacker's own address whose link-layer option names the victim's MAC (it would send the
    attacker's traffic to the victim), by kind."""
    attacker, victim, observer = pod(lab, "n2p1"), pod(lab, "n1p1"), pod(lab, "n2p2")
    me, other = mac_of(attacker), mac_of(victim)
    nonce = struct.pack("!BB6s", 14, 1, b"sko-nd")  # an option Linux skips: the TLLA after it is used
    return {kind: ether(mac_of(observer), me, ETH_P_IPV6, frame) for kind, frame in {
        "NA with a forged TLLA": neighbour_advertisement(attacker.ip6, observer.ip6, attacker.ip6, other),
        "NS with a forged SLLA": neighbour_solicitation(attacker.ip6, observer.ip6, observer.ip6, other),
        "NA with the forged TLLA second": neighbour_advertisement(attacker.ip6, observer.ip6, attacker.ip6, other,
                                                                  before=nonce),
        "RS with a forged SLLA": router_solicitation(attacker.ip6, observer.ip6, other),
    }.items()}


def test_ndp_link_layer_options_must_carry_the_pods_mac(lab: Lab) -> None:
    """An NA/NS/RS for the pod's own address whose link-layer option is another MAC is refused as spoofed_arp
    (as an ARP with a forged sender MAC is); the same with the pod's own MAC passes."""
    attacker, observer = pod(lab, "n2p1"), pod(lab, "n2p2")
    me = mac_of(attacker)
    before = refused(lab, attacker)
    assert who(observer.netns, attacker.ip6) == (observer.ip6, attacker.name)  # the observer has an entry
    forged = forged_link_layer(lab)
    own = [ether(mac_of(observer), me, ETH_P_IPV6, frame) for frame in (
        neighbour_solicitation(attacker.ip6, observer.ip6, observer.ip6, me),
        router_solicitation(attacker.ip6, observer.ip6, me))]
    with listening(observer.netns) as seen:
        send(attacker.netns, *forged.values(), *own)
        assert all(seen(frame[14 + 40:]) for frame in own), "an NS or RS with the pod's own MAC must pass"
        assert [kind for kind, frame in forged.items() if seen(frame[14 + 40:])] == []
    assert neighbour_mac6(observer.netns, attacker.ip6) == mac_of(attacker), "a link-layer option poisoned it"
    wait_counted(lab, attacker, "spoofed_arp", before["spoofed_arp"], len(forged))
    assert who(observer.netns, attacker.ip6) == (observer.ip6, attacker.name)


def test_negative_control_without_the_guard(lab: Lab) -> None:
    """The same attacks succeed with the guard removed; the restarted agent's reconcile brings it back."""
    attacker, victim, observer = pod(lab, "n2p1"), pod(lab, "n1p1"), pod(lab, "n2p2")
    forged, markers, na, ra = attacks(lab)
    assert who(observer.netns, victim.ip6) == (observer.ip6, victim.name)
    try:
        with defence_removed(lab, node(lab, attacker.node), remove_pod_guard(lab, attacker)):
            with listening(observer.netns) as seen:
                send(attacker.netns, *forged, ra)
                assert all(seen(m) for m in markers), "negative control: forged IPv6 sources arrive"
                assert seen(ra[14 + 40:]), "negative control: the RA reaches the other pod"
            send(attacker.netns, na)
            deadline = time.monotonic() + 3
            while neighbour_mac6(observer.netns, victim.ip6) != mac_of(attacker) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert neighbour_mac6(observer.netns, victim.ip6) == mac_of(attacker), \
                "negative control: without the guard the NA takes over the victim's address"
            assert who(observer.netns, attacker.ip6) == (observer.ip6, attacker.name)
            send(attacker.netns, forged_link_layer(lab)["NA with a forged TLLA"])
            deadline = time.monotonic() + 3
            while neighbour_mac6(observer.netns, attacker.ip6) != mac_of(victim) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert neighbour_mac6(observer.netns, attacker.ip6) == mac_of(victim), \
                "negative control: without the guard a forged TLLA redirects the attacker's address"
            # accept_ra=0: the RA that got through made no route in the pod
            assert "proto ra" not in in_node(observer, "ip", "-6", "route")
    finally:
        forget_neighbour(observer, victim.ip6)
        forget_neighbour(observer, attacker.ip6)
    forged, markers, _, _ = attacks(lab)
    with listening(observer.netns) as seen:
        send(attacker.netns, *forged)
        assert not any(seen(m) for m in markers), "the restarted agent did not restore the guard"
    assert who(observer.netns, victim.ip6) == (observer.ip6, victim.name)
