"""NetworkPolicy verdicts taken in the BPF programs (bpf/lib/policy.h): a denied new flow is dropped by the
program (counted in policy_drops, a flow event with reason `policy`) while the nftables table's drop
counter stays still; replies of allowed flows and ICMP errors about them pass although the replying pod's
own egress is denied; a change reaches new flows within the deadline; and a pod whose rules exceed the
maps' bounds keeps ENDPOINT_POLICY, so the kernel path's nftables enforces it (its counter moves, the
programs' does not) and it stays closed.

Cast: test_netpol's 2-node lab (n1p1, n1p2 on n1; n2p1, n2p2 on n2), on the BPF datapath only.
"""

from __future__ import annotations

import ctypes
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netpolrig import PROBE_TIMEOUT, apply, assert_flows, lab_fixture, netns_of, netpol, only, policies_fixture

from sknf import api, nsutil
from sknf.datapath import bpfmaps
from sknf.datapath.bpf import sweep_policy_flows
from sknf.lab import SERVER_PORT, Lab, LabNode, LabPod

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.bpf]

PREFIX = "ska"
lab = lab_fixture(PREFIX, datapaths=("bpf",))
policies = policies_fixture({("n2p1", "n1p1", "tcp"): True, ("n1p1", "n2p1", "tcp"): True})


def pod(lab: Lab, name: str) -> LabPod:
    return next(p for p in lab.state.pods if p.name == name)


def node(lab: Lab, name: str) -> LabNode:
    return next(n for n in lab.state.nodes if n.name == name)


def be32(ip: str) -> int:
    return int.from_bytes(socket.inet_aton(ip), sys.byteorder)


def endpoint(lab: Lab, n: str, p: str) -> bpfmaps.EndpointInfo:
    with bpfmaps.pinned(lab_pins(lab, n) / "endpoints") as fd:
        entry = bpfmaps.lookup(fd, ctypes.c_uint32(be32(pod(lab, p).ip)), bpfmaps.EndpointInfo)
    assert entry is not None
    return entry


def lab_pins(lab: Lab, n: str) -> Path:
    return Path(f"/sys/fs/bpf/{lab.prefix}-{n}")


def bpf_drops(lab: Lab, n: str, p: str) -> int:
    """The programs' policy drops counted against pod p (its host veth)."""
    ifindex = endpoint(lab, n, p).ifindex
    with bpfmaps.pinned(lab_pins(lab, n) / "policy_drops") as fd:
        return sum(sum(v) for k, v in bpfmaps.read_map(fd, ctypes.c_uint32, ctypes.c_uint64) if k == ifindex)


def nft_drops(lab: Lab, n: str, p: str) -> int:
    """nftables' policy drops counted against pod p's address on node n (0 when it has none yet)."""
    out = subprocess.run(["ip", "netns", "exec", node(lab, n).netns, "nft", "-j", "list", "set", "inet",
                          "sknf-policy", "dropped"], capture_output=True, text=True, check=True).stdout
    for obj in json.loads(out)["nftables"]:
        for e in obj.get("set", {}).get("elem", []):
            if isinstance(e, dict) and e["elem"]["val"] == pod(lab, p).ip:
                return e["elem"]["counter"]["packets"]
    return 0


def drop_events(lab: Lab, n: str, after: int) -> list[dict]:
    reply = api.request(lab.node_dir(n) / "run" / "sknf.sock", {"op": "flows", "after": after, "wait": 1})
    assert reply["ok"], reply
    return [ev for ev in reply["result"]["events"] if ev["kind"] == "drop"]


def newest(lab: Lab, n: str) -> int:
    reply = api.request(lab.node_dir(n) / "run" / "sknf.sock", {"op": "flows", "last": 0})
    return reply["result"]["next"]


def wait_flags(lab: Lab, n: str, p: str, want: int, mask: int) -> None:
    deadline = time.monotonic() + 20
    while endpoint(lab, n, p).flags & mask != want:
        assert time.monotonic() < deadline, f"{p}'s flags: {endpoint(lab, n, p).flags:#x}, want {want:#x}"
        time.sleep(0.2)


def test_denied_in_bpf_replies_and_icmp_errors_pass(lab: Lab, policies: list[str]) -> None:
    """n1p1: ingress only from n1p2 (TCP, UDP), no egress at all. Denied flows are dropped by the programs;
    n1p2's allowed flows get their replies (n1p1's egress is denied: only the flow state lets them out),
    and the port unreachable n1p1 answers to a UDP datagram on a closed port reaches n1p2."""
    apply(lab, policies, "n1p1", netpol("n1p1", {
        "podSelector": only("n1p1"), "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"podSelector": only("n1p2")}], "ports": [{"protocol": "TCP"}, {"protocol": "UDP"}]}]}))
    assert_flows(lab, {("n2p1", "n1p1", "tcp"): False, ("n1p2", "n1p1", "tcp"): True,
                       ("n1p2", "n1p1", "udp"): True, ("n1p1", "n2p1", "tcp"): False})
    flags = endpoint(lab, "n1", "n1p1").flags
    assert flags & (bpfmaps.ENDPOINT_INGRESS | bpfmaps.ENDPOINT_EGRESS) == \
        bpfmaps.ENDPOINT_INGRESS | bpfmaps.ENDPOINT_EGRESS and not flags & bpfmaps.ENDPOINT_POLICY

    before_bpf, before_nft, seq = bpf_drops(lab, "n1", "n1p1"), nft_drops(lab, "n1", "n1p1"), newest(lab, "n1")
    assert_flows(lab, {("n2p1", "n1p1", "tcp"): False, ("n1p1", "n1p2", "udp"): False})
    assert bpf_drops(lab, "n1", "n1p1") > before_bpf
    assert nft_drops(lab, "n1", "n1p1") == before_nft  # the table never saw the denied frames
    events = drop_events(lab, "n1", seq)
    assert any(ev["reason"] == "policy" and ev["src"]["ip"] == pod(lab, "n2p1").ip for ev in events), events

    with nsutil.entered(netns_of(lab, "n1p2")):  # a closed port: n1p1 answers with an ICMP port unreachable
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(PROBE_TIMEOUT * 3)
        sock.connect((pod(lab, "n1p1").ip, SERVER_PORT + 7))
        sock.send(b"x")
        with pytest.raises(ConnectionRefusedError):
            sock.recv(16)


def flow_entries(lab: Lab, fd: int, port: int) -> list[bpfmaps.FlowKey]:
    """policy_flows' keys of flows between n1p2 and n1p1 with `port` on either side."""
    ends = {be32(pod(lab, "n1p1").ip), be32(pod(lab, "n1p2").ip)}
    want = socket.htons(port)
    return [k for k, _ in bpfmaps.read_map(fd, bpfmaps.FlowKey, bpfmaps.PolicyFlow)
            if {k.saddr, k.daddr} == ends and want in (k.sport, k.dport)]


def test_a_live_flow_keeps_its_state_and_its_replies_need_it(lab: Lab, policies: list[str]) -> None:
    """n1p1 may not send anything of its own (egress denied): an open connection's replies pass on its
    policy_flows entry alone. The sweep, even 200 s ahead, keeps that entry (TCP established: conntrack's
    5 days) while it forgets an idle UDP flow's (120 s); swept 6 days ahead the entry goes, and the
    connection's next frame from n1p2 is decided again as a new flow (allowed) and remembered anew."""
    apply(lab, policies, "n1p1", netpol("n1p1", {
        "podSelector": only("n1p1"), "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"podSelector": only("n1p2")}]}]}))
    assert_flows(lab, {("n1p2", "n1p1", "udp"): True, ("n1p1", "n1p2", "tcp"): False})
    with nsutil.entered(netns_of(lab, "n1p2")):
        first = socket.create_connection((pod(lab, "n1p1").ip, SERVER_PORT), timeout=PROBE_TIMEOUT * 3)
        second = socket.create_connection((pod(lab, "n1p1").ip, SERVER_PORT), timeout=PROBE_TIMEOUT * 3)
    with first, second, bpfmaps.pinned(lab_pins(lab, "n1") / "policy_flows") as fd:
        first.sendall(b"SINK 8\nfour")
        second.sendall(b"SINK 8\nfour")
        port = first.getsockname()[1]
        assert flow_entries(lab, fd, port) and flow_entries(lab, fd, SERVER_PORT)
        now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        sweep_policy_flows(fd, now + 200 * 10**9)
        assert flow_entries(lab, fd, port)  # the open connection's
        udp = [k for k in flow_entries(lab, fd, SERVER_PORT) if k.proto == socket.IPPROTO_UDP]
        assert not udp  # the probes' idle UDP flows
        first.sendall(b"more")
        assert first.makefile().readline().split()[:1] == ["8"]
        sweep_policy_flows(fd, now + 6 * 86400 * 10**9)
        assert not flow_entries(lab, fd, second.getsockname()[1])
        second.sendall(b"more")  # n1p2's frame meets n1p1's ingress again, allowed: remembered anew
        assert second.makefile().readline().split()[:1] == ["8"]
        assert flow_entries(lab, fd, second.getsockname()[1])


def test_a_change_reaches_new_flows(lab: Lab, policies: list[str]) -> None:
    """Deny-all ingress on n1p1, then an allow from n2p1: the programs' rules follow within the deadline."""
    apply(lab, policies, "n1p1", netpol("n1p1", {"podSelector": only("n1p1"), "policyTypes": ["Ingress"]}))
    assert_flows(lab, {("n2p1", "n1p1", "tcp"): False, ("n1p2", "n1p1", "tcp"): False})
    apply(lab, policies, "n1p1", netpol("n1p1", {"podSelector": only("n1p1"),
                                                 "ingress": [{"from": [{"podSelector": only("n2p1")}]}]}))
    assert_flows(lab, {("n2p1", "n1p1", "tcp"): True, ("n1p2", "n1p1", "tcp"): False})
    wait_flags(lab, "n1", "n1p1", bpfmaps.ENDPOINT_INGRESS, bpfmaps.ENDPOINT_INGRESS | bpfmaps.ENDPOINT_POLICY)


def test_rules_beyond_the_bounds_fail_closed_on_the_kernel_path(lab: Lab, policies: list[str]) -> None:
    """17 separate port ranges to one peer (the programs hold 16): n2p1 keeps ENDPOINT_POLICY, nftables
    decides its flows (its counter moves, the programs' does not), allowing and denying as the rules say."""
    ports = [{"port": SERVER_PORT}] + [{"port": 20000 + 2 * i} for i in range(16)]
    rule = {"from": [{"podSelector": only("n1p2")}], "ports": ports}
    apply(lab, policies, "n2p1", netpol("n2p1", {"podSelector": only("n2p1"), "ingress": [rule]}))
    assert_flows(lab, {("n1p1", "n2p1", "tcp"): False, ("n1p2", "n2p1", "tcp"): True})
    wait_flags(lab, "n2", "n2p1", bpfmaps.ENDPOINT_POLICY, bpfmaps.POLICY_FLAGS)
    before_bpf, before_nft = bpf_drops(lab, "n2", "n2p1"), nft_drops(lab, "n2", "n2p1")
    assert_flows(lab, {("n1p1", "n2p1", "tcp"): False, ("n2p2", "n2p1", "udp"): False})
    assert nft_drops(lab, "n2", "n2p1") > before_nft
    assert bpf_drops(lab, "n2", "n2p1") == before_bpf
