"""A real container runtime drives sknf: podman 4.3 (CNI backend, runc) inside a lab node's namespace.

The node runs a real `sknf agent`; podman finds the conflist that agent installed and the plugin in the
lab's bin dir, exactly as kubelet's runtime would on a node. Everything podman keeps (storage, run state,
config) lives in a temp dir, so the machine's own podman state is never touched. Recipe and version notes:
/work/shared/podman-recipe.md.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from leftovers import managed_lab

from sknf import netlink, nsutil
from sknf.ipam import Store
from sknf.lab import REFERENCE_PLUGINS, Lab, LabNode

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "ske-pm"
NAMES = ("ske-pm-a", "ske-pm-b")
DUAL_PREFIX = "sko-pm"  # the dual-stack case's lab, containers and podman dir
DUAL_NAMES = ("sko-pm-a", "sko-pm-b")
BUSYBOX_APPLETS = ("sh", "ip", "wget", "httpd", "cat")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with managed_lab(PREFIX, nodes=1, pods_per_node=1, datapath="kernel") as built:
        yield built


@pytest.fixture
def dual_lab() -> Iterator[Lab]:
    """The agent serves both families; its conflist is the same (sknf answers with the cluster's families)."""
    with managed_lab(DUAL_PREFIX, nodes=1, pods_per_node=1, datapath="kernel", dual_stack=True) as built:
        yield built


class Podman:
    """podman with private storage and config, run inside the node's namespace (nsenter, as the recipe says)."""

    def __init__(self, work: Path, node: LabNode, conflist: Path, plugin_dirs: list[str]) -> None:
        self.work, self.node = work, node
        net = work / "net.d"
        net.mkdir()
        shutil.copy(conflist, net / conflist.name)
        (work / "tmp").mkdir()
        conf = work / "containers.conf"
        conf.write_text("\n".join([
            "[engine]", 'runtime = "runc"', 'cgroup_manager = "cgroupfs"', 'events_logger = "file"',
            f'events_logfile_path = "{work}/events.log"', f'tmp_dir = "{work}/tmp"',
            "[network]", 'network_backend = "cni"', f'network_config_dir = "{net}"',
            f"cni_plugin_dirs = {json.dumps(plugin_dirs)}", ""]))
        self.env = {"CONTAINERS_CONF": str(conf), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        self.argv = ["nsenter", f"--net={nsutil.netns_path(node.netns)}", "podman",
                     "--root", str(work / "root"), "--runroot", str(work / "runroot")]

    def __call__(self, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run([*self.argv, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"podman {' '.join(args)}: {proc.stderr.strip()}"
        return proc.stdout.strip()

    def rootfs(self, name: str) -> Path:
        """A busybox root filesystem serving one page that names the container (relative applet links)."""
        root = self.work / "rootfs" / name
        for d in ("bin", "www", "etc", "tmp", "proc", "sys", "dev"):
            (root / d).mkdir(parents=True)
        shutil.copy("/bin/busybox", root / "bin" / "busybox")
        for applet in BUSYBOX_APPLETS:
            (root / "bin" / applet).symlink_to("busybox")
        (root / "www" / "index.html").write_text(f"hello from {name}\n")
        return root

    def run_httpd(self, name: str) -> str:
        return self("run", "-d", "--name", name, "--network", "sknf", "--ulimit", "nofile=1024:1024",
                    "--ulimit", "nproc=1024:1024", "--rootfs", str(self.rootfs(name)),
                    "httpd", "-f", "-p", "8080", "-h", "/www")

    def wait_listening(self, name: str, port: int, timeout: float = 30) -> None:
        """Until the container's server listens: busybox 1.35 wget segfaults on a refused connection (and on -T)."""
        deadline = time.monotonic() + timeout
        while not any(fields[1].endswith(f":{port:04X}") and fields[3] == "0A"  # state LISTEN
                      for fields in map(str.split, self("exec", name, "cat", "/proc/net/tcp", "/proc/net/tcp6")
                                        .splitlines()[1:])):
            assert time.monotonic() < deadline, f"{name} does not listen on {port}"
            time.sleep(0.1)

    def ip(self, name: str, family: int = 4) -> str:
        field = "GlobalIPv6Address" if family == 6 else "IPAddress"
        return self("inspect", name, "--format", f"{{{{.NetworkSettings.Networks.sknf.{field}}}}}")

    def remove_all(self) -> None:
        subprocess.run([*self.argv, "rm", "-f", "-t", "0", "--all"], env=self.env, capture_output=True, timeout=120)


@pytest.fixture
def podman(lab: Lab) -> Iterator[Podman]:
    with podman_on(lab, PREFIX) as runtime:
        yield runtime


@pytest.fixture
def dual_podman(dual_lab: Lab) -> Iterator[Podman]:
    with podman_on(dual_lab, DUAL_PREFIX) as runtime:
        yield runtime


@contextlib.contextmanager
def podman_on(lab: Lab, prefix: str) -> Iterator[Podman]:
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))  # short: podman refuses a runroot over 50 characters
    node = lab.state.nodes[0]
    try:
        runtime = Podman(work, node, lab.node_dir(node.name) / "net.d" / "10-sknf.conflist",
                         [str(lab.root / "bin"), REFERENCE_PLUGINS])
        try:
            yield runtime
        finally:
            runtime.remove_all()  # before the lab goes: DEL needs the agent
        with open("/proc/mounts") as f:
            assert [line for line in f if str(work) in line] == []
    finally:
        shutil.rmtree(work, ignore_errors=True)


def leases(lab: Lab, node: LabNode) -> dict[str, str]:
    store = Store.open_existing(lab.node_dir(node.name) / "state")
    return {lease.container_id: ",".join(map(str, lease.ips)) for lease in store.leases()}


def leased_addresses(lab: Lab, node: LabNode) -> list[str]:
    """The store's address index: an entry per leased address, of each family (ipam.py)."""
    return sorted(os.listdir(lab.node_dir(node.name) / "state" / "ipam" / "ips"))


def host_veths(node: LabNode) -> list[str]:
    with netlink.route(nsutil.netns_path(node.netns)) as ipr:
        return sorted(netlink.host_veths(ipr, "sknf"))


def test_installed_conflist_suits_podman(lab: Lab) -> None:
    node = lab.state.nodes[0]
    conflist = lab.conflist(node)
    assert conflist["cniVersion"] == "1.0.0"  # podman 4.3 cannot parse 1.1.0 results
    assert [p["type"] for p in conflist["plugins"]] == ["sknf", "portmap"]
    assert conflist["plugins"][0]["agentSocket"] == str(lab.node_dir(node.name) / "run" / "sknf.sock")


def test_podman_containers_talk_over_sknf_and_rm_frees_everything(lab: Lab, podman: Podman) -> None:
    node = lab.state.nodes[0]
    subnet = ipaddress.IPv4Network(node.pod_cidr)
    leases_before, links_before = leases(lab, node), host_veths(node)

    ids = {name: podman.run_httpd(name) for name in NAMES}
    ips = {name: podman.ip(name) for name in NAMES}
    sandboxes = [podman("inspect", name, "--format", "{{.NetworkSettings.SandboxKey}}") for name in NAMES]
    assert all(nsutil.is_netns(path) for path in sandboxes)

    now = leases(lab, node)
    for name in NAMES:
        assert ipaddress.IPv4Address(ips[name]) in subnet
        assert now[ids[name]] == ips[name]  # podman's container id is the CNI container id
        eth0 = podman("exec", name, "ip", "-4", "-o", "addr", "show", "eth0")
        assert f"inet {ips[name]}/16 " in eth0  # cluster-wide prefix, as every sknf pod
    assert len(host_veths(node)) == len(links_before) + 2
    a, b = NAMES
    for name in NAMES:
        podman.wait_listening(name, 8080)
    assert podman("exec", a, "wget", "-qO-", f"http://{ips[b]}:8080/") == f"hello from {b}"
    assert podman("exec", b, "wget", "-qO-", f"http://{ips[a]}:8080/") == f"hello from {a}"

    podman("rm", "-f", "-t", "0", *NAMES)

    assert leases(lab, node) == leases_before
    assert host_veths(node) == links_before
    assert [path for path in sandboxes if os.path.exists(path)] == []


def test_podman_dual_stack_containers_get_both_families_and_rm_frees_both(dual_lab: Lab,
                                                                         dual_podman: Podman) -> None:
    """Each container gets an IPv4 and an IPv6 address from sknf (cluster-wide prefixes, a default route per
    family), reaches the other over IPv6, and `podman rm` frees both addresses of the one lease."""
    lab, podman, node = dual_lab, dual_podman, dual_lab.state.nodes[0]
    subnets = [ipaddress.ip_network(net) for net in node.pod_cidr.split(",")]  # the node's, one per family
    assert [net.version for net in subnets] == [4, 6]
    leases_before, index_before, links_before = leases(lab, node), leased_addresses(lab, node), host_veths(node)

    ids = {name: podman.run_httpd(name) for name in DUAL_NAMES}
    ips = {name: (podman.ip(name), podman.ip(name, 6)) for name in DUAL_NAMES}
    now = leases(lab, node)
    for name, (v4, v6) in ips.items():
        assert [ipaddress.ip_address(ip) in net for ip, net in zip((v4, v6), subnets, strict=True)] == [True, True]
        assert now[ids[name]] == f"{v4},{v6}"  # one lease holds both
        assert f"inet {v4}/16 " in podman("exec", name, "ip", "-4", "-o", "addr", "show", "eth0")
        assert f"inet6 {v6}/56 " in podman("exec", name, "ip", "-6", "-o", "addr", "show", "eth0")
        route = podman("exec", name, "ip", "-6", "route", "show", "default")
        assert route.startswith(f"default via {node.gateway_ip6} "), route
    assert len(leased_addresses(lab, node)) == len(index_before) + 4  # two families, two containers
    a, b = DUAL_NAMES
    for name in DUAL_NAMES:
        podman.wait_listening(name, 8080)
    assert podman("exec", a, "wget", "-qO-", f"http://[{ips[b][1]}]:8080/") == f"hello from {b}"
    assert podman("exec", b, "wget", "-qO-", f"http://[{ips[a][1]}]:8080/") == f"hello from {a}"

    podman("rm", "-f", "-t", "0", *DUAL_NAMES)

    assert leases(lab, node) == leases_before
    assert leased_addresses(lab, node) == index_before  # neither family's address is left behind
    assert host_veths(node) == links_before
