"""`sknf flows` on a BPF lab: traffic the test sends shows up as flow events with both ends resolved as the
node knows them (its pods by name, other nodes' pods and addresses by node, a ClusterIP with its backend,
the Internet as world), forged frames as drops with their reason, a stopped agent's overflow in the lost
counter, and the learned-flow fill level in `sknf doctor` with the agent down.

Cast (2 nodes, 2 pods each): n1p2 is the client; n1p1 (same node), n2p1 (other node, backend of ClusterIP
10.96.0.11) and n1p1 again behind 10.96.0.10 are its servers.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from frames import ETH_P_IP, ether, mac_of, raw_socket, udp4
from leftovers import managed_lab

from sknf import api, nsutil
from sknf.config import load as load_config
from sknf.datapath import bpfmaps, events
from sknf.lab import INTERNET_HOST, REPO, SERVER_PORT, SERVICE_BASE, SVC_TCP_PORT, Lab, LabNode, LabPod, who

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.bpf]

PREFIX = "skn"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with managed_lab(PREFIX, nodes=2, pods_per_node=2, datapath="bpf") as built:
        yield built


def pod(lab: Lab, name: str) -> LabPod:
    return next(p for p in lab.state.pods if p.name == name)


def node(lab: Lab, name: str) -> LabNode:
    return next(n for n in lab.state.nodes if n.name == name)


def query(lab: Lab, n: LabNode, **req: Any) -> dict[str, Any]:
    reply = api.request(lab.node_dir(n.name) / "run" / "sknf.sock", {"op": "flows", **req})
    assert reply["ok"], reply
    return reply["result"]


def wait_event(lab: Lab, n: LabNode, want: Callable[[dict], bool], after: int = 0) -> dict:
    """The first event on node n after seq `after` that `want` accepts (long-polling the agent, 5 s at most)."""
    deadline = time.monotonic() + 5
    seen: list[dict] = []
    while time.monotonic() < deadline:
        reply = query(lab, n, after=after, wait=1)
        seen += reply["events"]
        for ev in reply["events"]:
            if want(ev):
                return ev
        after = reply["next"]
    raise AssertionError(f"no such event on {n.name}; saw {json.dumps(seen[-8:], indent=1)}")


def newest(lab: Lab, n: LabNode) -> int:
    return query(lab, n, last=0)["next"]


def is_tcp_to(ev: dict, src_ip: str, dst_ip: str, dport: int) -> bool:
    return (ev["kind"] == "flow" and ev["protocol"] == "tcp" and ev["src"]["ip"] == src_ip
            and ev["dst"]["ip"] == dst_ip and ev["dst"]["port"] == dport)


@pytest.mark.parametrize("target", ["same node", "other node", "node address", "world"])
def test_pod_flows_are_resolved(lab: Lab, target: str) -> None:
    client, n1, n2 = pod(lab, "n1p2"), node(lab, "n1"), node(lab, "n2")
    ip, want_dst, path = {
        "same node": (pod(lab, "n1p1").ip, {"kind": "pod", "namespace": "lab", "pod": "n1p1", "node": "n1"}, "fast"),
        "other node": (pod(lab, "n2p1").ip, {"kind": "remote-pod", "node": "n2"}, "fast"),
        "node address": (n2.underlay_ip, {"kind": "node", "node": "n2"}, "kernel"),
        "world": (INTERNET_HOST, {"kind": "world"}, "kernel"),
    }[target]
    since = newest(lab, n1)
    who(client.netns, ip)
    ev = wait_event(lab, n1, lambda e: is_tcp_to(e, client.ip, ip, SERVER_PORT), since)
    assert ev["src"] == {"ip": client.ip, "kind": "pod", "namespace": "lab", "pod": "n1p2", "node": "n1",
                         "port": ev["src"]["port"]}
    assert {k: v for k, v in ev["dst"].items() if k not in ("ip", "port")} == want_dst
    assert (ev["path"], ev["hook"], ev["device"]) == (path, "from-pod", client.host_ifname)
    assert "backend" not in ev
    if target == "other node":  # the receiving node reports the flow too, from its side
        there = wait_event(lab, n2, lambda e: is_tcp_to(e, client.ip, ip, SERVER_PORT) and
                           e["src"]["port"] == ev["src"]["port"])
        assert there["src"]["kind"] == "remote-pod" and there["src"]["node"] == "n1"
        assert there["dst"]["pod"] == "n2p1" and there["hook"] == "from-overlay"


@pytest.mark.parametrize("backend", ["n1p1", "n2p1"])
def test_service_flow_names_the_clusterip_and_its_backend(lab: Lab, backend: str) -> None:
    client, n1, server = pod(lab, "n1p2"), node(lab, "n1"), pod(lab, backend)
    cluster_ip = str(SERVICE_BASE + (0 if backend == "n1p1" else 1))
    since = newest(lab, n1)
    assert who(client.netns, cluster_ip, SVC_TCP_PORT) == (client.ip, backend)
    ev = wait_event(lab, n1, lambda e: is_tcp_to(e, client.ip, cluster_ip, SVC_TCP_PORT), since)
    assert ev["dst"]["kind"] == "service" and ev["path"] == "kernel"
    assert ev["backend"]["ip"] == server.ip and ev["backend"]["port"] == SERVER_PORT
    assert ev["backend"].get("pod") == (backend if backend == "n1p1" else None)
    assert ev["backend"]["node"] == server.node
    # the backend's replies are not new flows: they answer one the node saw leave
    replies = [e for e in query(lab, n1, after=since)["events"] if e["src"]["ip"] == server.ip
               and e["dst"]["ip"] == client.ip]
    assert replies == []


def test_forged_source_is_a_drop_event(lab: Lab) -> None:
    """A frame from n1p2 with n1p1's address is dropped and reported as spoofed_ip; the same frame with
    its own address (the control) is a new flow, not a drop."""
    attacker, victim, target, n1 = pod(lab, "n1p2"), pod(lab, "n1p1"), pod(lab, "n2p2"), node(lab, "n1")
    since = newest(lab, n1)
    with raw_socket(attacker.netns) as s:
        for src, sport in ((victim.ip, 41001), (attacker.ip, 41002)):
            s.send(ether(mac_of(target), mac_of(attacker), ETH_P_IP, udp4(src, target.ip, b"skn", sport, 9)))
    drop = wait_event(lab, n1, lambda e: e["kind"] == "drop" and e["src"].get("port") == 41001, since)
    assert drop["reason"] == "spoofed_ip" and drop["path"] == "dropped" and drop["protocol"] == "udp"
    assert drop["src"]["ip"] == victim.ip and drop["src"]["pod"] == "n1p1"  # the forged address, resolved
    assert drop["dst"]["ip"] == target.ip and drop["device"] == attacker.host_ifname
    control = wait_event(lab, n1, lambda e: e["src"].get("port") == 41002, since)
    assert control["kind"] == "flow" and control["src"]["pod"] == "n1p2"
    assert [e for e in query(lab, n1, after=since)["events"]
            if e["kind"] == "drop" and e["src"].get("port") == 41002] == []


def flows_cli(n: LabNode, *argv: str) -> list[str]:
    return [sys.executable, "-m", "sknf", "flows", "-c", n.config, *argv]


def test_follow_filters_by_pod(lab: Lab) -> None:
    """`sknf flows --follow --pod n1p1 -o json` prints new events of that pod as they happen, none of others."""
    client, n1 = pod(lab, "n1p2"), node(lab, "n1")
    proc = subprocess.Popen(flows_cli(n1, "--follow", "--last", "0", "--pod", "n1p1", "-o", "json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        deadline = time.monotonic() + 20
        lines: list[dict] = []
        while not any(e["dst"].get("pod") == "n1p1" for e in lines):
            assert time.monotonic() < deadline, (lines, proc.poll())
            # new flows (fresh source ports) until the CLI, started meanwhile, follows and prints one
            who(client.netns, pod(lab, "n2p2").ip)  # not n1p1's: must not be printed
            who(client.netns, pod(lab, "n1p1").ip)
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                lines.append(json.loads(proc.stdout.readline()))
        assert all("n1p1" in (e["src"].get("pod"), e["dst"].get("pod"), e.get("backend", {}).get("pod"))
                   for e in lines)
    finally:
        proc.kill()
        proc.wait()


def test_table_output(lab: Lab) -> None:
    client, n1 = pod(lab, "n1p2"), node(lab, "n1")
    who(client.netns, pod(lab, "n2p1").ip)
    out = subprocess.run(flows_cli(n1, "--last", "50"), capture_output=True, text=True, cwd=str(REPO), check=True,
                         timeout=60).stdout
    assert out.splitlines()[0].startswith("TIME")
    assert any("lab/n1p2:" in line and f"{pod(lab, 'n2p1').ip}:{SERVER_PORT} (pod on n2)" in line
               for line in out.splitlines())


def scrape_lost(n: LabNode) -> float:
    with nsutil.entered(n.netns):
        sock = socket.create_connection((n.underlay_ip, 9655), timeout=5)
    with sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        body = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
    (line,) = [x for x in body.splitlines() if x.startswith("sknf_flow_events_lost_total{")]
    return float(line.rsplit(" ", 1)[1])


def test_lost_events_are_counted_and_doctor_reads_the_flow_map_without_the_agent(lab: Lab) -> None:
    """With the agent stopped nobody drains the ring buffer: a burst of forged frames overflows it, and the
    programs count what they could not queue; the restarted agent exports the count. Meanwhile `sknf
    doctor` reads the learned-flow map's fill level from the pins."""
    attacker, victim, n1 = pod(lab, "n1p2"), pod(lab, "n1p1"), node(lab, "n1")
    lost_pin = load_config(n1.config).bpf_pin_dir / "events_lost"
    before = scrape_lost(n1)
    lab.stop_agent(n1)
    try:
        with bpfmaps.pinned(lost_pin) as fd:
            start = events.lost(fd)
            frame = ether(mac_of(victim), mac_of(attacker), ETH_P_IP, udp4("10.244.1.250", victim.ip, b"x"))
            with raw_socket(attacker.netns) as s:
                for _ in range(6000):  # > the ring buffer's 4,096 records
                    s.send(frame)
            assert events.lost(fd) > start
        doctor = subprocess.run([sys.executable, "-m", "sknf", "doctor", "-c", n1.config, "-o", "json"],
                                preexec_fn=nsutil.preexec_enter(n1.netns), capture_output=True, text=True,
                                cwd=str(REPO), timeout=120)
        findings = {f["check"]: f for f in json.loads(doctor.stdout)["checks"]}
        assert findings["agent"]["status"] == "FAIL"  # the control: it really is down
        assert "flow map " in findings["capacity"]["message"], findings["capacity"]
    finally:
        lab.restart_agent(n1)
    assert scrape_lost(n1) > before
