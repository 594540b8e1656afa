"""`sknf bench sweep`: the learned-flow sweep's cost follows the learned flows, not conntrack's size.

A 1-node lab (BPF datapath, the agent's default 10 s reconcile and sweep period) holds 1,000
learned flows: entries in the node's kernel_flows map, each backed by a conntrack entry (a DNAT-
shaped client -> ClusterIP flow whose reply tuple is the learned one), so every sweep asks conntrack
about all of them and keeps them. The agent's CPU over --seconds at rest, then CNI ADD latency (pods
added one at a time, paced across two sweeps), are measured with no other conntrack entries, then
with --entries static, unrelated ones inserted into the node's namespace (ctnetlink, sknf.conntrack;
machine-wide sysctls are not touched); the ADDs once more in each state after that (the table
flushed and refilled), so a change of the machine's load shows as noise in both columns. Target:
the second CPU figure at most 2% of a core above the first, and ADD p50 unchanged within noise.
--old-sweep also times one full pyroute2 conntrack dump (what the sweep did before) over the table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from pyroute2 import netns as pnetns

from sknf import conntrack, nsutil
from sknf.bench.scale import BenchError, container_id, cpu_share, plugin, report
from sknf.datapath import bpfmaps
from sknf.datapath.bpf import _flow_key
from sknf.lab import Lab, LabError, LabNode

CPU_TARGET = 0.02  # of one core, above the run without unrelated entries
UDP, TCP = socket.IPPROTO_UDP, socket.IPPROTO_TCP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--entries", type=int, default=100_000, help="unrelated conntrack entries (default 100000)")
    parser.add_argument("--flows", type=int, default=1000, help="learned flows (default 1000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="CPU measurement window (default 60)")
    parser.add_argument("--adds", type=int, default=40,
                        help="CNI ADDs per table state, in two rounds of two sweeps each (default 40)")
    parser.add_argument("--reconcile-interval", type=float, default=10.0,
                        help="the agent's reconcile and sweep period (default 10 s, the agent's own default)")
    parser.add_argument("--old-sweep", action="store_true", help="also time one full pyroute2 dump of the table")
    parser.add_argument("--prefix", default="sknf-sweep", help="name prefix of every namespace the bench makes")


def _learned(i: int) -> tuple[conntrack.FlowTuple, conntrack.FlowTuple]:
    """Flow i: client 10.244.1.<...> -> ClusterIP 10.96.<...>:80, DNATed to backend 10.244.1.200:8080."""
    client = f"10.244.{1 + (i >> 8) % 2}.{1 + i % 250}"
    orig = (client, f"10.96.{i >> 8}.{i & 255}", 20000 + i, 80, TCP)
    return orig, ("10.244.1.200", client, 8080, 20000 + i, TCP)


def _unrelated(i: int) -> tuple[conntrack.FlowTuple, conntrack.FlowTuple]:
    """Entry i: a UDP exchange between two addresses outside the cluster (198.18.0.0/15, RFC 2544)."""
    a = f"198.18.{(i >> 8) & 255}.{i & 255}"
    b = f"198.19.{i >> 16}.1"
    return (a, b, 1024 + i % 60000, 53, UDP), (b, a, 53, 1024 + i % 60000, UDP)


def _adds(lab: Lab, node: LabNode, n: int, span: float, tag: str) -> tuple[list[float], list[float]]:
    """n pods added one at a time, evenly over span seconds (so some meet a sweep), each followed by a
    reference without sknf (an `ip` veth pair made and deleted in the node): (ADD ms, reference ms)."""
    names = [f"{lab.prefix}-{tag}{i:03d}" for i in range(n)]
    times: list[float] = []
    refs: list[float] = []
    made: list[str] = []
    try:
        for name in names:
            pnetns.create(name)
            made.append(name)
            started = time.perf_counter()
            plugin(lab, node, "ADD", container_id(name), name)
            took = time.perf_counter() - started
            times.append(took * 1000)
            refs.append(_reference(node) * 1000)
            time.sleep(max(0.0, span / n - took))
        for name in names:
            plugin(lab, node, "DEL", container_id(name), name)
    finally:
        for name in made:
            with contextlib.suppress(OSError):
                pnetns.remove(name)
    return times, refs


def _reference(node: LabNode) -> float:
    """Seconds to make and delete a veth pair with `ip` in the node: the machine's load, without sknf."""
    started = time.perf_counter()
    for argv in (["ip", "link", "add", "skref0", "type", "veth", "peer", "name", "skref1"],
                 ["ip", "link", "del", "skref0"]):
        subprocess.run(argv, check=True, capture_output=True, preexec_fn=nsutil.preexec_enter(node.netns))
    return time.perf_counter() - started


def _insert(node: LabNode, args: argparse.Namespace) -> float:
    """Fill the node's conntrack with the unrelated entries and let one sweep run; seconds the insert took."""
    started = time.perf_counter()
    with nsutil.entered(node.netns), conntrack.Conntrack() as ct:
        ct.create((_unrelated(i) for i in range(args.entries)), timeout=7200)
    took = time.perf_counter() - started
    time.sleep(args.reconcile_interval + 1)
    return took


def _old_sweep_seconds(node: LabNode) -> float:
    """CPU seconds of one full pyroute2 dump and decode of the node's conntrack (the sweep before)."""
    from pyroute2 import Conntrack

    with nsutil.entered(node.netns):
        started = time.process_time()
        with Conntrack() as ct:
            n = sum(1 for _ in ct.dump_entries())
        took = time.process_time() - started
    if n == 0:
        raise BenchError("the old sweep's dump found no entries")
    return took


def measure(lab: Lab, args: argparse.Namespace, rows: list[tuple[str, str, str]]) -> None:
    node = lab.state.nodes[0]
    path = Path(node.config)
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "reconcile_interval": args.reconcile_interval,
                                    "datapath": "bpf"}))
    lab.restart_agent(node)
    flows = [_learned(i) for i in range(args.flows)]
    with nsutil.entered(node.netns), conntrack.Conntrack() as ct:
        ct.create(flows, timeout=7200)
    with bpfmaps.pinned(Path(f"/sys/fs/bpf/{lab.prefix}-{node.name}") / "kernel_flows") as fd:
        for _, reply in flows:
            bpfmaps.update(fd, _flow_key(reply), bpfmaps.FlowState(0))
    time.sleep(args.reconcile_interval + 1)  # one sweep has seen them
    span, half = 2 * args.reconcile_interval, max(2, args.adds // 2)
    base_cpu = cpu_share(node.agent_pid, args.seconds)
    base_adds, base_refs = _adds(lab, node, half, span, "a")
    inserted = _insert(node, args)
    with bpfmaps.pinned(Path(f"/sys/fs/bpf/{lab.prefix}-{node.name}") / "kernel_flows") as fd:
        kept = bpfmaps.count(fd)
    if kept < args.flows:
        raise BenchError(f"the sweep forgot live learned flows: {kept} of {args.flows} left")
    big_cpu = cpu_share(node.agent_pid, args.seconds)
    big_adds, big_refs = _adds(lab, node, half, span, "b")
    subprocess.run(["conntrack", "-F"], check=True, capture_output=True, preexec_fn=nsutil.preexec_enter(node.netns))
    with nsutil.entered(node.netns), conntrack.Conntrack() as ct:
        ct.create(flows, timeout=7200)
    time.sleep(args.reconcile_interval + 1)
    more = _adds(lab, node, half, span, "c")
    base_adds, base_refs = base_adds + more[0], base_refs + more[1]
    _insert(node, args)
    more = _adds(lab, node, half, span, "d")
    big_adds, big_refs = big_adds + more[0], big_refs + more[1]
    p50a, p50b = statistics.median(base_adds), statistics.median(big_adds)
    rows += [
        ("learned flows (all kept by the sweeps)", f"{kept}", f"{args.flows} backed by conntrack"),
        (f"{args.entries} unrelated entries inserted", f"{inserted:.1f} s", "ctnetlink, batched"),
        ("agent CPU at rest, 0 / N unrelated", f"{base_cpu * 100:.2f} % / {big_cpu * 100:.2f} %",
         f"+{(big_cpu - base_cpu) * 100:.2f} % of a core = {(big_cpu - base_cpu) / CPU_TARGET:.2f} of the "
         f"{CPU_TARGET * 100:.0f} % target"),
        ("CNI ADD p50, 0 / N unrelated", f"{p50a:.1f} / {p50b:.1f} ms", f"ratio {p50b / p50a:.2f}"),
        ("CNI ADD p90, 0 / N unrelated", f"{_p90(base_adds):.1f} / {_p90(big_adds):.1f} ms",
         f"ratio {_p90(big_adds) / _p90(base_adds):.2f}"),
        ("reference p50 (ip veth add+del), 0 / N", f"{statistics.median(base_refs):.1f} / "
         f"{statistics.median(big_refs):.1f} ms",
         f"ratio {statistics.median(big_refs) / statistics.median(base_refs):.2f}: the machine, not sknf"),
    ]
    if args.old_sweep:
        old = _old_sweep_seconds(node)
        rows.append(("old sweep: one pyroute2 dump of the table", f"{old:.1f} s CPU",
                     f"every {args.reconcile_interval:g} s = {old / args.reconcile_interval * 100:.0f} % of a core"))


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("sknf bench sweep: needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    rows: list[tuple[str, str, str]] = []
    try:
        with Lab(prefix=args.prefix, nodes=1, pods_per_node=1, datapath="bpf") as lab:
            try:
                measure(lab, args, rows)
            finally:
                print(f"sknf bench sweep ({args.flows} learned flows, {args.entries} unrelated conntrack entries, "
                      f"agent sweeping every {args.reconcile_interval:g} s, CPU over {args.seconds:g} s):")
                if rows:
                    report(rows)
    except (BenchError, LabError, OSError) as e:
        print(f"sknf bench sweep: {e}", file=sys.stderr)
        return 1
    return 0
