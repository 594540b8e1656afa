"""A two-node overlay in network namespaces, built in-process with sknf's own overlay code.

Mirrors the design: each node namespace holds brsknf (10.244.N.1/16), vxsknf (VNI 1, UDP 4789,
learning, flood entries to the other node), kube-proxy-free iptables from overlay.ensure_rules, and
pods whose eth0 has 10.244.N.x/16 with a default route via the node's gateway. Host veths are named
sknf... and enslaved to brsknf. The nodes share an underlay veth (198.51.100.1x/24). IPv6 is off in
every namespace so stray neighbour discovery never blurs exact packet counts.

The datapath under test runs in this process: `node.call(fn)` runs fn with the thread inside the
node's namespace (netlink sockets, conntrack and sysctls then belong to that node). For a crash,
`node.datapath_process()` runs it in a child process instead, which the test kills.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import netns as pnetns

from sknf import netlink, nsutil, overlay
from sknf.config import Config
from sknf.datapath import Datapath, Endpoint, NodeNet, PodCounters
from sknf.datapath.bpf import read_pinned_counters
from sknf.overlay import NodeOverlay
from sknf.peers import Node as Peer

CLUSTER = ipaddress.IPv4Network("10.244.0.0/16")
REPO = Path(__file__).resolve().parents[2]
# A node's datapath in a process of its own, wired up as the agent does at start, until it is killed.
DATAPATH_PROCESS = """
import pickle, signal, sys
sys.path.insert(0, sys.argv[1])
from sknf.datapath.bpf import BpfDatapath
cfg, nodenet, endpoints = pickle.load(sys.stdin.buffer)
datapath = BpfDatapath(cfg)
datapath.setup_node(nodenet)
datapath.sync_endpoints(endpoints)
print("ready", flush=True)
signal.pause()
"""


@dataclass
class Pod:
    name: str
    netns: str
    ip: str
    mac: str
    host_ifname: str = ""
    host_ifindex: int = 0

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(ip=self.ip, mac=self.mac, host_ifname=self.host_ifname, host_ifindex=self.host_ifindex,
                        container_id=self.name, ifname="eth0")

    def socket(self, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket living in the pod's namespace (usable from any thread afterwards)."""
        with nsutil.entered(self.netns):
            return socket.socket(socket.AF_INET, kind)

    def eth0_stats(self) -> dict:
        with netlink.route(nsutil.netns_path(self.netns)) as ipr:
            return ipr.get_links(ifname="eth0")[0].get("IFLA_STATS64")


@dataclass
class Node:
    index: int
    netns: str
    cfg: Config
    net: NodeOverlay | None = None
    pods: list[Pod] = field(default_factory=list)
    datapath: Any = None

    @property
    def underlay_ip(self) -> str:
        return f"198.51.100.{10 + self.index}"

    @property
    def nodenet(self) -> NodeNet:
        n = self.net
        return NodeNet(bridge_ifindex=n.bridge_ifindex, vxlan_ifindex=n.vxlan_ifindex, gateway_ip=n.gateway_ip,
                       gateway_mac=n.gateway_mac, cluster_cidrs=(str(CLUSTER),), pod_cidrs=(str(n.pod_cidr),))

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with nsutil.entered(self.netns):
            return fn(*args, **kwargs)

    def start(self, make: Callable[[Config], Datapath]) -> Datapath:
        """Create the datapath in this node and wire it up as the agent does at start."""
        self.datapath = self.call(make, self.cfg)
        self.call(self.datapath.setup_node, self.nodenet)
        self.call(self.datapath.sync_endpoints, [p.endpoint for p in self.pods])
        return self.datapath

    def stop(self) -> None:
        close = getattr(self.datapath, "close", None)
        if close is not None:
            close()
        self.datapath = None

    @contextlib.contextmanager
    def datapath_process(self) -> Iterator[subprocess.Popen]:
        """The BPF datapath run by a real process in the node (as the agent runs it), for a test to SIGKILL
        under traffic; killed by its PID on exit if still alive. Meanwhile counters come from the pins."""
        proc = subprocess.Popen([sys.executable, "-c", DATAPATH_PROCESS, str(REPO)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, preexec_fn=nsutil.preexec_enter(self.netns))
        try:
            with proc.stdin:
                pickle.dump((self.cfg, self.nodenet, [p.endpoint for p in self.pods]), proc.stdin)
            if proc.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"the datapath process of {self.netns} did not start")
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()


class Cluster:
    def __init__(self, tmp: Path, prefix: str = "skb", nodes: int = 2, pods_per_node: int = 2) -> None:
        self.prefix = prefix
        self.tmp = tmp
        self.nodes = [self._node_config(i) for i in range(1, nodes + 1)]
        self.pods_per_node = pods_per_node

    def _node_config(self, i: int) -> Node:
        cfg = Config(node_name=f"n{i}", cluster_cidr=CLUSTER, host_physical_if="eth0",
                     pod_cidr=ipaddress.IPv4Network(f"10.244.{i}.0/24"), peers_file=self.tmp / "peers.yaml",
                     state_dir=self.tmp / f"n{i}", bpf_pin_dir=Path(f"/sys/fs/bpf/{self.prefix}-n{i}"),
                     reconcile_interval=3600.0)
        return Node(index=i, netns=f"{self.prefix}-n{i}", cfg=cfg)

    def pod(self, node: int, j: int) -> Pod:
        return self.nodes[node - 1].pods[j - 1]

    def node_of(self, pod: Pod) -> Node:
        return next(n for n in self.nodes if pod in n.pods)

    # -- build and tear down -------------------------------------------------------------------
    def up(self) -> None:
        for node in self.nodes:
            pnetns.create(node.netns)
            node.call(_quiet_namespace)
        self._underlay()
        peers = [Peer(f"n{n.index}", n.underlay_ip, str(n.cfg.pod_cidr)) for n in self.nodes]
        for node in self.nodes:
            node.net = node.call(overlay.ensure_node, node.cfg, node.cfg.pod_cidr)
            node.call(overlay.sync_peers, node.net, peers, node.cfg.node_name)
            node.call(overlay.ensure_rules, node.cfg, node.net, peers)
            for j in range(1, self.pods_per_node + 1):
                self.add_pod(node, j)

    def _underlay(self) -> None:
        """A chain of veths n1-n2(-n3...), each node's eth0 on 198.51.100.0/24 (a two-node cluster needs one)."""
        first, second = self.nodes[0], self.nodes[1]

        def make() -> None:
            with netlink.route() as ipr:
                fd = os.open(nsutil.netns_path(second.netns), os.O_RDONLY)
                try:
                    ipr.link("add", ifname="eth0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd})
                finally:
                    os.close(fd)
        first.call(make)
        for node in (first, second):
            node.call(_address, "eth0", node.underlay_ip, 24)

    def add_pod(self, node: Node, j: int) -> Pod:
        pod = Pod(name=f"{self.prefix}-n{node.index}p{j}", netns=f"{self.prefix}-n{node.index}p{j}",
                  ip=f"10.244.{node.index}.{10 + j}", mac=f"02:5b:0a:f4:{node.index:02x}:{10 + j:02x}",
                  host_ifname=f"sknf{node.index:03d}{j:08d}")
        pnetns.create(pod.netns)
        with nsutil.entered(pod.netns):
            _quiet_namespace()

        def plug() -> None:
            with netlink.route() as ipr:
                pod.host_ifindex = netlink.create_veth(ipr, pod.host_ifname, "eth0", nsutil.netns_path(pod.netns),
                                                       node.net.mtu, peer_mac=pod.mac)
                netlink.set_port(ipr, pod.host_ifindex, node.net.bridge_ifindex)
        node.call(plug)
        with netlink.route(nsutil.netns_path(pod.netns)) as ipr:
            netlink.configure_pod_interface(ipr, "eth0", [(pod.ip, CLUSTER.prefixlen, node.net.gateway_ip)])
        node.pods.append(pod)
        return pod

    def down(self) -> None:
        """Remove everything, whatever state a failed test left: datapaths, namespaces, pins."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()
        for node in self.nodes:
            for pod in node.pods:
                _remove_netns(pod.netns)
            _remove_netns(node.netns)
            shutil.rmtree(node.cfg.bpf_pin_dir, ignore_errors=True)


def _quiet_namespace() -> None:
    """lo up, forwarding as a node needs, IPv6 off for links created from now on."""
    for key in ("net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"):
        netlink.sysctl(key, 1)
    with netlink.route() as ipr:
        ipr.link("set", index=netlink.link_index(ipr, "lo"), state="up")


def _address(ifname: str, ip: str, prefixlen: int) -> None:
    with netlink.route() as ipr:
        idx = netlink.link_index(ipr, ifname)
        ipr.addr("add", index=idx, address=ip, prefixlen=prefixlen)
        ipr.link("set", index=idx, state="up")


def _remove_netns(name: str) -> None:
    if name in pnetns.listnetns():
        pnetns.remove(name)


# -- what was counted, what the pods saw -------------------------------------------------------

ARP_FRAME = 14 + 28  # Ethernet + ARP
SLACK_FRAMES = 3  # frames a test cannot control: its neighbours' ARP exchange (request, reply, a re-probe)
FRAME_HEADERS = 14 + 20 + 60  # the most header bytes a frame adds to its payload: Ethernet, IPv4, TCP with options


def near(actual: int, expected: int, unit: int = 1) -> bool:
    """Equal but for at most SLACK_FRAMES uncontrolled frames (unit: 1 for packets, ARP_FRAME for bytes)."""
    return abs(actual - expected) <= SLACK_FRAMES * unit


def counters(cluster: Cluster, pod: Pod) -> PodCounters:
    """From the node's datapath, or from its pins when no datapath runs in this process (as `sknf stats`)."""
    node = cluster.node_of(pod)
    if node.datapath is None:
        return node.call(read_pinned_counters, node.cfg.bpf_pin_dir)[pod.host_ifname]
    return node.call(node.datapath.read_counters)[pod.host_ifname]


def host_port_stats(cluster: Cluster, pod: Pod) -> dict:
    """The pod's bridge port (host veth): what the bridge sent out of it is its tx."""
    node = cluster.node_of(pod)

    def read() -> dict:
        with netlink.route() as ipr:
            return ipr.get_links(index=pod.host_ifindex)[0].get("IFLA_STATS64")
    return node.call(read)


class Snapshot:
    """Counters and eth0 statistics of some pods before traffic, to compare deltas after it.

    Reads wait until the pods' links are quiet (a connection's closing frames are still in flight
    when the client returns), so both figures describe the same set of frames.
    """

    def __init__(self, cluster: Cluster, *pods: Pod) -> None:
        self.cluster, self.pods = cluster, pods
        self._quiet()
        self.before = {p.name: (counters(cluster, p), p.eth0_stats()) for p in pods}

    def _quiet(self) -> None:
        last, deadline = None, time.monotonic() + 10
        while time.monotonic() < deadline:
            now = [p.eth0_stats() for p in self.pods]
            if now == last:
                return
            last = now
            time.sleep(0.2)

    def delta(self, pod: Pod) -> tuple[dict, dict]:
        self._quiet()
        (c0, e0), c1, e1 = self.before[pod.name], counters(self.cluster, pod), pod.eth0_stats()
        return ({k: (v - getattr(c0, k) if isinstance(v, int) else v) for k, v in vars(c1).items()},
                {k: e1[k] - e0[k] for k in ("rx_bytes", "rx_packets", "tx_bytes", "tx_packets")})

    def assert_exact(self, payload: dict[str, tuple[int, int]] | None = None) -> None:
        """Each pod's counted rx/tx equals what its eth0 really saw, but for the frames a test cannot control.

        payload: {pod name: (payload bytes it sent, payload bytes it received)}; the counted bytes must then
        lie between the payload and the payload plus the most headers its frames can carry. Required in kernel
        mode, where the counters are the host veth's statistics, i.e. the pod's eth0 figures mirrored.
        """
        for pod in self.pods:
            c, e = self.delta(pod)
            for name in ("rx_bytes", "rx_packets", "tx_bytes", "tx_packets"):
                unit = ARP_FRAME if name.endswith("bytes") else 1
                assert near(c[name], e[name], unit), f"{pod.name} {name}: counted {c[name]}, eth0 saw {e[name]}"
            if c["fast_packets"] is None:
                assert payload is not None and pod.name in payload, f"{pod.name}: kernel mode needs the payload sent"
            if payload is not None and pod.name in payload:
                for way, sent in zip(("tx", "rx"), payload[pod.name], strict=True):
                    counted, frames = c[f"{way}_bytes"], c[f"{way}_packets"]
                    # TCP retransmissions on a busy machine carry payload again: up to 2% of it
                    assert sent <= counted <= sent * 1.02 + FRAME_HEADERS * frames, \
                        f"{pod.name} {way}: counted {counted} bytes in {frames} frames for {sent} payload bytes"


# -- traffic, against sknf/lab/server.py's protocol ------------------------------------------------

SERVER_PORT = 8080
LABSERVER = REPO / "sknf" / "lab" / "server.py"


@contextlib.contextmanager
def servers(targets: dict[str, str]) -> Iterator[None]:
    """labserver (TCP WHO/SINK, UDP echo) on SERVER_PORT in each namespace {name: netns}; killed by PID after."""
    args = [f"{name}={nsutil.netns_path(ns)}" for name, ns in targets.items()]
    proc = subprocess.Popen(["/usr/bin/python3", "-S", str(LABSERVER), str(SERVER_PORT), *args],
                            stdout=subprocess.PIPE)
    try:
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("labserver did not start")
        yield
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def tcp_who(pod: Pod, ip: str, port: int = SERVER_PORT) -> tuple[str, str]:
    """(client address the server saw, server name)."""
    with pod.socket() as s:
        s.settimeout(5)
        s.connect((ip, port))
        s.sendall(b"WHO\n")
        seen, name = s.makefile().readline().split()
    return seen, name


def tcp_bulk(pod: Pod, ip: str, nbytes: int, port: int = SERVER_PORT, pace: float = 0.0) -> int:
    """Send nbytes over one TCP connection (optionally paced, in bytes/s); returns what the server counted."""
    block = b"sknf" * (1 << 14)
    sent = 0
    started = time.monotonic()
    with pod.socket() as s:
        s.settimeout(30)
        s.connect((ip, port))
        s.sendall(f"SINK {nbytes}\n".encode())
        while sent < nbytes:
            chunk = block[: min(len(block), nbytes - sent)]
            s.sendall(chunk)
            sent += len(chunk)
            if pace and (ahead := sent / pace - (time.monotonic() - started)) > 0:
                time.sleep(ahead)
        got, _digest = s.makefile().readline().split()
    return int(got)


def udp_replies(pod: Pod, ip: str, count: int, size: int, port: int = SERVER_PORT, sport: int = 0) -> list:
    """count request/reply rounds of size-byte datagrams; returns the (address, port) each reply came from.

    One datagram in flight at a time, so nothing is lost to socket buffers. The socket is unconnected,
    so replies from any source are seen (a lost reply is simply missing from the list).
    """
    sources = []
    with pod.socket(socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: never fragment
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", sport))
        for _ in range(count):
            s.sendto(b"u" * size, (ip, port))
            try:
                _data, source = s.recvfrom(4096)
            except TimeoutError:
                continue
            sources.append(source)
    return sources


def udp_exchange(pod: Pod, ip: str, count: int, size: int, port: int = SERVER_PORT, sport: int = 0) -> int:
    """How many of count rounds (see udp_replies) got their reply from ip itself: a Service reply that
    skipped the reverse NAT would come from the backend's address."""
    return sum(source == (ip, port) for source in udp_replies(pod, ip, count, size, port, sport))


class Stream:
    """One TCP connection from src to dst that keeps sending until stopped.

    Proves forwarding survives whatever happens meanwhile (an agent restart): the receiver must
    count every byte sent. Its own server lives in dst's namespace, in this process.
    """

    def __init__(self, src: Pod, dst: Pod, port: int = 9000) -> None:
        self.sent = 0
        self.received = 0
        self._stop = threading.Event()
        listener = dst.socket()
        listener.bind((dst.ip, port))
        listener.listen(1)
        self._server = threading.Thread(target=self._receive, args=(listener,), daemon=True)
        self._server.start()
        self._client = src.socket()
        self._client.settimeout(30)
        self._client.connect((dst.ip, port))
        self._sender = threading.Thread(target=self._send, daemon=True)
        self._sender.start()

    def _receive(self, listener: socket.socket) -> None:
        with listener:
            conn, _ = listener.accept()
        with conn:
            while data := conn.recv(1 << 16):
                self.received += len(data)

    def _send(self) -> None:
        block = b"s" * (1 << 16)
        while not self._stop.is_set():
            self._client.sendall(block)
            self.sent += len(block)
            time.sleep(0.002)  # ~30 MB/s: steady, and leaves the CPU to the test

    def wait_sent(self, nbytes: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.sent < nbytes:
            if time.monotonic() > deadline or not self._sender.is_alive():
                raise AssertionError(f"stream stalled at {self.sent} bytes (waiting for {nbytes})")
            time.sleep(0.05)

    def finish(self) -> tuple[int, int]:
        """Stop sending, close, and return (sent, received)."""
        self._stop.set()
        self._sender.join(timeout=30)
        self._client.shutdown(socket.SHUT_WR)
        self._server.join(timeout=30)
        self._client.close()
        return self.sent, self.received


def broken_programs(tmp: Path, unit: str, old: str, new: str) -> Callable[[Config], Datapath]:
    """BpfDatapath over a copy of bpf/ with one check replaced, for a negative control: the production
    programs carry no switch for it, so the test breaks its own copy of their source."""
    from sknf.datapath.bpf import BPF_DIR, BpfDatapath

    broken = tmp / "bpf"
    shutil.copytree(BPF_DIR, broken)
    path = broken / unit
    source = path.read_text()
    assert old in source, f"the check to break is not in {unit} any more"
    path.write_text(source.replace(old, new))
    return lambda cfg: BpfDatapath(cfg, bpf_dir=broken)
