"""Faults and abuse a node survives, with real agents, the real plugin and real kernel objects: an agent
killed in the middle of an ADD, restarted under a running TCP stream, a hundred concurrent ADDs and DELs,
a corrupt lease store, the overlay and iptables chains removed by hand, a node leaving and rejoining the
peers file, the underlay link bouncing. `sknf cleanup` is tests/integration/test_node_cleanup.py.

The recovery cases run on one lab per datapath (kernel, bpf), shared by the module's tests; each test
leaves the lab as it found it (and checks that it works). In BPF mode they also check the datapath's own
state: the endpoints map holds exactly the node's pods, the tc filters are back on recreated links, and
the fast path carries traffic again.

Every assertion reads the kernel (links, FDB, iptables, BPF maps and filters) or the IPAM store, never
the agent's word.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from cnirig import one_node_rig
from leftovers import managed_lab
from pyroute2 import netns as pnetns

from sknf import netlink, nsutil, overlay
from sknf.cni import PENDING_DEL_DIR
from sknf.config import BRIDGE, VXLAN
from sknf.datapath import bpfmaps
from sknf.datapath import tc as tcmod
from sknf.ipam import Store
from sknf.iptables import FORWARD_CHAIN, NAT_CHAIN
from sknf.lab import REPO, SERVER_PORT, UNDERLAY, Lab, LabNode, LabPod, _alive, cni_exec, who
from sknf.pod import host_veth_name

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "skf"
RIG_PREFIX = "skg"  # the concurrency test's own one-node lab, next to the shared one
SETTLE = 15.0  # seconds to wait for a reconcile (the lab's agents reconcile every 2 s)
POD_FILTERS = {"sknf_from_pod", "sknf_to_pod"}
OVERLAY_FILTERS = {"sknf_from_overlay", "sknf_to_overlay"}


# -- fixtures and helpers ----------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["kernel", "bpf"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """One lab per datapath for the whole module (`datapath: bpf` fails rather than falls back)."""
    with managed_lab(PREFIX, nodes=2, pods_per_node=2, datapath=request.param) as built:
        yield built


def bpf_mode(lab: Lab) -> bool:
    return lab.state.datapath == "bpf"


@pytest.fixture
def make_netns(lab: Lab) -> Iterator[Callable[[str], str]]:
    """Pod namespaces a test makes itself (a runtime's job), removed before the lab goes."""
    made: list[str] = []

    def make(name: str) -> str:
        pnetns.create(f"{PREFIX}-{name}")
        made.append(f"{PREFIX}-{name}")
        return nsutil.netns_path(f"{PREFIX}-{name}")

    yield make
    for name in made:
        with contextlib.suppress(OSError):
            pnetns.remove(name)


def wait_for(what: str, predicate: Callable[[], object], timeout: float = SETTLE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.2)


def failures(results, ignore: tuple[str, ...] = ()) -> list[str]:
    return [f"{r.flow}: {r.src} -> {r.dst}: {r.detail}" for r in results if not r.ok and r.flow not in ignore]


def leases(lab: Lab, node: LabNode) -> dict[tuple[str, str], tuple]:
    """(container id, ifname) -> the rest of the lease, as the node's store holds it (creation time aside)."""
    store = Store.open_existing(lab.node_dir(node.name) / "state")
    return {lease.key: (str(lease.ip), lease.host_ifname, lease.mac, lease.namespace, lease.pod)
            for lease in store.leases()}


def host_links(node: LabNode) -> set[str]:
    with netlink.route(nsutil.netns_path(node.netns)) as ipr:
        return set(netlink.host_veths(ipr, "sknf"))


def pods_of(lab: Lab, node: LabNode) -> list[LabPod]:
    return [p for p in lab.state.pods if p.node == node.name]


def sknf_netconf(lab: Lab, node: LabNode, version: str = "1.0.0", **extra: object) -> dict:
    """The conflist's sknf entry as a runtime hands it to the plugin."""
    conflist = lab.conflist(node)
    return {**conflist["plugins"][0], "cniVersion": version, "name": conflist["name"], **extra}


def plugin_argv(lab: Lab) -> list[str]:
    return [str(lab.root / "bin" / "sknf")]


def plugin_env(command: str, container_id: str, netns: str, lab: Lab) -> dict[str, str]:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
            "CNI_ARGS": f"K8S_POD_NAMESPACE=faults;K8S_POD_NAME={container_id[:12]}",
            "CNI_PATH": str(lab.root / "bin"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def gc(lab: Lab, node: LabNode) -> None:
    """The runtime's GC through the plugin: its valid attachments are the lab's pods on that node."""
    valid = [{"containerID": p.container_id, "ifname": "eth0"} for p in pods_of(lab, node)]
    conf = sknf_netconf(lab, node, "1.1.0", **{"cni.dev/valid-attachments": valid})
    code, out = cni_exec(lab.plugin_dir, "GC", conf, container_id="", netns="", ifname="")
    assert code == 0, out


def container_id(name: str) -> str:
    return hashlib.sha256(f"{PREFIX}/{name}".encode()).hexdigest()


def endpoint_ips(lab: Lab, node: LabNode) -> set[str]:
    """Pod IPs in the node's pinned endpoints map (BPF mode)."""
    with bpfmaps.pinned(Path(f"/sys/fs/bpf/{lab.prefix}-{node.name}") / "endpoints") as fd:
        entries = bpfmaps.read_map(fd, ctypes.c_uint32, bpfmaps.EndpointInfo)
    return {socket.inet_ntoa(k.to_bytes(4, sys.byteorder)) for k, _ in entries}


def assert_datapath_holds_only_the_pods(lab: Lab, node: LabNode) -> None:
    if bpf_mode(lab):
        assert endpoint_ips(lab, node) == {p.ip for p in pods_of(lab, node)}


def filters(node: LabNode, ifname: str) -> set[str]:
    with netlink.route(nsutil.netns_path(node.netns)) as ipr:
        idx = netlink.link_index(ipr, ifname)
        return set() if idx is None else {name for _hook, name, _prio in tcmod.sknf_filters(ipr, idx)}


def bpf_wiring(lab: Lab, node: LabNode) -> bool:
    """The overlay programs on vxsknf, the pod programs on every pod's host veth."""
    return filters(node, VXLAN) == OVERLAY_FILTERS and all(
        filters(node, p.host_ifname) == POD_FILTERS for p in pods_of(lab, node))


def fast_packets(node: LabNode) -> int:
    """The node's fast-path packets over all its pods, as `sknf stats` reports them."""
    out = subprocess.run([sys.executable, "-m", "sknf", "stats", "-c", node.config, "-o", "json"], check=True,
                         capture_output=True, text=True, timeout=60, cwd=str(REPO),
                         preexec_fn=nsutil.preexec_enter(node.netns)).stdout
    return sum(p["fast_packets"] for p in json.loads(out)["pods"])


def assert_works(lab: Lab) -> None:
    """Every flow of the lab's matrix works (a round that times out on a busy machine is run again, within
    SETTLE); in BPF mode the fast path carried some of it."""
    before = [fast_packets(n) for n in lab.state.nodes] if bpf_mode(lab) else []
    deadline = time.monotonic() + SETTLE
    while (failed := failures(lab.check(bulk_bytes=1 << 20))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert failed == []
    if bpf_mode(lab):
        assert all(fast_packets(n) > b for n, b in zip(lab.state.nodes, before, strict=True)), before


def serving(lab: Lab, node: LabNode, netns: str) -> None:
    """The node's agent runs and serves CNI: STATUS, then an ADD and a DEL of a new pod in netns."""
    assert _alive(node.agent_pid), lab.agent_log_tail(node)
    status = sknf_netconf(lab, node, "1.1.0")
    code, out = cni_exec(lab.plugin_dir, "STATUS", status, container_id="", netns="", ifname="")
    assert code == 0, out
    cid = container_id(f"serving-{os.path.basename(netns)}")
    code, out = cni_exec(lab.plugin_dir, "ADD", sknf_netconf(lab, node), container_id=cid, netns=netns,
                         args="K8S_POD_NAMESPACE=faults;K8S_POD_NAME=serving")
    assert code == 0, out
    code, out = cni_exec(lab.plugin_dir, "DEL", sknf_netconf(lab, node), container_id=cid, netns=netns)
    assert code == 0, out


def wait_for_reconcile(lab: Lab, node: LabNode) -> None:
    """Park a DEL (of a container nobody knows) where the plugin parks them, and wait until the agent's
    reconcile replays it: proof that a whole round ran since now."""
    pending = lab.node_dir(node.name) / "state" / PENDING_DEL_DIR
    pending.mkdir(mode=0o700, exist_ok=True)
    marker = pending / f"{time.time_ns():020d}-marker.json"
    env = plugin_env("DEL", container_id("reconcile-marker"), "", lab)
    marker.write_text(json.dumps({"op": "cni", "env": env, "config": sknf_netconf(lab, node)}))
    wait_for("a reconcile replays the parked DEL", lambda: not marker.exists())


# -- 1. agent killed in the middle of an ADD ----------------------------------------------------------

def add_killed_midway(lab: Lab, node: LabNode, make_netns: Callable[[str], str]) -> tuple[str, str]:
    """Start an ADD through the plugin and SIGKILL the agent once the host veth exists, before it answers.

    Returns (container id, pod netns) of the ADD that was cut short; the agent is left dead. An ADD that
    completed before the signal landed does not count: it is deleted again and the race rerun.
    """
    for attempt in range(20):
        cid, netns = container_id(f"killed{attempt}"), make_netns(f"k{attempt}")
        host = host_veth_name(cid, "eth0")
        with netlink.route(nsutil.netns_path(node.netns)) as ipr:
            proc = subprocess.Popen(plugin_argv(lab), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    env=plugin_env("ADD", cid, netns, lab))
            proc.stdin.write(json.dumps(sknf_netconf(lab, node)).encode())
            proc.stdin.close()
            deadline = time.monotonic() + 30
            while netlink.link_index(ipr, host) is None and proc.poll() is None and time.monotonic() < deadline:
                pass
            os.kill(node.agent_pid, signal.SIGKILL)
        out = json.loads(proc.stdout.read() or b"null")
        proc.stdout.close()
        if proc.wait() != 0:
            assert out["code"] == 11, out  # "try again later": the agent died under the request
            assert (cid, "eth0") in leases(lab, node) and host in host_links(node)
            return cid, netns
        lab.restart_agent(node)  # too late: the ADD finished; undo it and try again
        code, out = cni_exec(lab.plugin_dir, "DEL", sknf_netconf(lab, node), container_id=cid, netns=netns)
        assert code == 0, out
    raise AssertionError("20 ADDs all finished before the agent could be killed")


@pytest.mark.parametrize("cleanup", ["gc", "del"])
def test_agent_killed_mid_add_leaks_nothing(lab: Lab, make_netns, cleanup: str) -> None:
    node = lab.state.nodes[0]
    real = {(p.container_id, "eth0"): p for p in pods_of(lab, node)}
    cid, netns = add_killed_midway(lab, node, make_netns)
    host = host_veth_name(cid, "eth0")

    if cleanup == "del":  # kubelet tears down the failed sandbox while the agent is still down
        code, out = cni_exec(lab.plugin_dir, "DEL", sknf_netconf(lab, node), container_id=cid, netns=netns)
        assert code == 0, out  # parked for the next agent to replay
    lab.restart_agent(node)
    if cleanup == "gc":
        # The new agent keeps what it cannot judge (the half-made pod holds its lease) until the runtime's GC.
        assert (cid, "eth0") in leases(lab, node) and host in host_links(node)
        gc(lab, node)

    assert set(leases(lab, node)) == set(real)
    assert host_links(node) == {p.host_ifname for p in real.values()}
    with netlink.route(netns) as ipr:
        assert netlink.link_index(ipr, "eth0") is None  # the pod end went with the host end
    assert_datapath_holds_only_the_pods(lab, node)
    assert_works(lab)


def test_a_pod_link_no_lease_accounts_for_is_removed(lab: Lab, make_netns) -> None:
    """What a GC killed between freeing leases and deleting links leaves; the reconcile sweeps it."""
    node = lab.state.nodes[0]
    before = leases(lab, node)
    orphan = host_veth_name(container_id("orphan"), "eth0")
    with netlink.route(nsutil.netns_path(node.netns)) as ipr:
        netlink.create_veth(ipr, orphan, "eth0", make_netns("o"), 1450)

    wait_for("the orphan link is gone", lambda: orphan not in host_links(node))
    assert leases(lab, node) == before
    assert host_links(node) == {p.host_ifname for p in pods_of(lab, node)}
    assert_datapath_holds_only_the_pods(lab, node)


# -- 2. agent restarts under a running TCP stream -----------------------------------------------------

class Stream:
    """A paced TCP stream from one pod to another pod's SINK server; `sent` only runs ahead of what the
    receiver acknowledged by the (small) send buffer, so it stalls when the path breaks."""

    CHUNK = 16 << 10
    RATE = 8 << 20  # bytes per second

    def __init__(self, src: LabPod, dst: LabPod) -> None:
        with nsutil.entered(src.netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 10)
        self.sock.settimeout(30)
        self.sock.connect((dst.ip, SERVER_PORT))
        self.sock.sendall(f"SINK {1 << 40}\n".encode())  # more than we send: the server stops at EOF
        self.sent, self.digest, self.error = 0, hashlib.sha256(), None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._send, daemon=True)
        self.thread.start()

    def _send(self) -> None:
        started, n = time.monotonic(), 0
        try:
            while not self.stop.is_set():
                chunk = hashlib.sha256(n.to_bytes(8, "big")).digest() * (self.CHUNK // 32)
                self.sock.sendall(chunk)
                self.digest.update(chunk)
                self.sent += len(chunk)
                n += 1
                time.sleep(max(0.0, started + self.sent / self.RATE - time.monotonic()))
        except OSError as e:
            self.error = e

    def wait_beyond(self, mark: int, extra: int = 1 << 20) -> None:
        wait_for(f"{extra} more bytes through the stream", lambda: self.sent >= mark + extra or self.error)
        assert self.error is None, self.error

    def finish(self) -> tuple[int, str]:
        """Stop, close our side, and return what the server counted and hashed."""
        self.stop.set()
        self.thread.join(30)
        assert self.error is None, self.error
        self.sock.shutdown(socket.SHUT_WR)
        with self.sock, self.sock.makefile() as reply:
            got, digest = reply.readline().split()
        return int(got), digest


def test_tcp_stream_survives_agent_restarts(lab: Lab) -> None:
    """Real agent processes stopped (SIGTERM) and killed (SIGKILL) under a stream, then started again; in
    BPF mode the programs they left attached keep fast-pathing it, and the new agents' too."""
    n1, n2 = lab.state.nodes
    stream = Stream(pods_of(lab, n1)[0], pods_of(lab, n2)[0])
    try:
        stream.wait_beyond(0)
        for node, sig in ((n1, signal.SIGTERM), (n2, signal.SIGKILL)):  # the sender's node, then the receiver's
            fast = fast_packets(node) if bpf_mode(lab) else 0
            lab.stop_agent(node, sig)
            stream.wait_beyond(stream.sent)  # flows with no agent at all
            if bpf_mode(lab):
                unattended = fast_packets(node)  # `sknf stats` reads the pins with the agent gone
                assert unattended > fast
            lab.restart_agent(node)
            stream.wait_beyond(stream.sent)  # and after the new agent's first reconcile
            if bpf_mode(lab):
                assert fast_packets(node) > unattended
    finally:
        got, digest = stream.finish()

    assert (got, digest) == (stream.sent, stream.digest.hexdigest())


# -- 3. a hundred concurrent ADDs and DELs -------------------------------------------------------------

def test_hundred_concurrent_adds_and_dels(tmp_path: Path) -> None:
    count = 100
    with one_node_rig(RIG_PREFIX) as rig:
        lab_leases = leases(rig.lab, rig.node)
        names = [f"{RIG_PREFIX}-c{i:03d}" for i in range(count)]
        try:
            for name in names:
                pnetns.create(name)
            cids = [container_id(name) for name in names]

            def verb(command: str, i: int):
                env = rig.env(command, cids[i], netns=nsutil.netns_path(names[i]),
                              args=f"K8S_POD_NAMESPACE=conc;K8S_POD_NAME=p{i}")
                return rig.run(rig.netconf("1.0.0"), env)

            with concurrent.futures.ThreadPoolExecutor(count) as pool:
                added = list(pool.map(lambda i: verb("ADD", i), range(count)))
            assert [o for o in added if o.rc != 0] == []
            ips = [json.loads(o.stdout)["ips"][0]["address"].split("/")[0] for o in added]
            assert len(set(ips)) == count
            assert not set(ips) & {v[0] for v in lab_leases.values()}
            for name, ip in zip(names, ips, strict=True):  # each pod holds the address it was told about
                with netlink.route(nsutil.netns_path(name)) as ipr:
                    _mac, addrs, _gw = netlink.pod_interface_state(ipr, "eth0")
                assert addrs == [f"{ip}/16"]
            assert len(leases(rig.lab, rig.node)) == count + len(lab_leases)

            with concurrent.futures.ThreadPoolExecutor(count) as pool:
                deleted = list(pool.map(lambda i: verb("DEL", i), [*range(count), *range(0, count, 10)]))
            assert [o for o in deleted if o.rc != 0] == []
            assert leases(rig.lab, rig.node) == lab_leases
            assert host_links(rig.node) == {v[1] for v in lab_leases.values()}
            for name in names:
                with netlink.route(nsutil.netns_path(name)) as ipr:
                    assert netlink.link_index(ipr, "eth0") is None
        finally:
            for name in names:
                with contextlib.suppress(OSError):
                    pnetns.remove(name)
        assert [n for n in pnetns.listnetns() if n.startswith(f"{RIG_PREFIX}-c")] == []


# -- 4. a damaged lease store is rebuilt from the host -----------------------------------------------------

def rewrite(transform: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(transform(path.read_bytes()))


# What can happen to one pod's lease file (ipam/ips/<address>) or to the whole store.
CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "truncated": rewrite(lambda doc: doc[: len(doc) // 2]),
    "empty": rewrite(lambda doc: b""),
    "garbage": rewrite(lambda doc: b"\x00{]not json" * 7),
    "another address": rewrite(lambda doc: json.dumps({**json.loads(doc), "ip": "10.244.1.250"}).encode()),
    "lease deleted": Path.unlink,
    "store deleted": lambda path: shutil.rmtree(path.parent.parent),
}


@pytest.mark.parametrize("while_running", [False, True], ids=["at start", "while running"])
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_damaged_store_is_rebuilt_from_the_host(lab: Lab, make_netns, corruption: str, while_running: bool) -> None:
    node = lab.state.nodes[0]
    before = leases(lab, node)
    path = lab.node_dir(node.name) / "state" / "ipam" / "ips" / min(ip for ip, *_ in before.values())

    log = lab.node_dir(node.name) / "agent.log"
    logged = log.stat().st_size  # the shared lab's agent may have rebuilt its store before: look past that

    if not while_running:
        lab.stop_agent(node)
    CORRUPTIONS[corruption](path)
    if while_running:
        wait_for("the agent rebuilds the store", lambda: b"rebuilt it from the host" in log.read_bytes()[logged:])
    else:
        lab.restart_agent(node)

    assert leases(lab, node) == before
    assert_datapath_holds_only_the_pods(lab, node)
    cid, netns = container_id("after-rebuild"), make_netns("r")
    code, out = cni_exec(lab.plugin_dir, "ADD", sknf_netconf(lab, node), container_id=cid, netns=netns,
                         args="K8S_POD_NAMESPACE=faults;K8S_POD_NAME=r")
    assert code == 0, out
    try:
        fresh = out["ips"][0]["address"].split("/")[0]
        assert fresh not in {v[0] for v in before.values()}
        assert fresh != node.gateway_ip
        assert leases(lab, node)[(cid, "eth0")][0] == fresh
        assert failures(lab.check(bulk_bytes=1 << 20)) == []
    finally:
        code, out = cni_exec(lab.plugin_dir, "DEL", sknf_netconf(lab, node), container_id=cid, netns=netns)
        assert code == 0, out
    assert leases(lab, node) == before


# -- 5. overlay pieces and iptables chains removed by hand ----------------------------------------------

def kernel_wiring(lab: Lab, node: LabNode) -> bool:
    """Bridge with the gateway address and fixed MAC, every pod port on it, VXLAN on it with the peer list."""
    peers = {n.underlay_ip for n in lab.state.nodes if n is not node}
    with netlink.route(nsutil.netns_path(node.netns)) as ipr:
        br, vx = netlink.link_info(ipr, BRIDGE), netlink.link_info(ipr, VXLAN)
        if br is None or vx is None or vx.get("IFLA_MASTER") != br["index"]:
            return False
        ports = [netlink.link_info(ipr, p.host_ifname) for p in pods_of(lab, node)]
        return (br.get("IFLA_ADDRESS") == overlay.gateway_mac_of(node.gateway_ip)
                and netlink.address_of(ipr, br["index"]) == node.gateway_ip
                and all(p.get("IFLA_MASTER") == br["index"] and p.get("state") == "up" for p in ports)
                and netlink.flood_entries(ipr, vx["index"]) == peers)


def iptables(node: LabNode, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["iptables", "-w", *args], capture_output=True, text=True,
                          preexec_fn=nsutil.preexec_enter(node.netns))


def sknf_rules(node: LabNode) -> list[str]:
    return [iptables(node, "-t", table, "-S", chain).stdout for table, chain in
            (("filter", FORWARD_CHAIN), ("nat", NAT_CHAIN), ("filter", "FORWARD"), ("nat", "POSTROUTING"))]


@pytest.mark.parametrize("victim", ["bridge", "vxlan", "iptables"])
def test_hand_removed_overlay_and_rules_come_back(lab: Lab, victim: str) -> None:
    node = lab.state.nodes[0]
    rules = sknf_rules(node)
    assert kernel_wiring(lab, node)
    assert bpf_wiring(lab, node) if bpf_mode(lab) else filters(node, VXLAN) == set()

    if victim == "iptables":
        for table, chain in (("filter", FORWARD_CHAIN), ("nat", NAT_CHAIN)):
            assert iptables(node, "-t", table, "-F", chain).returncode == 0
        jump = ["FORWARD", "-m", "comment", "--comment", "sknf", "-j", FORWARD_CHAIN]
        assert iptables(node, "-D", *jump).returncode == 0
        assert sknf_rules(node) != rules
        wait_for("sknf's rules are back", lambda: sknf_rules(node) == rules)
    else:
        with netlink.route(nsutil.netns_path(node.netns)) as ipr:
            assert netlink.delete_link(ipr, BRIDGE if victim == "bridge" else VXLAN)
        assert not kernel_wiring(lab, node)
        wait_for(f"{BRIDGE}, {VXLAN} and the pod ports are rebuilt", lambda: kernel_wiring(lab, node))
    if bpf_mode(lab):
        wait_for("the tc programs are back on vxsknf and the pod veths", lambda: bpf_wiring(lab, node))
    assert_works(lab)


# -- 6. a node leaves the peers file and comes back -----------------------------------------------------

def fdb_towards(node: LabNode, remote_ip: str) -> tuple[int, int]:
    """(flood entries, learned MACs) on the node's VXLAN device that point at remote_ip."""
    with netlink.route(nsutil.netns_path(node.netns)) as ipr:
        vx = netlink.link_index(ipr, VXLAN)
        entries = [f for f in ipr.fdb("dump", ifindex=vx) if f["ifindex"] == vx and f.get("NDA_DST") == remote_ip]
    flood = sum(1 for f in entries if f.get("NDA_LLADDR") == netlink.ZERO_MAC)
    return flood, len(entries) - flood


def write_peers(lab: Lab, nodes: list[LabNode]) -> None:
    """Replace the peers file atomically, as a configuration tool would."""
    doc = {"nodes": [{"name": n.name, "underlay_ip": n.underlay_ip, "pod_cidr": n.pod_cidr} for n in nodes]}
    tmp = lab.root / "peers.yaml.new"
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(lab.root / "peers.yaml")


def set_underlay(node: LabNode, up: bool) -> None:
    """The node's eth0 up or down; bringing it up also restores the default route the kernel dropped with it,
    as the node's own network configuration (networkd, NetworkManager) does."""
    with netlink.route(nsutil.netns_path(node.netns)) as ipr:
        ipr.link("set", index=netlink.link_index(ipr, "eth0"), state="up" if up else "down")
        if up:
            ipr.route("replace", dst="0.0.0.0/0", gateway=str(UNDERLAY.network_address + 1))


def test_node_removed_from_and_readded_to_peers(lab: Lab) -> None:
    n1, n2 = lab.state.nodes
    a, b = pods_of(lab, n1)[0], pods_of(lab, n2)[0]
    assert who(b.netns, a.ip) == (b.ip, a.name)  # n1's VXLAN device learns b's MAC behind n2
    flood, learned = fdb_towards(n1, n2.underlay_ip)
    assert flood == 1 and learned >= 1

    # n2 leaves: it goes silent (or whatever it still floods to n1 would be learned again), then the file
    # drops it. Learned entries age out after 300 s, so an empty FDB within seconds is the agent's doing.
    set_underlay(n2, up=False)
    write_peers(lab, [n1])
    wait_for("n1 forgets n2", lambda: fdb_towards(n1, n2.underlay_ip) == (0, 0))

    set_underlay(n2, up=True)
    write_peers(lab, [n1, n2])
    wait_for("n1 floods to n2 again", lambda: fdb_towards(n1, n2.underlay_ip)[0] == 1)
    assert_works(lab)  # the rest of the reconcile (peer routes, rules) follows the flood entry


# -- 7. the underlay link goes down and up -----------------------------------------------------------------

def test_underlay_link_down_and_up(lab: Lab, make_netns) -> None:
    n1, n2 = lab.state.nodes
    a, b = pods_of(lab, n1)[0], pods_of(lab, n2)[0]
    set_underlay(n1, up=False)
    try:
        wait_for_reconcile(lab, n1)  # a whole round runs with the link down
        with pytest.raises(OSError):
            who(a.netns, b.ip)  # cut off from the other node
        serving(lab, n1, make_netns("u1"))  # yet still serving its own pods
    finally:
        set_underlay(n1, up=True)
    wait_for_reconcile(lab, n1)
    serving(lab, n1, make_netns("u2"))
    assert_works(lab)  # every flow again, within SETTLE
