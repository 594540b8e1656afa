"""A simulated cluster on one machine, entirely inside network namespaces: `sknf lab up|check|down`.

Topology (every address lives in a namespace the lab made):

    <p>-inet  203.0.113.10 ("the Internet": a TEST-NET host with no route to pods)
       |
    <p>-ul    198.51.100.1 / 203.0.113.1: the underlay switch and the nodes' default router
       |
    <p>-n1 .. <p>-nN   node i: eth0 198.51.100.(10+i), its own `sknf agent` process, kube-proxy-style
       |               ClusterIP rules; pods <p>-n<i>p<j> set up by calling the real CNI plugin chain
    pods               exactly as a container runtime does.

Dual-stack (`--dual-stack`): pods also get IPv6 from fd00:10:244::/56 (a /64 per node), VXLAN stays
on the IPv4 underlay, nodes also hold 2001:db8:100::(10+i) on it, and the Internet host also
2001:db8:203::10 (IPv6 documentation addresses, held by lab namespaces only), and each node's ClusterIP
an IPv6 twin (fd00:10:96::a + k); `check` runs the pod<->pod, node->pod, pod->Internet and
pod->ClusterIP rows for IPv6 too.

IPv6-only (`--ipv6-only`): nothing in the lab has IPv4. Nodes hold only 2001:db8:100::(10+i) on the
underlay and VXLAN runs over it (MTU 1500 - 70), pods get only IPv6 from fd00:10:244::/56, the Internet
host is 2001:db8:203::10, and the Services' ClusterIPs are IPv6 (fd00:10:96::/112); `check` runs the
whole matrix, every row of it, over IPv6.

`check` proves the seed design's flows with real TCP/UDP and asserts who the far end saw as the
source: pod<->pod on a node and across nodes, node<->pod, pod->Internet (SNATed to the node),
pod->ClusterIP on the same and on another node, a bulk transfer and a full-MTU datagram over VXLAN.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from pyroute2 import netns as pnetns

from sknf import netlink, nsutil
from sknf.config import VXLAN_OVERHEAD, host_port
from sknf.lab import kubeproxy, manifests
from sknf.lab.kubeproxy import Service
from sknf.lab.runtime import LabError, bandwidth, cni_exec, run_chain, with_runtime_config

UNDERLAY = ipaddress.IPv4Network("198.51.100.0/24")
INTERNET_HOST = "203.0.113.10"
INTERNET_GW = "203.0.113.1"
CLUSTER_CIDR = "10.244.0.0/16"
# Dual-stack: the cluster's IPv6 network, the underlay's IPv6 (for the nodes' egress only: VXLAN stays
# on IPv4) and the Internet host's, all of it in lab namespaces.
CLUSTER_CIDR6 = "fd00:10:244::/56"
UNDERLAY6 = ipaddress.IPv6Network("2001:db8:100::/64")
INTERNET6 = ipaddress.IPv6Network("2001:db8:203::/64")
INTERNET_HOST6 = "2001:db8:203::10"
INTERNET_GW6 = "2001:db8:203::1"
SERVICE_BASE = ipaddress.IPv4Address("10.96.0.10")  # one ClusterIP per node, backed by its first pod
SERVICE_BASE6 = ipaddress.IPv6Address("fd00:10:96::a")  # dual-stack: the same Services' IPv6 ClusterIPs
KUBERNETES_IP = "10.96.0.1"  # the `kubernetes` Service: the API server on node 1's own address (hostNetwork)
HOSTNET_IP = "10.96.0.2"  # a Service backed by a hostNetwork pod on the last node
MANAGED_IP = "10.96.0.4"  # a managed control plane: the API server on an address outside the cluster
CLOSED_IP = "10.96.0.3"  # a UDP Service whose backend (node 1's first pod) has no listener on its port
# IPv6-only: the same ClusterIPs in fd00:10:96::/112 (kubernetes ::1, hostnet ::2, closed ::3, managed ::4)
SERVICE_NET6 = ipaddress.IPv6Network("fd00:10:96::/112")
SERVER_PORT = 8080
CLOSED_PORT = 9  # nothing listens here
SVC_TCP_PORT, SVC_UDP_PORT, KUBERNETES_PORT = 80, 53, 443
NODEPORT, NODEPORT_LOCAL = 30080, 30081  # Cluster policy -> node 1's first pod; Local -> each node's first pod
# The bandwidth-annotated pod: its rate each way (bit/s), and a burst small enough (bits) that a short
# transfer shows the rate (runtimes send 2**32 - 1, seconds' worth: tests/integration/test_bandwidth.py)
SHAPED_RATE, SHAPED_BURST, SHAPED_BYTES = 50_000_000, 1_000_000, 4 << 20
METRICS_PORT = 9655
LAB_MTU = 1500  # every link of the underlay
CONFLIST = "10-sknf.conflist"
REFERENCE_PLUGINS = "/usr/lib/cni"
ROOT = Path("/run/sknf-lab")
REPO = Path(__file__).resolve().parents[2]


@dataclass
class LabPod:
    name: str
    node: str
    netns: str
    container_id: str
    ip: str = ""
    host_ifname: str = ""
    ip6: str = ""  # dual-stack


@dataclass
class LabNode:
    name: str
    netns: str
    underlay_ip: str
    pod_cidr: str
    gateway_ip: str
    config: str
    agent_pid: int = 0
    underlay_ip6: str = ""  # dual-stack: the node's IPv6 egress address, and its pods' IPv6 gateway
    gateway_ip6: str = ""


@dataclass
class LabState:
    prefix: str
    datapath: str
    nodes: list[LabNode] = field(default_factory=list)
    pods: list[LabPod] = field(default_factory=list)
    shaped: list[LabPod] = field(default_factory=list)  # bandwidth-annotated pods, beside the matrix's
    extra_services: int = 0  # ClusterIPs beyond the lab's own, for a realistic rule count
    kube_proxy: str = "iptables"
    server_pid: int = 0
    agent_image: str = ""  # run each agent from this image (podman) instead of the checkout
    dual_stack: bool = False
    ipv6_only: bool = False  # every address IPv6, the underlay too


# -- the underlay ---------------------------------------------------------------------------------

UNDERLAY_TABLE = "lab-underlay"


def underlay_source_check() -> dict:
    """The underlay switch drops frames carrying pod addresses (of either family), as a cloud network's
    source/destination check does: pods exist only inside the overlay. Counted, so the check can say it
    never happened."""
    where = {"family": "bridge", "table": UNDERLAY_TABLE, "chain": "forward"}
    rules = []
    for proto, cidr in (("ip", CLUSTER_CIDR), ("ip6", CLUSTER_CIDR6)):
        net = ipaddress.ip_network(cidr)
        pods = {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}
        rules += [{"add": {"rule": {**where, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": field}}, "right": pods}},
            {"counter": None}, {"drop": None}]}}} for field in ("saddr", "daddr")]
    return {"nftables": [
        {"add": {"table": {"family": "bridge", "name": UNDERLAY_TABLE}}},
        {"add": {"chain": {"family": "bridge", "table": UNDERLAY_TABLE, "name": "forward", "type": "filter",
                           "hook": "forward", "prio": 0, "policy": "accept"}}},
        *rules,
    ]}


def underlay_pod_frames(lab: Lab) -> int:
    """Frames with a pod address the underlay switch has dropped so far."""
    out = kubeproxy.run_nft(lab.ul, {"nftables": [{"list": {"table": {"family": "bridge", "name": UNDERLAY_TABLE}}}]})
    return sum(e["counter"]["packets"] for item in out for rule in [item.get("rule")] if rule
               for e in rule["expr"] if "counter" in e)


# -- the lab itself ----------------------------------------------------------------------------

class Lab:
    """Build, check and tear down the simulated cluster; usable as a context manager in tests."""

    def __init__(self, prefix: str = "sknf-lab", nodes: int = 2, pods_per_node: int = 2, datapath: str = "auto",
                 extra_services: int = 0, kube_proxy: str = "iptables", agent_image: str = "",
                 node_setup: Sequence[Sequence[str]] = (), shaped_pod: bool = False, dual_stack: bool = False,
                 ipv6_only: bool = False) -> None:
        """node_setup: commands run in every node's namespace before its agent starts (a host's own
        firewall, say); agent_image: an sknf image whose agent (and plugin) the nodes run, via podman;
        shaped_pod: also a bandwidth-annotated pod on node 1, with its rows in the matrix; dual_stack: pods
        get IPv6 too; ipv6_only: everything is IPv6, the underlay included (see the module docstring)."""
        if not 1 <= nodes <= 50 or not 1 <= pods_per_node <= 60:
            raise LabError("nodes must be 1-50 and pods per node 1-60")
        if dual_stack and ipv6_only:
            raise LabError("a lab is dual-stack or IPv6-only, not both")
        self.prefix = prefix
        if kube_proxy not in kubeproxy.MODES:
            raise LabError(f"kube-proxy mode must be one of {', '.join(kubeproxy.MODES)}")
        self.n_nodes, self.n_pods, self.shaped_pod = nodes, pods_per_node, shaped_pod
        self.root = ROOT / prefix
        self.state = LabState(prefix=prefix, datapath=datapath, extra_services=extra_services, kube_proxy=kube_proxy,
                              agent_image=agent_image, dual_stack=dual_stack, ipv6_only=ipv6_only)
        self.node_setup = [list(argv) for argv in node_setup]

    # the lab's family and the addresses that depend on it
    @property
    def family(self) -> int:
        """The family of the underlay and of every pod's first address: 6 in an IPv6-only lab, else 4."""
        return 6 if self.state.ipv6_only else 4

    @property
    def internet_host(self) -> str:
        return INTERNET_HOST6 if self.state.ipv6_only else INTERNET_HOST

    def cluster_ip(self, ipv4: str) -> str:
        """A Service's ClusterIP in the lab's family: an IPv4 one, or its twin in SERVICE_NET6 (same last bytes)."""
        if not self.state.ipv6_only:
            return ipv4
        return str(SERVICE_NET6.network_address + (int(ipaddress.IPv4Address(ipv4)) & 0xFFFF))

    # paths and names
    @property
    def ul(self) -> str:
        return f"{self.prefix}-ul"

    @property
    def inet(self) -> str:
        return f"{self.prefix}-inet"

    @property
    def plugin_dir(self) -> str:
        return f"{self.root / 'bin'}:{REFERENCE_PLUGINS}"

    @property
    def manifest_dir(self) -> Path:
        """The NetworkPolicy inputs every agent watches (sknf.lab.manifests)."""
        return self.root / "manifests"

    def node_dir(self, node: str) -> Path:
        return self.root / node

    def conflist(self, node: LabNode) -> dict:
        """The conflist the node's agent installed, read from disk as a runtime reads it."""
        return json.loads((self.node_dir(node.name) / "net.d" / CONFLIST).read_text())

    def agent_log_tail(self, node: LabNode, lines: int = 30) -> str:
        try:
            text = (self.node_dir(node.name) / "agent.log").read_text(errors="replace")
        except OSError:
            return "(no agent log)"
        return "\n".join(text.splitlines()[-lines:])

    def save(self) -> None:
        (self.root / "state.json").write_text(json.dumps(asdict(self.state), indent=1))

    @classmethod
    def load(cls, prefix: str) -> Lab:
        path = ROOT / prefix / "state.json"
        if not path.exists():
            raise LabError(f"no lab {prefix!r} is up (no {path})")
        raw = json.loads(path.read_text())
        lab = cls(prefix=prefix, datapath=raw["datapath"])
        lab.state = LabState(prefix=prefix, datapath=raw["datapath"], extra_services=raw["extra_services"],
                             kube_proxy=raw["kube_proxy"], server_pid=raw["server_pid"],
                             agent_image=raw.get("agent_image", ""), dual_stack=raw.get("dual_stack", False),
                             ipv6_only=raw.get("ipv6_only", False),
                             nodes=[LabNode(**n) for n in raw["nodes"]], pods=[LabPod(**p) for p in raw["pods"]],
                             shaped=[LabPod(**p) for p in raw["shaped"]])
        return lab

    def __enter__(self) -> Lab:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # building
    def up(self) -> None:
        if (self.root / "state.json").exists():
            raise LabError(f"lab {self.prefix!r} is already up; run `sknf lab down --prefix {self.prefix}` first")
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest_dir.mkdir(exist_ok=True)
        self.save()
        self._underlay()
        for i in range(1, self.n_nodes + 1):
            self._node(i)
        self._write_peers()
        for node in self.state.nodes:
            for argv in self.node_setup:
                subprocess.run(argv, preexec_fn=nsutil.preexec_enter(node.netns), check=True, capture_output=True,
                               timeout=60)
            self._start_agent(node)
        for node in self.state.nodes:
            self._wait_ready(node)
        for node in self.state.nodes:
            for j in range(1, self.n_pods + 1):
                self._pod(node, f"{node.name}p{j}", self.state.pods)
        if self.shaped_pod:  # kubernetes.io/{in,e}gress-bandwidth annotations, as a runtime passes them on
            self._pod(self.state.nodes[0], f"{self.state.nodes[0].name}shaped", self.state.shaped,
                      {"bandwidth": bandwidth(SHAPED_RATE, SHAPED_RATE, SHAPED_BURST)})
        self.use_kube_proxy(self.state.kube_proxy)
        self._start_servers()
        self.save()

    def _underlay(self) -> None:
        for ns in (self.ul, self.inet):
            pnetns.create(ns)
        v4 = not self.state.ipv6_only
        v6 = self.state.dual_stack or self.state.ipv6_only
        with netlink.route(nsutil.netns_path(self.ul)) as ul:
            ul.link("add", ifname="ul0", kind="bridge")
            br = netlink.link_index(ul, "ul0")
            if v4:
                ul.addr("add", index=br, address=str(UNDERLAY.network_address + 1), prefixlen=UNDERLAY.prefixlen)
            ul.link("set", index=br, state="up")
            netlink.create_veth(ul, "inet0", "eth0", nsutil.netns_path(self.inet), LAB_MTU)
            idx = netlink.link_index(ul, "inet0")
            if v4:
                ul.addr("add", index=idx, address=INTERNET_GW, prefixlen=24)
            ul.link("set", index=idx, state="up")
            if v6:
                _add6(ul, br, str(UNDERLAY6.network_address + 1), UNDERLAY6.prefixlen)
                _add6(ul, idx, INTERNET_GW6, INTERNET6.prefixlen)
        with nsutil.entered(self.ul):
            netlink.sysctl("net.ipv4.ip_forward", 1)
            if v6:
                netlink.sysctl("net.ipv6.conf.all.forwarding", 1)
        kubeproxy.run_nft(self.ul, underlay_source_check())
        with netlink.route(nsutil.netns_path(self.inet)) as inet:
            idx = netlink.link_index(inet, "eth0")
            if v4:
                inet.addr("add", index=idx, address=INTERNET_HOST, prefixlen=24)
            inet.link("set", index=idx, state="up")
            inet.link("set", index=netlink.link_index(inet, "lo"), state="up")
            if v4:
                inet.route("add", dst="0.0.0.0/0", gateway=INTERNET_GW)
            if v6:
                _add6(inet, idx, INTERNET_HOST6, INTERNET6.prefixlen)
                inet.route("add", dst="::/0", gateway=INTERNET_GW6, family=socket.AF_INET6)

    def _node(self, i: int) -> None:
        name = f"n{i}"
        ns = f"{self.prefix}-{name}"
        pnetns.create(ns)
        only6 = self.state.ipv6_only
        underlay_ip = str((UNDERLAY6 if only6 else UNDERLAY).network_address + 10 + i)
        with netlink.route(nsutil.netns_path(self.ul)) as ul:
            netlink.create_veth(ul, f"{self.prefix[:8]}-{name}"[:15], "eth0", nsutil.netns_path(ns), LAB_MTU)
            netlink.set_port(ul, netlink.link_index(ul, f"{self.prefix[:8]}-{name}"[:15]),
                             netlink.link_index(ul, "ul0"))
        with netlink.route(nsutil.netns_path(ns)) as n:
            idx = netlink.link_index(n, "eth0")
            if not only6:
                n.addr("add", index=idx, address=underlay_ip, prefixlen=UNDERLAY.prefixlen)
            n.link("set", index=idx, state="up")
            n.link("set", index=netlink.link_index(n, "lo"), state="up")
            if not only6:
                n.route("add", dst="0.0.0.0/0", gateway=str(UNDERLAY.network_address + 1))
            if self.state.dual_stack or only6:
                _add6(n, idx, str(UNDERLAY6.network_address + 10 + i), UNDERLAY6.prefixlen)
                n.route("add", dst="::/0", gateway=str(UNDERLAY6.network_address + 1), family=socket.AF_INET6)
        pod_cidr = f"10.244.{i}.0/24"
        pod_cidr6 = f"fd00:10:244:{i:x}::/64"
        cluster = {(False, False): CLUSTER_CIDR, (True, False): f"{CLUSTER_CIDR},{CLUSTER_CIDR6}",
                   (False, True): CLUSTER_CIDR6}[(self.state.dual_stack, only6)]
        d = self.node_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        settings = {
            "node_name": name, "host_physical_if": "eth0",
            "cluster_cidr": cluster,
            "peer_source": "static", "peers_file": str(self.root / "peers.yaml"),
            "state_dir": str(d / "state"), "run_dir": str(d / "run"),
            "bpf_pin_dir": f"/sys/fs/bpf/{self.prefix}-{name}", "datapath": self.state.datapath,
            "metrics_bind": host_port(underlay_ip, METRICS_PORT),
            "reconcile_interval": 2,
            "install_cni": True, "cni_bin_dir": str(self.root / "bin"), "cni_conf_dir": str(d / "net.d"),
            "cni_conf_name": CONFLIST, "policy_dir": str(self.manifest_dir),
        }
        (d / "config.yaml").write_text(yaml.safe_dump(settings))
        dual = self.state.dual_stack
        first = pod_cidr6 if only6 else pod_cidr
        self.state.nodes.append(LabNode(name=name, netns=ns, underlay_ip=underlay_ip,
                                        pod_cidr=f"{pod_cidr},{pod_cidr6}" if dual else first,
                                        gateway_ip=str(ipaddress.ip_network(first).network_address + 1),
                                        config=str(d / "config.yaml"),
                                        underlay_ip6=str(UNDERLAY6.network_address + 10 + i) if dual else "",
                                        gateway_ip6=str(ipaddress.IPv6Network(pod_cidr6).network_address + 1)
                                        if dual else ""))
        self.save()

    def _write_peers(self) -> None:
        doc = {"nodes": [{"name": n.name, "underlay_ip": n.underlay_ip, "pod_cidr": n.pod_cidr,
                          "mtu": LAB_MTU - VXLAN_OVERHEAD[self.family]} for n in self.state.nodes]}
        tmp = self.root / "peers.yaml.tmp"
        tmp.write_text(yaml.safe_dump(doc))
        tmp.replace(self.root / "peers.yaml")

    def _agent_container(self, node: LabNode) -> str:
        return f"{self.prefix}-{node.name}-agent"

    def _agent_argv(self, node: LabNode) -> list[str]:
        """The checkout's agent; or the image's, run in the foreground by podman (which forwards SIGTERM),
        so the lab stops either by its PID. The pin directory is the lab's own and fresh: BCC compiles
        inside the image, against the host's headers (mounted under /host, linked by the entrypoint)."""
        if not self.state.agent_image:
            return [sys.executable, "-m", "sknf", "agent", "-c", node.config]
        volumes = ["/sys/fs/bpf:/sys/fs/bpf", "/lib/modules:/host/lib/modules:ro", "/usr/src:/host/usr/src:ro",
                   "/run/netns:/run/netns:rslave", f"{self.root}:{self.root}"]
        return ["podman", "run", "--rm", "--name", self._agent_container(node), "--runtime", "runc",
                "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--privileged",
                "--network", f"ns:{nsutil.netns_path(node.netns)}", *(f"--volume={v}" for v in volumes),
                self.state.agent_image, "agent", "--config", node.config]

    def _remove_agent_container(self, node: LabNode) -> None:
        if self.state.agent_image:
            subprocess.run(["podman", "rm", "-f", "-t", "0", self._agent_container(node)], capture_output=True,
                           timeout=120, check=False)

    def _start_agent(self, node: LabNode) -> None:
        log = open(self.node_dir(node.name) / "agent.log", "ab")  # noqa: SIM115 - handed to the child
        enter = None if self.state.agent_image else nsutil.preexec_enter(node.netns)  # podman joins it itself
        proc = subprocess.Popen(self._agent_argv(node), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=enter, start_new_session=True, cwd=str(REPO))
        log.close()
        node.agent_pid = proc.pid
        self.save()

    def stop_agent(self, node: LabNode, sig: int = signal.SIGTERM) -> None:
        """Stop the node's agent by its PID: SIGTERM as kubelet does, SIGKILL for a crash (both are reaped)."""
        _stop(node.agent_pid, sig)
        self._remove_agent_container(node)

    def restart_agent(self, node: LabNode, sig: int = signal.SIGTERM) -> None:
        """Stop the node's agent (if it still runs) and start a new one as `up` does; wait until it serves."""
        self.stop_agent(node, sig)
        self._start_agent(node)
        self._wait_ready(node)

    def _wait_ready(self, node: LabNode, timeout: float = 60) -> None:
        """Ready as kubelet sees it: the agent installed its conflist, and the plugin's STATUS succeeds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(node.agent_pid):
                raise LabError(f"agent on {node.name} exited:\n{self.agent_log_tail(node)}")
            if not (self.node_dir(node.name) / "net.d" / CONFLIST).exists():
                time.sleep(0.2)
                continue
            conflist = self.conflist(node)
            code, _ = cni_exec(self.plugin_dir, "STATUS", {**conflist["plugins"][0], "cniVersion": "1.1.0",
                                                           "name": conflist["name"]},
                               container_id="", netns="", ifname="")
            if code == 0:
                return
            time.sleep(0.2)
        raise LabError(f"agent on {node.name} not ready after {timeout:.0f}s:\n{self.agent_log_tail(node)}")

    def _pod(self, node: LabNode, name: str, into: list[LabPod], runtime_config: dict | None = None) -> None:
        ns = f"{self.prefix}-{name}"
        pnetns.create(ns)
        pod = LabPod(name=name, node=node.name, netns=ns,
                     container_id=hashlib.sha256(f"{self.prefix}/{name}".encode()).hexdigest())
        into.append(pod)
        self.save()
        conflist = with_runtime_config(self.conflist(node), runtime_config or {})
        result = run_chain(self.plugin_dir, "ADD", conflist, container_id=pod.container_id,
                           netns=nsutil.netns_path(ns),
                           args=f"K8S_POD_NAMESPACE={manifests.LAB_NAMESPACE};K8S_POD_NAME={name}")
        pod.ip = result["ips"][0]["address"].split("/")[0]
        pod.ip6 = next((ip["address"].split("/")[0] for ip in result["ips"] if ":" in ip["address"]),
                       "") if self.state.dual_stack else ""
        pod.host_ifname = result["interfaces"][0]["name"]
        self.save()
        manifests.write(self.manifest_dir, f"pod-{name}",
                        [manifests.pod(name, node.name, pod.ip, SERVER_PORT, pod.ip6)])

    def services(self, extra: bool = False) -> list[Service]:
        """What a real cluster has: a ClusterIP per node backed by its first pod, the `kubernetes` Service
        on a node address, a Service of a hostNetwork pod, a UDP Service without listener, NodePorts with
        either traffic policy; with extra, the extra services too (rule count realism)."""
        nodes = self.state.nodes
        firsts = [next(p for p in self.state.pods if p.node == n.name) for n in nodes]
        svcs: list[Service] = []
        for k, b in enumerate(firsts):
            ip = self.cluster_ip(str(SERVICE_BASE + k))
            svcs += [Service(f"pod-{b.name}", "tcp", SVC_TCP_PORT, ((b.ip, SERVER_PORT, b.node),), ip),
                     Service(f"pod-{b.name}", "udp", SVC_UDP_PORT, ((b.ip, SERVER_PORT, b.node),), ip)]
            if self.state.dual_stack:
                ip6 = str(SERVICE_BASE6 + k)
                svcs += [Service(f"pod-{b.name}", proto, port, ((b.ip6, SERVER_PORT, b.node),), ip6)
                         for proto, port in (("tcp", SVC_TCP_PORT), ("udp", SVC_UDP_PORT))]
        api, host = (nodes[0].underlay_ip, SERVER_PORT, nodes[0].name), (nodes[-1].underlay_ip, SERVER_PORT,
                                                                         nodes[-1].name)
        at = self.cluster_ip
        svcs += [Service("kubernetes", "tcp", KUBERNETES_PORT, (api,), at(KUBERNETES_IP)),
                 Service("managed", "tcp", KUBERNETES_PORT, ((self.internet_host, SERVER_PORT, ""),), at(MANAGED_IP)),
                 Service("hostnet", "tcp", SVC_TCP_PORT, (host,), at(HOSTNET_IP)),
                 Service("hostnet", "udp", SVC_UDP_PORT, (host,), at(HOSTNET_IP)),
                 Service("closed", "udp", SVC_UDP_PORT, ((firsts[0].ip, CLOSED_PORT, firsts[0].node),),
                         at(CLOSED_IP)),
                 Service("nodeport", "tcp", NODEPORT, ((firsts[0].ip, SERVER_PORT, firsts[0].node),)),
                 Service("nodeport-local", "tcp", NODEPORT_LOCAL, tuple((b.ip, SERVER_PORT, b.node) for b in firsts),
                         local=True)]
        for k in range(self.state.extra_services if extra else 0):
            b = firsts[k % len(firsts)]
            ip = self.cluster_ip(str(SERVICE_BASE + 1000 + k))
            svcs += [Service(f"extra-{k}", proto, port, ((b.ip, SERVER_PORT, b.node),), ip)
                     for proto, port in (("tcp", SVC_TCP_PORT), ("udp", SVC_UDP_PORT))]
        return svcs

    def use_kube_proxy(self, mode: str) -> None:
        """(Re)program every node's Service NAT the way kube-proxy does in this mode (iptables or nftables)."""
        svcs = self.services(extra=True)
        for node in self.state.nodes:
            kubeproxy.install(node.netns, mode, svcs, node.name)
        self.state.kube_proxy = mode
        self.save()

    def _start_servers(self) -> None:
        targets = [f"{p.name}={nsutil.netns_path(p.netns)}" for p in self.state.pods + self.state.shaped]
        targets += [f"{n.name}={nsutil.netns_path(n.netns)}" for n in self.state.nodes]
        targets.append(f"inet={nsutil.netns_path(self.inet)}")
        with open(self.root / "servers.log", "ab") as log:
            proc = subprocess.Popen(["/usr/bin/python3", "-S", str(REPO / "sknf" / "lab" / "server.py"),
                                     str(SERVER_PORT), *targets], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=log, start_new_session=True)
        self.state.server_pid = proc.pid
        self.save()
        if proc.stdout.readline().strip() != b"ready":
            raise LabError("lab test servers failed to start")
        proc.stdout.close()

    # tearing down
    def down(self) -> None:
        """Undo everything, best effort and in reverse; safe on a half-built lab and when run twice."""
        errors: list[str] = []
        for pod in reversed(self.state.pods + self.state.shaped):
            node = next((n for n in self.state.nodes if n.name == pod.node), None)
            if node is not None and pod.ip and _alive(node.agent_pid):
                try:
                    run_chain(self.plugin_dir, "DEL", self.conflist(node), container_id=pod.container_id,
                              netns=nsutil.netns_path(pod.netns))
                except (LabError, OSError, subprocess.SubprocessError) as e:
                    errors.append(str(e))
            _remove_netns(pod.netns)
        for pid in [self.state.server_pid] + [n.agent_pid for n in self.state.nodes]:
            _stop(pid)
        for node in self.state.nodes:
            self._remove_agent_container(node)
        for node in self.state.nodes:
            with contextlib.suppress(OSError):
                subprocess.run([sys.executable, "-m", "sknf", "cleanup", "-c", node.config],
                               preexec_fn=nsutil.preexec_enter(node.netns), capture_output=True, timeout=60,
                               cwd=str(REPO))
            _remove_netns(node.netns)
            shutil.rmtree(f"/sys/fs/bpf/{self.prefix}-{node.name}", ignore_errors=True)
        for ns in (self.inet, self.ul):
            _remove_netns(ns)
        shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            print("lab down: " + "; ".join(errors), file=sys.stderr)

    # checking
    def check(self, bulk_bytes: int = 32 << 20, services_only: bool = False) -> list[CheckResult]:
        return run_checks(self, bulk_bytes, services_only)


def _alive(pid: int) -> bool:
    """True while the process runs; reaps it if it is our exited child (a zombie is not alive)."""
    if pid <= 0:
        return False
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child (started by an earlier `lab up`): ask the kernel
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop(pid: int, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Signal one process we started (by its PID), SIGKILL it if it lingers, and reap it."""
    if not _alive(pid):
        return
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _add6(ipr, index: int, ip: str, prefixlen: int) -> None:
    """An IPv6 address of the lab's underlay or Internet, usable at once (no duplicate address detection)."""
    ipr.addr("add", index=index, address=ip, prefixlen=prefixlen, flags=netlink.IFA_F_NODAD)


def _remove_netns(name: str) -> None:
    with contextlib.suppress(OSError):
        pnetns.remove(name)


# -- the connectivity matrix ---------------------------------------------------------------------

@dataclass
class CheckResult:
    flow: str
    src: str
    dst: str
    ok: bool
    detail: str


def _connect(netns: str, addr: tuple[str, int], kind: int = socket.SOCK_STREAM) -> socket.socket:
    with nsutil.entered(netns):
        sock = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, kind)
    sock.settimeout(5)
    if kind == socket.SOCK_STREAM:
        sock.connect(addr)
    return sock


def who(netns: str, ip: str, port: int = SERVER_PORT) -> tuple[str, str]:
    """(source address the server saw, server name) over TCP."""
    with _connect(netns, (ip, port)) as s:
        s.sendall(b"WHO\n")
        seen, name = s.makefile().readline().split()
    return seen, name


def who_udp(netns: str, ip: str, port: int, size: int = 64) -> tuple[str, str, int, str]:
    """(source the server saw, server name, datagram length it got, "ip:port" the reply came from).

    The reply's own source is part of the answer: a Service's reply that skipped the reverse NAT comes
    from the backend's address, and an unconnected socket would take it all the same.
    """
    with _connect(netns, (ip, port), socket.SOCK_DGRAM) as s:
        if ":" in ip:
            s.setsockopt(socket.IPPROTO_IPV6, 23, 2)  # IPV6_MTU_DISCOVER = IP_PMTUDISC_DO: never fragment
        else:
            s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO
        s.sendto(b"x" * size, (ip, port))
        data, (src_ip, src_port, *_) = s.recvfrom(4096)
    seen, name, length = data.decode().split()
    return seen, name, int(length), f"{src_ip}:{src_port}"


def udp_refused(netns: str, ip: str, port: int) -> str:
    """What a connected UDP client gets from a port nobody listens on: ECONNREFUSED (the ICMP port
    unreachable reached it, reverse-NATed to match its socket), "timeout" or "answered"."""
    with _connect(netns, (ip, port), socket.SOCK_DGRAM) as s:
        s.connect((ip, port))
        s.send(b"ping")
        try:
            s.recv(4096)
        except ConnectionRefusedError:
            return "ECONNREFUSED"
        except TimeoutError:
            return "timeout"
    return "answered"


def _transfer(netns: str, ip: str, nbytes: int) -> tuple[bool, float]:
    """Send nbytes of varied data over TCP; (the server counted and hashed exactly the same, seconds)."""
    block = hashlib.sha256(b"sknf").digest() * 2048
    digest, sent = hashlib.sha256(), 0
    started = time.perf_counter()
    with _connect(netns, (ip, SERVER_PORT)) as s:
        s.settimeout(60)
        s.sendall(f"SINK {nbytes}\n".encode())
        while sent < nbytes:
            chunk = block[: min(len(block), nbytes - sent)]
            s.sendall(chunk)
            digest.update(chunk)
            sent += len(chunk)
        got, their = s.makefile().readline().split()
    return int(got) == nbytes and their == digest.hexdigest(), time.perf_counter() - started


def bulk(netns: str, ip: str, nbytes: int) -> tuple[bool, str]:
    ok, secs = _transfer(netns, ip, nbytes)
    return ok, f"{nbytes >> 20} MiB, {nbytes * 8 / secs / 1e9:.2f} Gbit/s, sha256 {'match' if ok else 'MISMATCH'}"


def shaped_transfer(netns: str, ip: str, nbytes: int, rate: int) -> tuple[bool, str]:
    """A transfer that must be held to the rate (bit/s): at most twice it, as measured end to end."""
    ok, secs = _transfer(netns, ip, nbytes)
    got = nbytes * 8 / secs
    return ok and got <= 2 * rate, f"{got / 1e6:.1f} Mbit/s, sha256 {'match' if ok else 'MISMATCH'}"


SERVICE_FLOWS = ("ClusterIP", "kubernetes", "hostNetwork", "NodePort", "no listener")


def run_checks(lab: Lab, bulk_bytes: int, services_only: bool = False) -> list[CheckResult]:
    """Every flow of the matrix, or with services_only the rows that go through kube-proxy's NAT."""
    st = lab.state
    node_of = {n.name: n for n in st.nodes}
    pods_by_node = {n.name: [p for p in st.pods if p.node == n.name] for n in st.nodes}
    internet = lab.internet_host
    answers = {p.ip: p.name for p in st.pods} | {n.underlay_ip: n.name for n in st.nodes} | {internet: "inet"}
    services = lab.services()
    jobs = []

    def expect(flow: str, src: str, dst: str, fn, want) -> None:
        if not services_only or any(word in flow for word in SERVICE_FLOWS):
            jobs.append((flow, src, dst, fn, want))

    def where(a: LabPod, node: str) -> str:
        return "same node" if a.node == node else "across nodes"

    for a in st.pods:
        for b in st.pods:
            if a is not b:
                expect(f"pod->pod {where(a, b.node)}", a.name, b.name, lambda a=a, b=b: who(a.netns, b.ip),
                       (a.ip, b.name))
        for n in st.nodes:
            flow = "pod->node (own)" if n.name == a.node else "pod->node (other)"
            expect(flow, a.name, n.name, lambda a=a, n=n: who(a.netns, n.underlay_ip), (a.ip, n.name))
        expect("pod->Internet (SNAT)", a.name, "inet", lambda a=a: who(a.netns, internet),
               (node_of[a.node].underlay_ip, "inet"))
        for svc in services:
            ip, node = svc.endpoints[0][0], svc.endpoints[0][2]
            # NodePorts come from the Internet; no hairpin here; a dual-stack lab's IPv6 Services are ipv6_rows'
            if svc.cluster_ip is None or ip == a.ip or svc.family != lab.family:
                continue
            dst = f"{svc.cluster_ip}:{svc.port}({answers[ip]})"
            if svc.name == "closed":
                expect(f"pod->UDP Service, no listener: ECONNREFUSED {where(a, node)}", a.name, dst,
                       lambda a=a, s=svc: udp_refused(a.netns, s.cluster_ip, s.port), "ECONNREFUSED")
                continue
            if svc.name == "managed":  # not a peer: outside the cluster, masqueraded like the Internet
                expect("pod->kubernetes API (managed, outside the cluster): SNAT to the node", a.name, dst,
                       lambda a=a, s=svc: who(a.netns, s.cluster_ip, s.port), (node_of[a.node].underlay_ip, "inet"))
                continue
            kind = {"kubernetes": "pod->kubernetes API (node IP)", "hostnet": f"pod->hostNetwork Service "
                    f"{svc.proto.upper()}"}.get(svc.name, f"pod->ClusterIP {svc.proto.upper()}")
            if svc.proto == "tcp":
                expect(f"{kind} {where(a, node)}", a.name, dst, lambda a=a, s=svc: who(a.netns, s.cluster_ip, s.port),
                       (a.ip, answers[ip]))
            else:
                expect(f"{kind} {where(a, node)}", a.name, dst,
                       lambda a=a, s=svc: _without_length(who_udp(a.netns, s.cluster_ip, s.port)),
                       (a.ip, answers[ip], f"{svc.cluster_ip}:{svc.port}"))
    for svc in (s for s in services if s.cluster_ip is None):
        for n in st.nodes:
            ip = svc.endpoints_on(n.name)[0][0]
            flow, seen = (("Internet->NodePort, Local policy: client kept", internet) if svc.local else
                          ("Internet->NodePort, Cluster policy: SNAT to the node", n.gateway_ip))
            expect(flow, "inet", f"{n.name}:{svc.port}({answers[ip]})",
                   lambda n=n, s=svc: who(lab.inet, n.underlay_ip, s.port), (seen, answers[ip]))
    for n in st.nodes:
        for p in st.pods:
            flow = "node->pod (own)" if p.node == n.name else "node->pod (other)"
            expect(flow, n.name, p.name, lambda n=n, p=p: who(n.netns, p.ip)[1], p.name)
            expect(flow + " source", n.name, p.name, lambda n=n, p=p: who(n.netns, p.ip)[0], n.gateway_ip)
    for flow, src, dst, fn, want in ipv6_rows(lab) if st.dual_stack else ():
        expect(flow, src, dst, fn, want)
    for shaped in st.shaped:
        peer = next(p for p in st.pods if p.node != shaped.node) if len(st.nodes) > 1 else st.pods[0]
        expect(f"bandwidth-annotated pod: egress <= 2 x {SHAPED_RATE // 10**6} Mbit/s", shaped.name, peer.name,
               lambda s=shaped, p=peer: shaped_transfer(s.netns, p.ip, SHAPED_BYTES, SHAPED_RATE), None)
        expect(f"bandwidth-annotated pod: ingress <= 2 x {SHAPED_RATE // 10**6} Mbit/s", peer.name, shaped.name,
               lambda s=shaped, p=peer: shaped_transfer(p.netns, s.ip, SHAPED_BYTES, SHAPED_RATE), None)
    if len(st.nodes) > 1:
        a, b = pods_by_node[st.nodes[0].name][0], pods_by_node[st.nodes[1].name][0]
        mtu = _mtu(a.netns)
        underlay_mtu = _mtu(node_of[a.node].netns)
        overhead = VXLAN_OVERHEAD[lab.family]
        payload = mtu - (28 if lab.family == 4 else 48)  # less the IP (20 or 40) and UDP (8) headers
        expect(f"pod MTU = underlay MTU - {overhead}", a.name, a.node, lambda: mtu, underlay_mtu - overhead)
        expect("full-MTU datagram across nodes", a.name, b.name,
               lambda: who_udp(a.netns, b.ip, SERVER_PORT, payload), (a.ip, b.name, payload, f"{b.ip}:{SERVER_PORT}"))
        if not services_only:
            jobs.append(("bulk TCP across VXLAN", a.name, b.name, lambda: bulk(a.netns, b.ip, bulk_bytes), None))

    def run(job) -> CheckResult:
        flow, src, dst, fn, want = job
        try:
            got = fn()
        except OSError as e:
            return CheckResult(flow, src, dst, False, f"{type(e).__name__}: {e}")
        if want is None:
            return CheckResult(flow, src, dst, got[0], got[1])
        return CheckResult(flow, src, dst, got == want, f"saw {got}" + ("" if got == want else f", want {want}"))

    before = underlay_pod_frames(lab)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs))
    leaked = underlay_pod_frames(lab) - before  # every flow ran: pods reached nodes inside the overlay
    results.append(CheckResult("no pod address on the underlay", "pods", "underlay", leaked == 0,
                               f"{leaked} frames with a pod address dropped by the underlay switch during the check"))
    return results


def ipv6_rows(lab: Lab) -> list[tuple]:
    """The dual-stack rows: (flow, source, destination, probe, wanted answer) over IPv6."""
    st = lab.state
    node_of = {n.name: n for n in st.nodes}
    rows = []
    for a in st.pods:
        for b in st.pods:
            if a is not b:
                where = "same node" if a.node == b.node else "across nodes"
                rows.append((f"IPv6 pod->pod {where}", a.name, b.name, lambda a=a, b=b: who(a.netns, b.ip6),
                             (a.ip6, b.name)))
        rows.append(("IPv6 pod->Internet (SNAT)", a.name, "inet", lambda a=a: who(a.netns, INTERNET_HOST6),
                     (node_of[a.node].underlay_ip6, "inet")))
        for svc in (s for s in lab.services() if s.family == 6 and s.endpoints[0][0] != a.ip6):
            ip, where_to = svc.endpoints[0][0], svc.endpoints[0][2]
            flow = f"IPv6 pod->ClusterIP {svc.proto.upper()} {'same node' if a.node == where_to else 'across nodes'}"
            backend = next(p.name for p in st.pods if p.ip6 == ip)
            if svc.proto == "tcp":
                rows.append((flow, a.name, f"[{svc.cluster_ip}]:{svc.port}",
                             lambda a=a, s=svc: who(a.netns, s.cluster_ip, s.port), (a.ip6, backend)))
            else:
                rows.append((flow, a.name, f"[{svc.cluster_ip}]:{svc.port}",
                             lambda a=a, s=svc: _without_length(who_udp(a.netns, s.cluster_ip, s.port)),
                             (a.ip6, backend, f"{svc.cluster_ip}:{svc.port}")))
    for n in st.nodes:
        for p in st.pods:
            flow = "IPv6 node->pod (own)" if p.node == n.name else "IPv6 node->pod (other)"
            rows.append((flow + ", source kept", n.name, p.name, lambda n=n, p=p: who(n.netns, p.ip6),
                         (n.gateway_ip6, p.name)))
    if len(st.nodes) > 1:
        a, b = (next(p for p in st.pods if p.node == n.name) for n in st.nodes[:2])
        payload = _mtu(a.netns) - 48  # less the IPv6 (40) and UDP (8) headers
        rows.append(("IPv6 full-MTU datagram across nodes", a.name, b.name,
                     lambda: who_udp(a.netns, b.ip6, SERVER_PORT, payload),
                     (a.ip6, b.name, payload, f"{b.ip6}:{SERVER_PORT}")))
    return rows


def _without_length(reply: tuple[str, str, int, str]) -> tuple[str, str, str]:
    return reply[0], reply[1], reply[3]


def _mtu(netns: str) -> int:
    """MTU of the namespace's eth0 (a pod's interface, or a node's underlay link)."""
    with netlink.route(nsutil.netns_path(netns)) as ipr:
        return netlink.link_info(ipr, "eth0").get("IFLA_MTU")


def print_matrix(results: list[CheckResult], out=sys.stdout) -> bool:
    flows: dict[str, list[CheckResult]] = {}
    for r in results:
        flows.setdefault(r.flow, []).append(r)
    width = max(len(f) for f in flows)
    for flow, rs in flows.items():
        bad = [r for r in rs if not r.ok]
        mark = "ok  " if not bad else "FAIL"
        note = rs[0].detail if len(rs) == 1 else f"{len(rs) - len(bad)}/{len(rs)}"
        print(f"  {mark} {flow:<{width}}  {note}", file=out)
        for r in bad:
            print(f"       {r.src} -> {r.dst}: {r.detail}", file=out)
    ok = all(r.ok for r in results)
    print(f"{sum(r.ok for r in results)} passed, {sum(not r.ok for r in results)} failed", file=out)
    return ok


# -- command line ------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "check", "down", "demo"],
                        help="demo = up, check, down (down even when check fails)")
    parser.add_argument("--prefix", default="sknf-lab", help="name prefix of every namespace the lab makes")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--pods", type=int, default=2, help="pods per node")
    parser.add_argument("--datapath", choices=["auto", "bpf", "kernel"], default="auto")
    parser.add_argument("--services", type=int, default=0, help="extra ClusterIP services (rule count realism)")
    parser.add_argument("--kube-proxy", choices=kubeproxy.MODES, default="iptables",
                        help="the Service NAT kube-proxy would program: its iptables or its nftables mode")
    parser.add_argument("--agent-image", default="", metavar="IMAGE",
                        help="run the nodes' agents (and so their plugin) from this sknf image, with podman")
    family = parser.add_mutually_exclusive_group()
    family.add_argument("--dual-stack", action="store_true",
                        help="pods get IPv6 too (fd00:10:244::/56 beside 10.244.0.0/16; the underlay stays IPv4)")
    family.add_argument("--ipv6-only", action="store_true",
                        help="no IPv4 anywhere: IPv6 pods (fd00:10:244::/56), Services and underlay (VXLAN over IPv6)")


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("sknf lab: needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    try:
        if args.action == "down":
            with contextlib.suppress(LabError):
                Lab.load(args.prefix).down()
            return 0
        if args.action == "check":
            lab = Lab.load(args.prefix)
            return 0 if print_matrix(lab.check()) else 1
        lab = Lab(args.prefix, args.nodes, args.pods, args.datapath, args.services, args.kube_proxy,
                  args.agent_image, shaped_pod=True, dual_stack=args.dual_stack,
                  ipv6_only=args.ipv6_only)
        if args.action == "up":
            try:
                lab.up()
            except BaseException:
                lab.down()
                raise
            _describe(lab)
            return 0
        with lab:
            _describe(lab)
            ok = print_matrix(lab.check())
            _show_stats(lab)
            healthy = _show_doctor(lab)
            return 0 if ok and healthy else 1
    except LabError as e:
        print(f"sknf lab: {e}", file=sys.stderr)
        return 1


def _describe(lab: Lab) -> None:
    st = lab.state
    print(f"lab {st.prefix}: {len(st.nodes)} nodes, {len(st.pods)} pods")
    for n in st.nodes:
        mode = _agent_mode(lab, n)
        print(f"  node {n.name} ({n.netns}) underlay {n.underlay_ip} pods {n.pod_cidr} datapath {mode}")
        for p in (p for p in st.pods if p.node == n.name):
            print(f"    pod {p.name} ({p.netns}) {' '.join(filter(None, (p.ip, p.ip6)))} host veth {p.host_ifname}")
    for s in lab.services():
        to = ", ".join(f"{ip}:{port}" for ip, port, _ in s.endpoints)
        front = f"ClusterIP {s.cluster_ip}:{s.port}" if s.cluster_ip else f"NodePort {s.port}{' (Local)' * s.local}"
        print(f"  {front}/{s.proto} ({s.name}) -> {to}")
    print(f"  kube-proxy mode: {st.kube_proxy}")


def _show_stats(lab: Lab) -> None:
    """What the check's traffic looks like to an operator: `sknf stats` on each node, as run there."""
    for node in lab.state.nodes:
        print(f"\n$ sknf stats   # on {node.name}")
        sys.stdout.flush()
        subprocess.run([sys.executable, "-m", "sknf", "stats", "-c", node.config], cwd=str(REPO),
                       preexec_fn=nsutil.preexec_enter(node.netns), timeout=60, check=False)


def _show_doctor(lab: Lab) -> bool:
    """`sknf doctor` on each node, as run there; True when every node is all OK."""
    healthy = True
    for node in lab.state.nodes:
        print(f"\n$ sknf doctor   # on {node.name}")
        sys.stdout.flush()
        proc = subprocess.run([sys.executable, "-m", "sknf", "doctor", "-c", node.config], cwd=str(REPO),
                              preexec_fn=nsutil.preexec_enter(node.netns), timeout=120, check=False)
        healthy = healthy and proc.returncode == 0
    return healthy


def _agent_mode(lab: Lab, node: LabNode) -> str:
    log = lab.node_dir(node.name) / "agent.log"
    for line in log.read_text(errors="replace").splitlines():
        if "datapath" in line and "sknf agent on" in line:
            return line.split("datapath", 1)[1].strip()
    return "?"
