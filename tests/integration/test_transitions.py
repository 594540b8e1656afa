"""Live Service connections survive every datapath transition of a node's agent: kernel -> BPF,
BPF -> kernel, and an upgrade that changes the programs (and the learned-flow map's size).

"Survive" means a TCP stream through a ClusterIP keeps flowing with every byte intact (sha256 of
what the server sent = sha256 of what the client read) and no RST. The server sends, so it is the
reply direction that crosses the node's datapath and must meet the reverse NAT. Besides streams that
carry data throughout, each transition holds "quiet" connections: established, then silent while the
agent restarts, then the server speaks first. Nothing of theirs passes a program after the
transition before the reply does, so only the seeding from conntrack keeps them on the kernel path;
the negative control deletes one quiet connection's seeded entry and shows it then breaks.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from leftovers import managed_lab

from sknf import nsutil
from sknf.datapath import bpfmaps
from sknf.datapath.bpf import _flow_key
from sknf.lab import Lab, LabNode, LabPod

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "skq"
PORT, PORTS = 9100, 8  # our own servers' ports, DNATed from each ClusterIP (the lab's servers own 8080)
BLOCK = 16 << 10


class ServedStream:
    """One connection client -> ClusterIP:port -> backend:port, data from the backend to the client (IPv6 when
    the ClusterIP is).

    The server (a socket in the backend pod's namespace, served from this process) sends pseudo-random
    blocks, paced, while `flowing` is set; a quiet stream sends one block, then waits for it. Both
    ends hash what they sent and read; the server closes when told to finish.
    """

    def __init__(self, client: LabPod, backend: LabPod, vip: str, port: int, quiet: bool = False) -> None:
        self.flowing, self.done = threading.Event(), threading.Event()
        self.quiet = quiet
        if not quiet:
            self.flowing.set()
        self.sent, self.received = hashlib.sha256(), hashlib.sha256()
        self.nsent = self.nreceived = 0
        self.error: OSError | None = None
        self.pod, self.backend, self.vip, self.server_port = client, backend, vip, port
        family, ip = (socket.AF_INET6, backend.ip6) if ":" in vip else (socket.AF_INET, backend.ip)
        with nsutil.entered(backend.netns):
            self._listener = socket.socket(family)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((ip, port))
        self._listener.listen(1)
        self._server = threading.Thread(target=self._serve, daemon=True)
        self._server.start()
        with nsutil.entered(client.netns):
            self.client = socket.socket(family)
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # its port may be shared (_clashing)
        self.client.settimeout(15)
        self.client.connect((vip, port))
        self.client.settimeout(None)  # a quiet stream's reader waits as long as the transition takes
        self.client_port = self.client.getsockname()[1]
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _serve(self) -> None:
        try:
            with self._listener:  # one connection: the port is free for another listener after it
                self._listener.settimeout(15)
                conn, _ = self._listener.accept()
            with conn:
                i = 0
                self._send_block(conn, i)
                while not self.done.is_set():
                    if not self.flowing.wait(0.05):
                        continue
                    i += 1
                    self._send_block(conn, i)
                    time.sleep(0.005)  # ~3 MB/s: steady, leaves the CPU to the agents
        except OSError as e:  # a reset or a timeout: intact() reports it
            self.error = e

    def _send_block(self, conn: socket.socket, i: int) -> None:
        block = hashlib.sha256(i.to_bytes(8, "big")).digest() * (BLOCK // 32)
        conn.sendall(block)
        self.sent.update(block)
        self.nsent += len(block)

    def _read(self) -> None:
        try:
            while data := self.client.recv(1 << 16):
                self.received.update(data)
                self.nreceived += len(data)
        except OSError as e:  # a reset or a timeout
            self.error = e

    def wait_received(self, nbytes: int, timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        while self.nreceived < nbytes and self.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.nreceived >= nbytes

    def finish(self) -> None:
        """Stop sending, close the server side, let the client read up to EOF (a broken one is cut off)."""
        self.done.set()
        self._server.join(timeout=20)
        self._reader.join(timeout=10)
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_RDWR)
        self._reader.join(timeout=10)
        self.client.close()

    def __repr__(self) -> str:
        return (f"<{'quiet' if self.quiet else 'flowing'} {self.vip}:{self.server_port} from port {self.client_port}: "
                f"sent {self.nsent}, received {self.nreceived}, error {self.error!r}>")

    def intact(self) -> bool:
        return (self.error is None and self.nsent > BLOCK and
                (self.nreceived, self.received.hexdigest()) == (self.nsent, self.sent.hexdigest()))


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with managed_lab(PREFIX, nodes=2, pods_per_node=2, datapath="kernel") as built:
        for svc in pod_services(built):  # kube-proxy-like DNAT of our ports (the node's namespace goes with the lab)
            subprocess.run(["iptables", "-w", "-t", "nat", "-I", "PREROUTING", "-d", f"{svc.cluster_ip}/32", "-p",
                            "tcp", "--dport", f"{PORT}:{PORT + PORTS - 1}", "-j", "DNAT", "--to-destination",
                            svc.endpoints[0][0]],
                           check=True, capture_output=True, preexec_fn=nsutil.preexec_enter(built.state.nodes[0].netns))
        yield built


def pod_services(lab: Lab) -> list:
    """The lab's ClusterIPs backed by a pod (one per node: n1p1, n2p1), TCP entries only."""
    return [s for s in lab.services() if s.name.startswith("pod-") and s.proto == "tcp"]


def _set(lab: Lab, node: LabNode, **settings: object) -> None:
    """Change the node's agent settings and restart it (as a rollout of a new ConfigMap would)."""
    path = Path(node.config)
    doc = yaml.safe_load(path.read_text())
    doc.update(settings)
    path.write_text(yaml.safe_dump(doc))
    lab.restart_agent(node)


def _mode(lab: Lab, node: LabNode) -> str:
    for line in reversed(lab.agent_log_tail(node, 400).splitlines()):
        if "sknf agent on" in line:
            return line.split(", datapath ", 1)[1].split()[0]
    return ""


@contextlib.contextmanager
def _streams(lab: Lab, quiet: int = 2) -> Iterator[tuple[list[ServedStream], list[ServedStream]]]:
    """From pod n1p2: a flowing stream and `quiet` quiet ones through the same-node ClusterIP and the
    cross-node one, in that order."""
    pods = {p.name: p for p in lab.state.pods}
    client = pods["n1p2"]
    flowing: list[ServedStream] = []
    silent: list[ServedStream] = []
    try:
        for svc in pod_services(lab):  # service 0 -> n1p1 (same node), service 1 -> n2p1 (across nodes)
            backend = next(p for p in pods.values() if p.ip == svc.endpoints[0][0])
            for k, quiet_stream in enumerate([False] + [True] * quiet):
                s = ServedStream(client, backend, svc.cluster_ip, PORT + k, quiet_stream)
                (silent if quiet_stream else flowing).append(s)
        for s in flowing + silent:
            assert s.wait_received(BLOCK), f"stream to {s.vip} never started"
        yield flowing, silent
    finally:
        for s in flowing + silent:
            s.finish()


def _reply(s: ServedStream) -> tuple:
    """The stream's reply tuple (backend -> client), as the programs learn it."""
    return s.backend.ip, s.pod.ip, s.server_port, s.client_port, socket.IPPROTO_TCP


def _kernel_flows(node: LabNode) -> Path:
    return Path(f"/sys/fs/bpf/{PREFIX}-{node.name}") / "kernel_flows"


def _learned(node: LabNode, tuple_: tuple) -> bool:
    """Is the tuple in the node's learned-flow map?"""
    with bpfmaps.pinned(_kernel_flows(node)) as fd:
        return bpfmaps.lookup(fd, _flow_key(tuple_), bpfmaps.FlowState) is not None


def _forget(node: LabNode, s: ServedStream) -> None:
    with bpfmaps.pinned(_kernel_flows(node)) as fd:
        assert bpfmaps.delete(fd, _flow_key(_reply(s)))


@contextlib.contextmanager
def _clashing(s: ServedStream) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(server end, client end) of a connection from the stream's client port straight to its backend's
    port: after the DNAT the stream has the same tuple, so conntrack moves this one to another port."""
    with nsutil.entered(s.backend.netns):
        listener = socket.socket()
    with nsutil.entered(s.pod.netns):
        sock = socket.socket()
    with listener, sock:
        for end in (listener, sock):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            end.settimeout(15)
        listener.bind((s.backend.ip, s.server_port))
        listener.listen(1)
        sock.bind((s.pod.ip, s.client_port))
        sock.connect((s.backend.ip, s.server_port))
        conn, _ = listener.accept()
        with conn:
            yield conn, sock


def _after_transition(flowing: list[ServedStream], silent: list[ServedStream]) -> None:
    """More data on every stream after the transition, then every byte intact."""
    for s in silent:
        s.flowing.set()
    for s in flowing + silent:
        assert s.wait_received(s.nsent + 8 * BLOCK), f"stream {s} stalled after the transition"


def test_kernel_to_bpf_keeps_live_service_flows(lab: Lab) -> None:
    n1 = lab.state.nodes[0]
    assert _mode(lab, n1) == "kernel"
    with _streams(lab, quiet=2) as (flowing, silent), _clashing(silent[0]) as (server, client):
        _set(lab, n1, datapath="bpf")
        assert _mode(lab, n1) == "bpf"
        assert all(_learned(n1, _reply(s)) for s in silent)  # silent since the restart: seeded from conntrack
        # the clashing connection's own tuple is seeded too: it stays where conntrack moves its port
        (src, sport), (dst, dport) = client.getsockname(), client.getpeername()
        assert _learned(n1, (src, dst, sport, dport, socket.IPPROTO_TCP))
        server.sendall(b"after")
        assert client.recv(5) == b"after"
        # Negative control: one quiet same-node and one cross-node connection lose their seeded entry.
        broken = [silent[1], silent[3]]
        for s in broken:
            _forget(n1, s)
        kept = [s for s in silent if s not in broken]
        for s in broken:
            s.flowing.set()
        for s in broken:
            assert not s.wait_received(s.nsent + 8 * BLOCK, timeout=4), "an unseeded quiet flow survived"
        _after_transition(flowing, kept)
    assert all(s.intact() for s in flowing + kept), [(s.vip, s.error) for s in flowing + kept if not s.intact()]
    assert not any(s.intact() for s in broken)


def test_bpf_to_kernel_keeps_live_service_flows(lab: Lab) -> None:
    n1 = lab.state.nodes[0]
    if _mode(lab, n1) != "bpf":
        _set(lab, n1, datapath="bpf")
    with _streams(lab, quiet=1) as (flowing, silent):
        _set(lab, n1, datapath="kernel")
        assert _mode(lab, n1) == "kernel"
        assert not Path(f"/sys/fs/bpf/{PREFIX}-n1").exists()
        _after_transition(flowing, silent)
    assert all(s.intact() for s in flowing + silent), [(s.vip, s.error) for s in flowing + silent]


def test_an_upgrade_that_changes_the_programs_keeps_live_service_flows(lab: Lab) -> None:
    """New programs (a new learned-flow map size is a new compile flag, hence a new build) replace the
    attached ones, and the map is recreated at its new size, while connections carry data."""
    n1 = lab.state.nodes[0]
    if _mode(lab, n1) != "bpf":
        _set(lab, n1, datapath="bpf")
    pins = Path(f"/sys/fs/bpf/{PREFIX}-n1")
    before = {m.name for m in pins.glob("src-*")}
    with _streams(lab, quiet=1) as (flowing, silent):
        _set(lab, n1, flow_map_capacity=4096)
        assert _mode(lab, n1) == "bpf"
        assert {m.name for m in pins.glob("src-*")}.isdisjoint(before)  # rebuilt
        with bpfmaps.pinned(pins / "kernel_flows") as fd:
            assert bpfmaps.map_info(fd).max_entries == 4096
        assert all(_learned(n1, _reply(s)) for s in silent)  # copied from the old map (and seeded)
        _after_transition(flowing, silent)
    assert all(s.intact() for s in flowing + silent), [(s.vip, s.error) for s in flowing + silent]
