"""`sknf bench scale`: what the agent costs on a big node in a big cluster.

All of it on a 1-node lab (`sknf.lab`, namespaces only) whose real agent runs as on a node:
- agent start to ready (the CNI socket answers STATUS) and its memory (VmRSS) and CPU at rest, with
  the lab's one pod and again at each of the --pods counts, pods made through the real plugin, each in
  its own namespace (the node's pod subnet is widened to a /20 for them);
- peer programming: the peers file is replaced (renamed into place) to list M simulated nodes, and
  the time is taken from that rename, the moment the agent can learn of it, until the VXLAN device
  floods to all of them and sknf's NAT chain exempts all of them (and back). Their underlay addresses
  are in 198.18.0.0/15, which the lab's underlay namespace holds as a local route, so whatever the
  node floods to them ends there. The FDB is polled with sknf.rtbulk's lean dump (pyroute2's decoding
  of 5,000 entries per poll would compete with the agent for the CPU).
The agent reconciles every --reconcile-interval seconds (default 10, the agent's own default); CPU at
rest is taken over --rest seconds (default 60) with everything the agent runs by default (sampler,
sweeps, peer probes), the processes it starts (iptables-save, ...) included. Targets: RSS <= 150 MiB
with 1,000 pods; 5,000 peers programmed and removed <= 1 s; CPU at rest <= 1 % of a core at 110 pods,
<= 3 % at 1,000. Printed as measured/target ratios (below 1 is within target). Start to ready is
polled every 0.2 s, as the lab waits for agents.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from pyroute2 import netns as pnetns

from sknf import netlink, nsutil, rtbulk
from sknf.config import VXLAN
from sknf.iptables import NAT_CHAIN
from sknf.lab import Lab, LabError, LabNode

RSS_TARGET_MIB = 150.0
PEERS_TARGET_S = 1.0
CPU_TARGETS = {110: 1.0, 1000: 3.0}  # pods: % of one core at rest
POD_CIDR = "10.244.16.0/20"  # room for 4,093 pods, clear of the lab's 10.244.1.0/24
PEER_NET = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544's benchmarking range
BARE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class BenchError(RuntimeError):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pods", type=int, nargs="+", default=[110, 1000],
                        help="pod counts for the loaded measurements, ascending (default 110 1000)")
    parser.add_argument("--rest", type=float, default=60.0, help="seconds of each CPU-at-rest measurement")
    parser.add_argument("--peers", type=int, nargs="+", default=[1000, 5000],
                        help="simulated cluster sizes to program (default 1000 5000)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent plugin execs while adding pods")
    parser.add_argument("--datapath", choices=("auto", "bpf", "kernel"), default="kernel")
    parser.add_argument("--reconcile-interval", type=float, default=10.0,
                        help="the agent's full reconcile period (default 10 s, the agent's own default)")
    parser.add_argument("--prefix", default="sknf-scale", help="name prefix of every namespace the bench makes")


# -- measuring the agent -----------------------------------------------------------------------------

def memory(pid: int) -> tuple[float, str]:
    """(VmRSS in MiB, "VmRSS MiB (anon MiB)"): the anonymous part is the agent's own, the rest mapped files
    (Python, libbcc/LLVM) that other processes may share."""
    with open(f"/proc/{pid}/status") as f:
        kib = {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("VmRSS:", "RssAnon:"))}
    rss, anon = kib["VmRSS"] / 1024, kib["RssAnon"] / 1024
    return rss, f"{rss:.1f} MiB (anon {anon:.1f})"


def memory_row(name: str, pid: int) -> tuple[str, str, str]:
    rss, text = memory(pid)
    return name, text, f"{rss / RSS_TARGET_MIB:.2f} of {RSS_TARGET_MIB:.0f} MiB"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime + stime, and cutime + cstime: the children it waited for (iptables-save, ...)
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def cpu_share(pid: int, seconds: float) -> float:
    """The agent's CPU use at rest (sampler, reconciles, sweeps, probes), as a share of one core."""
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - started)


def wait_until(what: str, predicate: Callable[[], bool], timeout: float = 120, every: float = 0.05) -> float:
    """Seconds until predicate() holds, polled every `every` seconds."""
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > timeout:
            raise BenchError(f"not within {timeout:.0f} s: {what}")
        time.sleep(every)
    return time.perf_counter() - started


def start_to_ready(lab: Lab, node: LabNode) -> float:
    """Seconds from exec of a fresh agent (the old one stopped first) until the plugin's STATUS succeeds."""
    lab.stop_agent(node)
    started = time.perf_counter()
    lab.restart_agent(node)
    return time.perf_counter() - started


def settle(node: LabNode) -> None:
    """Let at least one full reconcile and a sampler tick run, so memory reflects the steady state."""
    time.sleep(float(yaml.safe_load(Path(node.config).read_text())["reconcile_interval"]) + 1.5)


# -- pods -------------------------------------------------------------------------------------------

def configure(lab: Lab, node: LabNode, reconcile_interval: float) -> None:
    """A pod subnet with room for thousands of pods, and the reconcile period under test."""
    path = Path(node.config)
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "pod_cidr": POD_CIDR,
                                    "reconcile_interval": reconcile_interval}))


def plugin(lab: Lab, node: LabNode, command: str, container_id: str, netns: str) -> None:
    """One plugin exec as a runtime makes it: in the node's namespace, bare environment, netconf on stdin."""
    conflist = lab.conflist(node)
    netconf = {**conflist["plugins"][0], "cniVersion": conflist["cniVersion"], "name": conflist["name"]}
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": nsutil.netns_path(netns),
           "CNI_IFNAME": "eth0", "CNI_ARGS": f"K8S_POD_NAMESPACE=scale;K8S_POD_NAME={netns}",
           "CNI_PATH": str(lab.root / "bin"), "PATH": BARE_PATH}
    proc = subprocess.run([str(lab.root / "bin" / "sknf")], input=json.dumps(netconf).encode(), env=env,
                          capture_output=True, timeout=120, preexec_fn=nsutil.preexec_enter(node.netns))
    if proc.returncode != 0:
        raise BenchError(f"{command} {netns}: {proc.stdout.decode(errors='replace').strip()}")


def each(workers: int, fn: Callable[[str], None], items: list[str]) -> float:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(fn, items))
    return time.perf_counter() - started


def container_id(netns: str) -> str:
    return hashlib.sha256(netns.encode()).hexdigest()


# -- peers ------------------------------------------------------------------------------------------

def hold_peer_addresses(lab: Lab) -> None:
    """The underlay namespace answers for all of PEER_NET (a local route), so no flooded frame leaves the lab."""
    with netlink.route(nsutil.netns_path(lab.ul)) as ipr:
        ipr.route("add", dst=str(PEER_NET), type="local", table=255, scope="host", oif=netlink.link_index(ipr, "lo"))


def write_peers(lab: Lab, node: LabNode, count: int) -> tuple[float, set[str]]:
    """The peers file lists the node and `count` simulated ones; returns (perf_counter at the rename,
    their underlay addresses)."""
    ips = [str(PEER_NET.network_address + 1 + i) for i in range(count)]
    nodes = [{"name": node.name, "underlay_ip": node.underlay_ip, "pod_cidr": node.pod_cidr}]
    nodes += [{"name": f"sim{i}", "underlay_ip": ip} for i, ip in enumerate(ips)]
    tmp = lab.root / "peers.yaml.new"
    tmp.write_text(yaml.safe_dump({"nodes": nodes}))
    renamed = time.perf_counter()
    tmp.replace(lab.root / "peers.yaml")
    return renamed, set(ips)


def flood_list(node: LabNode) -> set[str]:
    with nsutil.entered(nsutil.netns_path(node.netns)), rtbulk.Rtnl() as nl:
        return {dst for mac, dst in nl.fdb(socket.if_nametoindex(VXLAN)) if mac == netlink.ZERO_MAC}


def nat_exempt(node: LabNode) -> set[str]:
    """Underlay addresses sknf's NAT chain exempts from masquerading (each node's -d <ip>/32 RETURN)."""
    out = subprocess.run(["iptables", "-w", "-t", "nat", "-S", NAT_CHAIN], capture_output=True, text=True,
                         preexec_fn=nsutil.preexec_enter(node.netns)).stdout
    return {word[:-3] for word in out.split() if word.endswith("/32")}


def program_peers(lab: Lab, node: LabNode, count: int) -> tuple[float, float]:
    """(seconds until the flood list, seconds until the NAT exemptions) match `count` simulated peers,
    from the peers file's rename into place."""
    started, wanted = write_peers(lab, node, count)
    wait_until(f"{count} flood entries", lambda: flood_list(node) == wanted, every=0.02)
    fdb = time.perf_counter() - started
    wait_until(f"{count} NAT exemptions", lambda: nat_exempt(node) == wanted | {node.underlay_ip}, every=0.05)
    return fdb, time.perf_counter() - started


# -- the run ----------------------------------------------------------------------------------------

def report(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(name) for name, _, _ in rows)
    for name, value, versus in rows:
        print(f"  {name:<{width}}  {value:>24}  {versus}")


def cpu_row(name: str, pid: int, seconds: float, pods: int | None = None) -> tuple[str, str, str]:
    share = cpu_share(pid, seconds) * 100
    target = CPU_TARGETS.get(pods) if pods is not None else None
    return name, f"{share:.2f} %", f"{share / target:.2f} of {target:g} %" if target else "of one core"


def measure(lab: Lab, args: argparse.Namespace, out: list[tuple[str, str, str]]) -> None:
    node = lab.state.nodes[0]
    configure(lab, node, args.reconcile_interval)
    out.append(("start to ready, 1 pod", f"{start_to_ready(lab, node):.2f} s", ""))
    settle(node)
    out.append(memory_row("RSS at rest, 1 pod", node.agent_pid))
    out.append(cpu_row("CPU at rest, 1 pod", node.agent_pid, args.rest))

    hold_peer_addresses(lab)
    for count in args.peers:
        fdb, rules = program_peers(lab, node, count)
        target = f"{rules / PEERS_TARGET_S:.2f} of {PEERS_TARGET_S:g} s" if count >= 5000 else ""
        out.append((f"{count} peers: flood list", f"{fdb:.2f} s", ""))
        out.append((f"{count} peers: + NAT exemptions", f"{rules:.2f} s", target))
        out.append(cpu_row(f"{count} peers: CPU at rest", node.agent_pid, args.rest))
        out.append(memory_row(f"{count} peers: RSS", node.agent_pid))
    fdb, rules = program_peers(lab, node, 0)
    out.append((f"{args.peers[-1]} peers removed: flood list", f"{fdb:.2f} s", ""))
    out.append((f"{args.peers[-1]} peers removed: + NAT exemptions", f"{rules:.2f} s",
                f"{rules / PEERS_TARGET_S:.2f} of {PEERS_TARGET_S:g} s" if args.peers[-1] >= 5000 else ""))

    names = [f"{lab.prefix}-b{i:04d}" for i in range(max(args.pods))]
    made: list[str] = []
    try:
        started = time.perf_counter()
        for name in names:
            pnetns.create(name)
            made.append(name)
        out.append((f"{len(names)} pod namespaces made (runtime)", f"{time.perf_counter() - started:.1f} s", ""))
        added = 0
        for pods in sorted(args.pods):
            batch = names[added:pods]
            took = each(args.workers, lambda n: plugin(lab, node, "ADD", container_id(n), n), batch)
            out.append((f"{len(batch)} ADDs (to {pods}), {args.workers} at a time", f"{took:.1f} s",
                        f"{len(batch) / took:.0f} pods/s"))
            added = pods
            settle(node)
            out.append(memory_row(f"RSS at rest, {pods} pods", node.agent_pid))
            out.append(cpu_row(f"CPU at rest, {pods} pods", node.agent_pid, args.rest, pods))
        out.append((f"start to ready, {added} pods", f"{start_to_ready(lab, node):.2f} s", ""))
        settle(node)
        out.append(memory_row(f"RSS after restart, {added} pods", node.agent_pid))
        took = each(args.workers, lambda n: plugin(lab, node, "DEL", container_id(n), n), names)
        out.append((f"{len(names)} DELs, {args.workers} at a time", f"{took:.1f} s",
                    f"{len(names) / took:.0f} pods/s"))
    finally:
        for name in made:
            with contextlib.suppress(OSError):
                pnetns.remove(name)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("sknf bench scale: needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    rows: list[tuple[str, str, str]] = []
    try:
        with Lab(prefix=args.prefix, nodes=1, pods_per_node=1, datapath=args.datapath) as lab:
            try:
                measure(lab, args, rows)
            finally:
                print(f"sknf bench scale ({args.datapath} datapath, agent reconciling every "
                      f"{args.reconcile_interval:g} s):")
                if rows:
                    report(rows)
    except (BenchError, LabError) as e:
        print(f"sknf bench scale: {e}", file=sys.stderr)
        return 1
    return 0

