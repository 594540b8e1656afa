"""No pod or outsider can impersonate anyone, in both datapaths: each attack is made with raw frames from
inside a pod's namespace (or from the lab's Internet host), must fail and be counted, and legitimate
traffic right after still works. Negative controls remove the defence (agent stopped, nft table or tc
filter or iptables chain removed) and show the same attack succeeding, then the agent's reconcile
restores it.

Cast (a 2-node lab, 2 pods per node): the attacker is n2p1; its victims are n1p1 (another node) and
n2p2 (same node); n1p2 observes what reaches node n1.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from frames import (
    BROADCAST,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    arp,
    ether,
    listening,
    mac_of,
    marker,
    router_advertisement,
    send,
    udp4,
)
from leftovers import managed_lab

from sknf import netlink, nsutil, stats
from sknf.config import VXLAN
from sknf.datapath import REFUSED_REASONS, bpfmaps
from sknf.lab import INTERNET_HOST, Lab, LabNode, LabPod, run_chain, who
from sknf.pod import pod_mac

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "sks"
# -- the lab --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["kernel", "bpf"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    with managed_lab(PREFIX, nodes=2, pods_per_node=2, datapath=request.param) as built:
        yield built


def pod(lab: Lab, name: str) -> LabPod:
    return next(p for p in lab.state.pods if p.name == name)


def node(lab: Lab, name: str) -> LabNode:
    return next(n for n in lab.state.nodes if n.name == name)


def refused(lab: Lab, p: LabPod) -> dict[str, int]:
    """The pod's refused-frame counters as the agent reports them (`sknf stats`' source)."""
    reply = stats.query_agent(lab.node_dir(p.node) / "run" / "sknf.sock")
    (row,) = [r for r in reply["pods"] if r["host_ifname"] == p.host_ifname]
    return row["refused"]


def wait_counted(lab: Lab, p: LabPod, reason: str, before: int, at_least: int = 1) -> int:
    deadline = time.monotonic() + 5
    while (now := refused(lab, p)[reason]) < before + at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    assert now >= before + at_least, f"{reason} of {p.name}: {before} -> {now}"
    return now


def in_node(n: LabNode, *argv: str, check: bool = True) -> str:
    return subprocess.run(list(argv), preexec_fn=nsutil.preexec_enter(n.netns), capture_output=True, text=True,
                          check=check).stdout


@contextlib.contextmanager
def defence_removed(lab: Lab, n: LabNode, remove: Callable[[], None]) -> Iterator[None]:
    """Stop the node's agent (it would restore the defence within seconds), remove it, run the block; then
    restart the agent, whose reconcile must bring the defence back."""
    lab.stop_agent(n)
    try:
        remove()
        yield
    finally:
        lab.restart_agent(n)


def remove_pod_guard(lab: Lab, attacker: LabPod) -> Callable[[], None]:
    n = node(lab, attacker.node)
    if lab.state.datapath == "kernel":
        return lambda: in_node(n, "nft", "delete", "table", "bridge", "sknf")
    return lambda: in_node(n, "tc", "filter", "del", "dev", attacker.host_ifname, "ingress")


def neighbour_mac(netns: str, ip: str) -> str | None:
    with netlink.route(nsutil.netns_path(netns)) as ipr:
        for n in ipr.get_neighbours(family=socket.AF_INET, dst=ip):
            return n.get("NDA_LLADDR")
    return None


# -- attacks ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["across nodes", "within a node"])
def test_ip_spoofing_of_a_pod_and_a_node(lab: Lab, where: str) -> None:
    """The attacker sends as victim n1p1 and as node n1 to a pod on another node (n1p2) or its own (n2p2:
    in BPF mode that is the same-node fast path)."""
    attacker, victim = pod(lab, "n2p1"), pod(lab, "n1p1")
    observer = pod(lab, "n1p2" if where == "across nodes" else "n2p2")
    before = refused(lab, attacker)["spoofed_ip"]
    own, as_pod, as_node = marker("own"), marker("pod"), marker("node")
    with listening(observer.netns) as seen:
        send(attacker.netns, ether(mac_of(observer), mac_of(attacker), ETH_P_IP, udp4(attacker.ip, observer.ip, own)),
             ether(mac_of(observer), mac_of(attacker), ETH_P_IP, udp4(victim.ip, observer.ip, as_pod)),
             ether(mac_of(observer), mac_of(attacker), ETH_P_IP,
                   udp4(node(lab, "n1").underlay_ip, observer.ip, as_node)))
        assert seen(own), "the attacker's own, honest frame must arrive (or this test proves nothing)"
        assert not seen(as_pod), "a frame with another pod's source address was delivered"
        assert not seen(as_node), "a frame with a node's source address was delivered"
    wait_counted(lab, attacker, "spoofed_ip", before, 2)
    if where == "within a node":
        return  # the negative control, once: the guard sits on the attacker's veth whatever the destination

    with defence_removed(lab, node(lab, attacker.node), remove_pod_guard(lab, attacker)):
        spoofed = marker("control")
        with listening(observer.netns) as seen:
            send(attacker.netns, ether(mac_of(observer), mac_of(attacker), ETH_P_IP,
                                       udp4(victim.ip, observer.ip, spoofed)))
            assert seen(spoofed), "negative control: without the guard the spoofed frame arrives"
    again = marker("again")
    with listening(observer.netns) as seen:
        send(attacker.netns, ether(mac_of(observer), mac_of(attacker), ETH_P_IP, udp4(victim.ip, observer.ip, again)))
        assert not seen(again), "the restarted agent did not restore the guard"
    assert who(attacker.netns, observer.ip) == (attacker.ip, observer.name)


def test_mac_spoofing(lab: Lab) -> None:
    attacker, victim, observer = pod(lab, "n2p1"), pod(lab, "n2p2"), pod(lab, "n1p2")
    before = refused(lab, attacker)["spoofed_mac"]
    forged = marker("mac")
    with listening(observer.netns) as seen:
        send(attacker.netns, ether(mac_of(observer), mac_of(victim), ETH_P_IP, udp4(attacker.ip, observer.ip, forged)),
             ether(BROADCAST, "02:00:5e:10:00:01", ETH_P_IP, udp4(attacker.ip, observer.ip, forged)))
        assert not seen(forged)
    wait_counted(lab, attacker, "spoofed_mac", before, 2)
    # The bridge did not learn the victim's MAC behind the attacker's port: the victim still gets its traffic.
    assert who(observer.netns, victim.ip) == (observer.ip, victim.name)


@pytest.mark.parametrize("where", ["across nodes", "within a node"])
def test_gratuitous_arp_hijack(lab: Lab, where: str) -> None:
    """The attacker claims the victim's address; the observer (which talks to the victim) must keep the
    victim's MAC. Across nodes: attacker n2p1, observer n1p2, victim n1p1; within a node: attacker n1p2,
    observer n1p1, victim n2p2."""
    names = ("n2p1", "n1p2", "n1p1") if where == "across nodes" else ("n1p2", "n1p1", "n2p2")
    attacker, observer, victim = (pod(lab, n) for n in names)
    assert who(observer.netns, victim.ip) == (observer.ip, victim.name)  # the observer has a neighbour entry
    assert neighbour_mac(observer.netns, victim.ip) == mac_of(victim)
    before = refused(lab, attacker)["spoofed_arp"]
    time.sleep(1.1)  # past the neighbour entry's locktime, which would otherwise ignore any update
    hijack = [ether(BROADCAST, mac_of(attacker), ETH_P_ARP, arp(op, mac_of(attacker), victim.ip, "00:00:00:00:00:00",
                                                                victim.ip))
              for op in (1, 2)]
    hijack.append(ether(mac_of(observer), mac_of(attacker), ETH_P_ARP,  # a reply naming the victim's MAC as ours
                        arp(2, mac_of(victim), attacker.ip, mac_of(observer), observer.ip)))
    send(attacker.netns, *hijack)
    time.sleep(0.3)
    assert neighbour_mac(observer.netns, victim.ip) == mac_of(victim), "the observer's ARP entry was hijacked"
    wait_counted(lab, attacker, "spoofed_arp", before, 3)
    # ARP itself works: a probe (sender 0.0.0.0) and an honest announcement pass.
    probe = ether(BROADCAST, mac_of(attacker), ETH_P_ARP, arp(1, mac_of(attacker), "0.0.0.0", "00:00:00:00:00:00",
                                                              attacker.ip))
    with listening(observer.netns) as seen:
        send(attacker.netns, probe)
        assert seen(probe[14:])
    assert who(observer.netns, victim.ip) == (observer.ip, victim.name)
    assert who(attacker.netns, observer.ip) == (attacker.ip, observer.name)

    if where == "across nodes":
        with defence_removed(lab, node(lab, attacker.node), remove_pod_guard(lab, attacker)):
            send(attacker.netns, *hijack[:2])
            deadline = time.monotonic() + 3
            while neighbour_mac(observer.netns, victim.ip) != mac_of(attacker) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert neighbour_mac(observer.netns, victim.ip) == mac_of(attacker), \
                "negative control: without the guard the gratuitous ARP takes over the address"
        for p in lab.state.pods:  # undo the hijack the control made, wherever the broadcast landed
            with netlink.route(nsutil.netns_path(p.netns)) as ipr:
                if neighbour_mac(p.netns, victim.ip) == mac_of(attacker):
                    ipr.neigh("del", dst=victim.ip, ifindex=netlink.link_index(ipr, "eth0"))
        assert who(observer.netns, victim.ip) == (observer.ip, victim.name)


def test_ipv6_and_rogue_router_advertisement(lab: Lab) -> None:
    attacker, observer = pod(lab, "n2p1"), pod(lab, "n2p2")
    n2 = node(lab, "n2")
    with nsutil.entered(attacker.netns):
        assert Path("/proc/sys/net/ipv6/conf/eth0/disable_ipv6").read_text().strip() == "1"
        assert Path("/proc/sys/net/ipv6/conf/lo/disable_ipv6").read_text().strip() == "0"
    with netlink.route(nsutil.netns_path(attacker.netns)) as ipr:
        lo = netlink.link_index(ipr, "lo")
        assert [a.get("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET6, index=lo)] == ["::1"]
        eth0 = netlink.link_index(ipr, "eth0")
        assert ipr.get_addr(family=socket.AF_INET6, index=eth0) == ()  # not even a link-local address
    with nsutil.entered(n2.netns):
        for dev in ("brsknf", VXLAN):
            assert Path(f"/proc/sys/net/ipv6/conf/{dev}/accept_ra").read_text().strip() == "0"
    before = refused(lab, attacker)["ipv6"]
    ra = ether("33:33:00:00:00:01", mac_of(attacker), ETH_P_IPV6, router_advertisement(mac_of(attacker)))
    with listening(observer.netns) as seen:
        send(attacker.netns, ra)
        assert not seen(ra[14:]), "another pod received the router advertisement"
    wait_counted(lab, attacker, "ipv6", before)
    for n in lab.state.nodes:
        assert in_node(n, "ip", "-6", "route", "show", "default").strip() == "", f"{n.name} took a default route"
        assert "2001:db8:bad" not in in_node(n, "ip", "-6", "addr")

    with defence_removed(lab, n2, remove_pod_guard(lab, attacker)):
        with listening(observer.netns) as seen:
            send(attacker.netns, ra)
            assert seen(ra[14:]), "negative control: without the guard the RA reaches the other pod"
        time.sleep(0.3)
        for n in lab.state.nodes:  # and still no node takes it: brsknf/vxsknf accept no RAs
            assert in_node(n, "ip", "-6", "route", "show", "default").strip() == ""


def vxlan_frame(victim: LabPod, inner_src_mac: str, payload: bytes, vni: int = 1) -> bytes:
    inner = ether(mac_of(victim), inner_src_mac, ETH_P_IP, udp4("10.244.2.250", victim.ip, payload))
    return struct.pack("!B3xI", 0x08, vni << 8) + inner


def fdb_has(n: LabNode, mac: str) -> bool:
    return mac in in_node(n, "bridge", "fdb", "show", "dev", VXLAN)


def assert_forged_vxlan_refused(lab: Lab, tool: str, frame: Callable[[LabPod, str, bytes], bytes],
                                tag: str, mac_prefix: str) -> None:
    """VXLAN sent to n1 from the Internet host (a host that is no node) with an inner frame for n1p2 from
    `frame(victim, inner source MAC, payload)`: dropped by SKNF-INPUT (counted in `tool`'s counters), no
    FDB learning; the negative control, without the INPUT jump, delivers it and learns its MAC; the
    restarted agent restores the jump; the real overlay still works. Shared by the IPv4 and IPv6 underlays."""
    victim, n1 = pod(lab, "n1p2"), node(lab, "n1")
    family = socket.AF_INET6 if ":" in n1.underlay_ip else socket.AF_INET

    def forge(inner_mac: str, payload: bytes) -> None:
        with nsutil.entered(lab.inet):
            s = socket.socket(family, socket.SOCK_DGRAM)
        with s:
            s.sendto(frame(victim, inner_mac, payload), (n1.underlay_ip, 4789))

    def dropped() -> int:
        out = in_node(n1, tool, "-w", "-t", "filter", "-L", "SKNF-INPUT", "-v", "-x", "-n")
        return sum(int(line.split()[0]) for line in out.splitlines() if "DROP" in line)

    before = dropped()
    forged = marker(tag)
    with listening(victim.netns) as seen:
        forge(f"{mac_prefix}:01", forged)
        assert not seen(forged), "a VXLAN frame from a host that is no node reached a pod"
    assert not fdb_has(n1, f"{mac_prefix}:01"), "the forged frame steered FDB learning"
    assert dropped() > before

    def remove() -> None:
        in_node(n1, tool, "-w", "-D", "INPUT", "-m", "comment", "--comment", "sknf", "-j", "SKNF-INPUT")

    try:
        with defence_removed(lab, n1, remove):
            control = marker(f"{tag}-control")
            with listening(victim.netns) as seen:
                forge(f"{mac_prefix}:02", control)
                assert seen(control), "negative control: without the rule the forged frame is delivered"
            assert fdb_has(n1, f"{mac_prefix}:02"), "negative control: and its inner source MAC is learned"
    finally:
        in_node(n1, "bridge", "fdb", "del", f"{mac_prefix}:02", "dev", VXLAN, "dst", lab.internet_host, check=False)
    again = marker(f"{tag}-again")
    with listening(victim.netns) as seen:
        forge(f"{mac_prefix}:03", again)
        assert not seen(again), "the restarted agent did not restore the INPUT jump"
    assert not fdb_has(n1, f"{mac_prefix}:03")
    assert who(victim.netns, pod(lab, "n2p1").ip) == (victim.ip, "n2p1")  # the real overlay still works


def test_forged_vxlan_from_the_internet(lab: Lab) -> None:
    assert_forged_vxlan_refused(lab, "iptables", vxlan_frame, "vxlan", "02:66:00:00:00")


# -- pod lifecycle --------------------------------------------------------------------------------------

def guard_state(lab: Lab, n: LabNode) -> str:
    """Everything the node's validation holds, as text: the nft table (kernel) or the BPF maps (bpf)."""
    if lab.state.datapath == "kernel":
        return in_node(n, "nft", "list", "table", "bridge", "sknf")
    pins = Path(f"/sys/fs/bpf/{PREFIX}-{n.name}")
    with bpfmaps.pinned(pins / "pod_identity") as ident, bpfmaps.pinned(pins / "pod_sources") as sources:
        idents = bpfmaps.read_map(ident, ctypes.c_uint32, bpfmaps.PodIdentity)
        srcs = bpfmaps.read_map(sources, bpfmaps.SourceKey, bpfmaps.PodIdentity)
        return "\n".join([*(f"identity {k} {bytes(v.mac).hex(':')}" for k, v in idents),
                          *(f"source {k.ifindex} {ipaddress.IPv4Address(socket.ntohl(k.addr))}" for k, _ in srcs)])


def rule_count(lab: Lab, n: LabNode) -> int:
    return sum(1 for line in guard_state(lab, n).splitlines() if " comment \"sknf " in line)


def allows(state: str, lab: Lab, host_if: str, ifindex: int, addr: str) -> bool:
    """Whether the guard state lets the attachment send from addr."""
    if lab.state.datapath == "kernel":
        return f'"{host_if}" . {addr}' in state
    return f"source {ifindex} {addr}" in state


def knows(state: str, lab: Lab, host_if: str, ifindex: int) -> bool:
    """Whether the guard state holds anything of the attachment."""
    if lab.state.datapath == "kernel":
        return f'"{host_if}"' in state
    return f"identity {ifindex} " in state or f"source {ifindex} " in state


def test_readded_pod_is_validated_against_its_new_address(lab: Lab) -> None:
    n = node(lab, "n2")
    observer = pod(lab, "n1p2")
    ns = f"{PREFIX}-n2x"
    cid = "f" * 63 + "e"
    conflist = lab.conflist(n)
    rules_before = rule_count(lab, n)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        addrs, ifindexes = [], []
        for _ in range(2):
            result = run_chain(lab.plugin_dir, "ADD", conflist, container_id=cid, netns=nsutil.netns_path(ns),
                               args="K8S_POD_NAMESPACE=lab;K8S_POD_NAME=readded")
            addrs.append(result["ips"][0]["address"].split("/")[0])
            host_if = result["interfaces"][0]["name"]
            with netlink.route(nsutil.netns_path(n.netns)) as ipr:
                ifindexes.append(netlink.link_index(ipr, host_if))
            assert rule_count(lab, n) == rules_before  # pods are set elements, never rules
            assert allows(guard_state(lab, n), lab, host_if, ifindexes[-1], addrs[-1])
            if len(addrs) == 1:
                run_chain(lab.plugin_dir, "DEL", conflist, container_id=cid, netns=nsutil.netns_path(ns))
                gone = guard_state(lab, n)
                assert f" {addrs[0]}" not in gone, "a deleted pod's address is still allowed somewhere"
                assert not knows(gone, lab, host_if, ifindexes[0])
        assert addrs[0] != addrs[1], "the re-added pod got its old address back; this test needs a new one"
        mac = pod_mac(cid, "eth0")
        stale, fresh = marker("stale"), marker("fresh")
        with listening(observer.netns) as seen:
            send(ns, ether(mac_of(observer), mac, ETH_P_IP, udp4(addrs[0], observer.ip, stale)),
                 ether(mac_of(observer), mac, ETH_P_IP, udp4(addrs[1], observer.ip, fresh)))
            assert seen(fresh)
            assert not seen(stale), "the re-added pod may still send from its old address"
    finally:
        run_chain(lab.plugin_dir, "DEL", conflist, container_id=cid, netns=nsutil.netns_path(ns))
        subprocess.run(["ip", "netns", "del", ns], check=False)
    state = guard_state(lab, n)
    assert not any(knows(state, lab, host_if, i) for i in ifindexes)
    assert all(f" {a}" not in state for a in addrs)


def test_counters_in_metrics_and_agent_log(lab: Lab) -> None:
    """Run after the attacks: drops by reason are Prometheus series, and the agent logged them (rate-limited)."""
    attacker, observer = pod(lab, "n2p1"), pod(lab, "n1p2")
    n2 = node(lab, "n2")
    send(attacker.netns, ether(mac_of(observer), mac_of(attacker), ETH_P_IP, udp4("10.244.1.250", observer.ip, b"x")),
         ether("33:33:00:00:00:01", mac_of(attacker), ETH_P_IPV6, router_advertisement(mac_of(attacker))))
    wait_counted(lab, attacker, "ipv6", refused(lab, attacker)["ipv6"] - 1)
    with nsutil.entered(n2.netns):
        sock = socket.create_connection((n2.underlay_ip, 9655), timeout=5)
    with sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        body = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
    series = {line.split("{", 1)[1].split("}")[0]: float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
              if line.startswith("sknf_pod_refused_packets_total{")}
    mine = {labels: v for labels, v in series.items() if f'pod="{attacker.name}"' in labels}
    assert {lab_.rsplit('reason="', 1)[1].rstrip('"') for lab_ in mine} == set(REFUSED_REASONS)
    counted = refused(lab, attacker)
    for reason in REFUSED_REASONS:
        assert mine[next(k for k in mine if f'reason="{reason}"' in k)] == counted[reason]
    deadline = time.monotonic() + 5  # the agent samples every second; a line may also be from an earlier test
    while True:
        log = (lab.node_dir("n2") / "agent.log").read_text()
        lines = [line for line in log.splitlines() if "refused: pod lab/n2p1" in line]
        if all(any(f"as {r} " in line for line in lines) for r in ("spoofed_ip", "ipv6")):
            break
        assert time.monotonic() < deadline, lines[-5:]
        time.sleep(0.2)


def test_legitimate_traffic_after_the_attacks(lab: Lab) -> None:
    """The lab's whole matrix: pod<->pod (ARP), node<->pod (the gateway), pod->Internet, Services, MTU, bulk."""
    results = lab.check(bulk_bytes=1 << 20)
    assert [f"{r.flow}: {r.src} -> {r.dst}: {r.detail}" for r in results if not r.ok] == []
    assert who(pod(lab, "n2p1").netns, INTERNET_HOST) == (node(lab, "n2").underlay_ip, "inet")


@pytest.mark.parametrize("lab", ["bpf"], indirect=True)  # the maps exist in the bpf datapath only
def test_bcc_reads_the_validation_maps_as_written(lab: Lab) -> None:
    """BCC reads the attacker's identity and sources as the agent wrote them, one counter per reason."""
    from sknf.datapath import bpfload
    from sknf.datapath.bpf import BPF_DIR, _max_flows

    attacker = pod(lab, "n2p1")
    bpf = bpfload.compile_bpf(BPF_DIR, Path(f"/sys/fs/bpf/{PREFIX}-n2"), _max_flows())
    try:
        # (the mirrors' layouts are checked in tests/bpf/test_maps.py)
        assert ctypes.sizeof(bpfmaps.RefusedValues) == 8 * len(REFUSED_REASONS)
        with netlink.route(nsutil.netns_path(node(lab, "n2").netns)) as ipr:
            ifindex = netlink.link_index(ipr, attacker.host_ifname)
        ident = bpf[b"pod_identity"][ctypes.c_uint32(ifindex)]
        assert bytes(ident.mac).hex(":") == mac_of(attacker)
        addrs = [socket.inet_ntoa(struct.pack("I", k.addr)) for k in bpf[b"pod_sources"]
                 if k.ifindex == ifindex]
        assert addrs == [attacker.ip]
    finally:
        bpf.cleanup()


def test_a_container_may_send_any_of_its_addresses_on_each_interface(lab: Lab) -> None:
    """Linux may send eth1's address out of eth0: both are allowed on both, until eth1 is deleted."""
    n = node(lab, "n2")
    observer = pod(lab, "n1p2")
    ns, cid = f"{PREFIX}-n2m", "d" * 64
    conflist = lab.conflist(n)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        addrs = {}
        for ifname in ("eth0", "eth1"):
            result = run_chain(lab.plugin_dir, "ADD", conflist, container_id=cid, netns=nsutil.netns_path(ns),
                               ifname=ifname, args="K8S_POD_NAMESPACE=lab;K8S_POD_NAME=multi")
            addrs[ifname] = result["ips"][0]["address"].split("/")[0]
        frames = {m: ether(mac_of(observer), pod_mac(cid, "eth0"), ETH_P_IP, udp4(addrs[ifname], observer.ip, m))
                  for ifname, m in (("eth0", marker("eth0")), ("eth1", marker("eth1")))}
        with listening(observer.netns) as seen:
            send(ns, *frames.values())
            assert all(seen(m) for m in frames), "eth0 may send from eth1's address too"
        run_chain(lab.plugin_dir, "DEL", conflist, container_id=cid, netns=nsutil.netns_path(ns), ifname="eth1")
        late = marker("eth1-deleted")
        with listening(observer.netns) as seen:
            send(ns, ether(mac_of(observer), pod_mac(cid, "eth0"), ETH_P_IP, udp4(addrs["eth1"], observer.ip, late)))
            assert not seen(late), "the deleted interface's address is still allowed on eth0"
    finally:
        for ifname in ("eth1", "eth0"):
            run_chain(lab.plugin_dir, "DEL", conflist, container_id=cid, netns=nsutil.netns_path(ns), ifname=ifname)
        subprocess.run(["ip", "netns", "del", ns], check=False)
