"""`sknf bench datapath`: TCP throughput and request/response latency of every path a pod's packets can
take, measured side by side in one run, with the datapath targets of issue 4 as ratios.

What runs, all in namespaces this command makes (nothing touches the host's network):
- a 2-node, 2-pods-per-node dual-stack lab (`sknf.lab`) on the eBPF datapath, with realistic nodes: br_netfilter
  on, conntrack active, sknf's own MASQUERADE/FORWARD rules, and --services (1,000) extra kube-proxy-style
  ClusterIP services on top of the lab's own (a DNAT rule per service and protocol);
- the same-node limit: two namespaces joined by one plain veth at the pods' MTU. Nothing sits between
  the two ends, as nothing of the node sits inside a pod: pods hold no rules, so neither do these;
- the cross-node limit: node to node over the lab's underlay, through both nodes' conntrack and rules
  (its MTU is the underlay's 1500; pods get 1450, the rest is VXLAN's overhead).

The lab's nodes are switched between five datapaths; the pods, veths and rules stay the same:
- bridge: no sknf program anywhere, and the outer VXLAN packets through conntrack (sknf's raw-table
  NOTRACK chains emptied): the unmodified Flannel-like baseline;
- counting: sknf's programs attached, vxlan_ifindex 0 in the nodes' config map. That is the programs'
  own "not set up yet" state: every frame takes the bridge path and is still counted per pod, and no
  flow is learned (the cost of counting alone; NOTRACK off, as for bridge);
- fast path: as the agent set it up (NOTRACK on), flow events off (events_enabled 0);
- fast path, tracked: the same with NOTRACK off, to show what skipping conntrack buys;
- fast path + flow events: the same with flow events on (the agent's default, `flow_events: true`):
  each frame also looks its flow up in events_seen, each new flow is queued in the ring buffer (which
  nobody drains while the agents are stopped: past 4,096 events, queuing fails and is counted lost,
  as cheap as a success).
The agents are stopped while measuring (programs, maps and pins stay, as after any agent exit),
because a running agent's reconcile would put back within seconds what the switch removes. They are
restarted before the lab is torn down. The switch re-attaches the agent's own pinned programs.

IPv6 pod-to-pod paths are measured in the bridge and fast path states too, throughput only (this sockperf
has no IPv6), against the same limits and against IPv4 in the same state.

Each round measures throughput (iperf3, one TCP stream, the receiver's rate), then RTT (sockperf UDP
ping-pong, p50), client and server pinned to one CPU: first the six same-node paths back to back
(limit, bridge, counting, fast path, fast path tracked, fast path + events, in an order that rotates between
rounds), then
the six cross-node ones. Other work on the machine moves one-stream throughput by tens of percent within a minute, so
tests are short and rounds many, and each ratio pairs figures taken seconds apart in the same round:
printed are the median of the per-round ratios and their range; absolute figures are medians of rounds.
This is a benchmark, not a test: it prints PASS/MISS per target and exits 0 whatever they say.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import netns as pnetns

from sknf import iptables, netlink, nsutil
from sknf.config import VXLAN
from sknf.config import load as load_config
from sknf.datapath import bpfmaps, tc
from sknf.datapath.bpf import OVERLAY_PROGRAMS, POD_PROGRAMS, PROGRAMS, read_pinned_counters
from sknf.lab import Lab, LabError, LabNode, LabPod

IPERF_PORT, SOCKPERF_PORT = 5201, 11111
DIRECT_CLIENT, DIRECT_SERVER, DIRECT_PREFIXLEN = "10.250.0.1", "10.250.0.2", 24

BRIDGE, COUNTING, FAST, FAST_TRACKED = "bridge", "counting", "fast path", "fast path, tracked"
EVENTS = "fast path + flow events"
STATES = (BRIDGE, COUNTING, FAST, FAST_TRACKED, EVENTS)
NOTRACK_STATES = (FAST, EVENTS)  # the others run as Flannel does: the outer VXLAN packets through conntrack
LIMITS = "limits"
GROUPS = (LIMITS, *STATES)  # measured in this order, rotated by one each round

DIRECT, UNDERLAY = "direct veth (same-node limit)", "underlay (cross-node limit)"
BRIDGE_SAME, BRIDGE_CROSS = "bridge, same node", "bridge+VXLAN, cross node"
COUNT_SAME, COUNT_CROSS = "counting, same node", "counting, cross node"
FAST_SAME, FAST_CROSS = "fast path, same node", "fast path, cross node"
EVENTS_SAME, EVENTS_CROSS = "fast path + events, same node", "fast path + events, cross node"
TRACKED_SAME, TRACKED_CROSS = "fast path+conntrack, same node", "fast path+conntrack, cross node"
# IPv6 (the lab is dual-stack): throughput only, this sockperf has no IPv6
BRIDGE6_SAME, BRIDGE6_CROSS = "IPv6 bridge, same node", "IPv6 bridge+VXLAN, cross node"
FAST6_SAME, FAST6_CROSS = "IPv6 fast path, same node", "IPv6 fast path, cross node"
IPV6_STATES = {BRIDGE: (BRIDGE6_SAME, BRIDGE6_CROSS), FAST: (FAST6_SAME, FAST6_CROSS)}


class BenchError(RuntimeError):
    pass


class Stalled(BenchError):
    """sockperf's UDP ping-pong waits forever for a lost reply, leaving no observation to report."""


@dataclass(frozen=True)
class Pair:
    """One measured path: client namespace, server namespace and address, the group it is measured in
    (a datapath state, or the limits), and the limit it is compared with."""

    name: str
    group: str
    client: str
    server: str
    ip: str
    limit: str
    metrics: tuple[str, ...] = ("gbit", "rtt")


@dataclass(frozen=True)
class Target:
    """path ÷ reference for one metric; throughput must reach the bound, RTT stay within it."""

    label: str
    metric: str  # "gbit" or "rtt"
    path: str
    reference: str
    bound: float

    def met(self, ratio: float) -> bool:
        return ratio >= self.bound if self.metric == "gbit" else ratio <= self.bound


TARGETS = (
    Target("same-node fast path throughput / direct veth", "gbit", FAST_SAME, DIRECT, 0.95),
    Target("same-node fast path RTT p50 / direct veth", "rtt", FAST_SAME, DIRECT, 1.10),
    Target("same-node fast path RTT p50 / bridge", "rtt", FAST_SAME, BRIDGE_SAME, 0.85),
    Target("cross-node fast path throughput / bridge+VXLAN", "gbit", FAST_CROSS, BRIDGE_CROSS, 1.25),
    Target("cross-node fast path throughput / underlay", "gbit", FAST_CROSS, UNDERLAY, 0.95),
    Target("cross-node fast path throughput / fast path+conntrack", "gbit", FAST_CROSS, TRACKED_CROSS, 1.00),
    Target("cross-node fast path RTT p50 / fast path+conntrack", "rtt", FAST_CROSS, TRACKED_CROSS, 1.00),
    Target("cross-node fast path RTT p50 / bridge+VXLAN", "rtt", FAST_CROSS, BRIDGE_CROSS, 0.85),
    Target("counting cost, same node: throughput / bridge", "gbit", COUNT_SAME, BRIDGE_SAME, 0.97),
    Target("counting cost, same node: RTT p50 / bridge", "rtt", COUNT_SAME, BRIDGE_SAME, 1.03),
    Target("counting cost, cross node: throughput / bridge+VXLAN", "gbit", COUNT_CROSS, BRIDGE_CROSS, 0.97),
    Target("counting cost, cross node: RTT p50 / bridge+VXLAN", "rtt", COUNT_CROSS, BRIDGE_CROSS, 1.03),
    Target("flow events cost, same node: throughput / fast path", "gbit", EVENTS_SAME, FAST_SAME, 0.97),
    Target("flow events cost, same node: RTT p50 / fast path", "rtt", EVENTS_SAME, FAST_SAME, 1.03),
    Target("flow events cost, cross node: throughput / fast path", "gbit", EVENTS_CROSS, FAST_CROSS, 0.97),
    Target("flow events cost, cross node: RTT p50 / fast path", "rtt", EVENTS_CROSS, FAST_CROSS, 1.03),
    Target("IPv6 same-node fast path throughput / IPv4's", "gbit", FAST6_SAME, FAST_SAME, 0.95),
    Target("IPv6 cross-node fast path throughput / IPv4's", "gbit", FAST6_CROSS, FAST_CROSS, 0.95),
    Target("IPv6 cross-node fast path throughput / IPv6 bridge+VXLAN", "gbit", FAST6_CROSS, BRIDGE6_CROSS, 1.25),
)


# -- load generators ------------------------------------------------------------------------------

def _preexec(netns: str, cpu: int) -> Callable[[], None]:
    """A child enters the namespace and stays on one CPU (client and server share it, as in datapath-facts)."""
    enter = nsutil.preexec_enter(netns)

    def setup() -> None:
        enter()
        os.sched_setaffinity(0, {cpu})

    return setup


@contextlib.contextmanager
def servers(pairs: list[Pair], cpu: int) -> Iterator[None]:
    """An iperf3 server at every server address, and a sockperf one where RTT is measured; killed by PID on
    exit."""
    procs: list[tuple[subprocess.Popen, str, int]] = []
    try:
        for netns, ip, metrics in dict.fromkeys((p.server, p.ip, p.metrics) for p in pairs):
            table = "6" if ":" in ip else ""  # /proc/net/tcp6 lists IPv6 sockets
            wanted = [(["iperf3", "-s", "-B", ip, "-p", str(IPERF_PORT)], "tcp" + table, IPERF_PORT)]
            if "rtt" in metrics:
                wanted.append((["sockperf", "server", "-i", ip, "-p", str(SOCKPERF_PORT)], "udp" + table,
                               SOCKPERF_PORT))
            for argv, proto, port in wanted:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, preexec_fn=_preexec(netns, cpu))
                procs.append((proc, proto, port))
        for proc, proto, port in procs:
            _wait_bound(proc, proto, port)
        yield
    finally:
        for proc, _, _ in procs:
            proc.kill()
            proc.wait()


def _wait_bound(proc: subprocess.Popen, proto: str, port: int, timeout: float = 10) -> None:
    """Until the server's socket is bound: /proc/<pid>/net/<proto> is the table of the server's namespace."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{' '.join(proc.args)}: exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            lines = Path(f"/proc/{proc.pid}/net/{proto}").read_text().splitlines()[1:]
            if any(line.split()[1].endswith(f":{port:04X}") for line in lines):
                return
        time.sleep(0.05)
    raise BenchError(f"{' '.join(proc.args)}: not listening after {timeout:.0f}s")


def _client(argv: list[str], pair: Pair, seconds: int, cpu: int) -> str:
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=seconds + 30,
                              preexec_fn=_preexec(pair.client, cpu))
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[0]} {pair.name}: no result after {seconds + 30}s") from None
    if proc.returncode != 0:
        raise BenchError(f"{argv[0]} {pair.name}: exit {proc.returncode}: {(proc.stdout + proc.stderr)[-400:]}")
    return proc.stdout


def throughput(pair: Pair, seconds: int, cpu: int) -> float:
    """Gbit/s of one TCP stream, as the receiver counted it."""
    out = _client(["iperf3", "-c", pair.ip, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"], pair, seconds, cpu)
    try:
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
    except (ValueError, KeyError):
        raise BenchError(f"iperf3 {pair.name}: no receiver figure in {out[-400:]}") from None


def rtt_p50(pair: Pair, seconds: int, cpu: int) -> float:
    """Median round trip of UDP ping-pong, in µs."""
    out = _client(["sockperf", "ping-pong", "-i", pair.ip, "-p", str(SOCKPERF_PORT), "-t", str(seconds),
                   "--full-rtt"], pair, seconds, cpu)
    found = re.search(r"percentile 50\.000 =\s*([0-9.]+)", out)
    if not found:
        error = Stalled if "No valid observations" in out else BenchError
        raise error(f"sockperf {pair.name}: no p50 in {out[-400:]}")
    return float(found.group(1))


def rtt_p50_retried(pair: Pair, seconds: int, cpu: int, stalls: list[str], attempts: int = 3) -> float:
    """rtt_p50, repeated when a lost datagram stalled it. Under load, other traffic on the CPU can fill
    the per-CPU backlog that veths deliver through, and a ping-pong never recovers from its one loss."""
    for _ in range(attempts - 1):
        try:
            return rtt_p50(pair, seconds, cpu)
        except Stalled:
            stalls.append(pair.name)
    return rtt_p50(pair, seconds, cpu)


# -- the datapath switch ------------------------------------------------------------------------------

@dataclass
class NodePins:
    node: LabNode
    pin_dir: Path
    programs: dict[str, int]  # program name -> fd of the agent's pinned program
    hooks: list[tuple[int, dict[str, int]]]  # (ifindex, {program: tc hook}) for each host veth and vxsknf
    config_fd: int
    config: bpfmaps.Config  # as the agent wrote it
    events_fd: int  # events_enabled


class Switch:
    """Puts every node of a BPF lab (agents stopped) in one of STATES, through the pins the agents left."""

    def __init__(self, lab: Lab, stack: contextlib.ExitStack) -> None:
        self.nodes: dict[str, NodePins] = {}
        for node in lab.state.nodes:
            pin_dir = load_config(node.config).bpf_pin_dir
            programs = {}
            for name in PROGRAMS:
                programs[name] = bpfmaps.open_pinned(pin_dir / f"prog_{name}")
                stack.callback(os.close, programs[name])
            config_fd = stack.enter_context(bpfmaps.pinned(pin_dir / "config"))
            events_fd = stack.enter_context(bpfmaps.pinned(pin_dir / "events_enabled"))
            bpfmaps.check_layout(events_fd, ctypes.c_uint32, ctypes.c_uint32)
            bpfmaps.check_layout(config_fd, ctypes.c_uint32, bpfmaps.Config)
            config = bpfmaps.lookup(config_fd, ctypes.c_uint32(0), bpfmaps.Config)
            if not config.vxlan_ifindex:
                raise BenchError(f"the agent on {node.name} has not set its programs up (vxlan_ifindex 0)")
            with netlink.route(nsutil.netns_path(node.netns)) as ipr:
                hooks = [(netlink.link_index(ipr, p.host_ifname), POD_PROGRAMS)
                         for p in lab.state.pods if p.node == node.name]
                hooks.append((netlink.link_index(ipr, VXLAN), OVERLAY_PROGRAMS))
            self.nodes[node.name] = NodePins(node, pin_dir, programs, hooks, config_fd, config, events_fd)

    def set(self, state: str) -> None:
        for pins in self.nodes.values():
            _notrack(pins.node, state in NOTRACK_STATES)
            with netlink.route(nsutil.netns_path(pins.node.netns)) as ipr:
                for ifindex, programs in pins.hooks:
                    if state == BRIDGE:
                        tc.detach(ipr, ifindex)
                        continue
                    for name, hook in programs.items():
                        tc.attach(ipr, ifindex, hook, pins.programs[name], tc.FILTER_PREFIX + name)
            config = bpfmaps.Config.from_buffer_copy(pins.config)
            if state == COUNTING:
                config.vxlan_ifindex = 0
            bpfmaps.update(pins.config_fd, ctypes.c_uint32(0), config)
            bpfmaps.update(pins.events_fd, ctypes.c_uint32(0), ctypes.c_uint32(int(state == EVENTS)))

    def frames(self, pod: LabPod) -> tuple[int, int]:
        """(frames sknf's programs counted for the pod, of which on the fast path), from the pinned maps."""
        pins = self.nodes[pod.node]
        with nsutil.entered(pins.node.netns):
            c = read_pinned_counters(pins.pin_dir)[pod.host_ifname]
        return c.fast_packets + c.kernel_packets, c.fast_packets


def _notrack(node: LabNode, on: bool) -> None:
    """sknf's raw-table NOTRACK for the VXLAN port as the agent writes it (on), or the chains emptied
    (off: the outer packets through conntrack, as with Flannel)."""
    cfg = load_config(node.config)
    with nsutil.entered(nsutil.netns_path(node.netns)):
        backend = iptables.detect()
    chains = iptables.desired_rules(str(cfg.cluster_cidr), [], cfg.masquerade, vxlan_port=cfg.vxlan_port)
    lines = ["*raw"]
    for chain in (iptables.RAW_PREROUTING_CHAIN, iptables.RAW_OUTPUT_CHAIN):
        lines += [f":{chain} - [0:0]", *(" ".join(["-A", chain, *r]) for r in chains[chain] if on)]
    subprocess.run([backend.restore, "-w", "--noflush"], input="\n".join([*lines, "COMMIT", ""]), text=True,
                   check=True, capture_output=True, preexec_fn=nsutil.preexec_enter(node.netns))


# -- set-up ----------------------------------------------------------------------------------------

def _mtu(netns: str) -> int:
    with netlink.route(nsutil.netns_path(netns)) as ipr:
        return netlink.link_info(ipr, "eth0").get("IFLA_MTU")


@contextlib.contextmanager
def direct_pair(prefix: str, mtu: int) -> Iterator[tuple[str, str]]:
    """Two namespaces joined by one veth (eth0 on both sides); yields (client netns, server netns)."""
    names = (f"{prefix}-va", f"{prefix}-vb")
    made = []
    try:
        for name in names:
            pnetns.create(name)
            made.append(name)
        with netlink.route(nsutil.netns_path(names[0])) as ipr:
            netlink.create_veth(ipr, "eth0", "eth0", nsutil.netns_path(names[1]), mtu)
        for name, ip in zip(names, (DIRECT_CLIENT, DIRECT_SERVER), strict=True):
            with netlink.route(nsutil.netns_path(name)) as ipr:
                for link in ("lo", "eth0"):
                    ipr.link("set", index=netlink.link_index(ipr, link), state="up")
                ipr.addr("add", index=netlink.link_index(ipr, "eth0"), address=ip, prefixlen=DIRECT_PREFIXLEN)
        yield names
    finally:
        for name in made:
            with contextlib.suppress(OSError):
                pnetns.remove(name)


def lab_pairs(lab: Lab, direct: tuple[str, str]) -> list[Pair]:
    n1, n2 = lab.state.nodes[:2]
    pods = {p.name: p for p in lab.state.pods}
    src, same, cross = pods["n1p1"], pods["n1p2"], pods["n2p1"]
    pairs = [Pair(DIRECT, LIMITS, direct[0], direct[1], DIRECT_SERVER, DIRECT),
             Pair(UNDERLAY, LIMITS, n1.netns, n2.netns, n2.underlay_ip, UNDERLAY)]
    for state, same_name, cross_name in ((BRIDGE, BRIDGE_SAME, BRIDGE_CROSS), (COUNTING, COUNT_SAME, COUNT_CROSS),
                                         (FAST, FAST_SAME, FAST_CROSS), (FAST_TRACKED, TRACKED_SAME, TRACKED_CROSS),
                                         (EVENTS, EVENTS_SAME, EVENTS_CROSS)):
        pairs += [Pair(same_name, state, src.netns, same.netns, same.ip, DIRECT),
                  Pair(cross_name, state, src.netns, cross.netns, cross.ip, UNDERLAY)]
        if state in IPV6_STATES:
            same6, cross6 = IPV6_STATES[state]
            pairs += [Pair(same6, state, src.netns, same.netns, same.ip6, DIRECT, ("gbit",)),
                      Pair(cross6, state, src.netns, cross.netns, cross.ip6, UNDERLAY, ("gbit",))]
    return pairs


def node_facts(node: LabNode) -> str:
    """What makes the node realistic, read from its kernel after the run."""
    nat = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True, check=True,
                         preexec_fn=nsutil.preexec_enter(node.netns)).stdout
    rules = [line for line in nat.splitlines() if line.startswith("-A ")]
    with nsutil.entered(node.netns):  # /proc/sys/net shows the namespace of the thread that opens it
        br_nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text().strip()
        tracked = Path("/proc/sys/net/netfilter/nf_conntrack_count").read_text().strip()
    return (f"{node.name}: bridge-nf-call-iptables={br_nf}, {len(rules)} nat rules "
            f"({sum('-j DNAT' in r for r in rules)} DNAT, {sum('-j MASQUERADE' in r for r in rules)} MASQUERADE), "
            f"{tracked} conntrack entries")


# -- the run ---------------------------------------------------------------------------------------

Samples = dict[str, dict[str, list[float]]]  # path -> metric -> one value per round


@dataclass
class Results:
    samples: Samples
    frames: dict[str, list[int]]  # state -> [frames sknf counted for the probe pod, of which fast]
    stalls: list[str]  # paths whose ping-pong had to be repeated


def measure(pairs: list[Pair], switch: Switch, probe: LabPod, args: argparse.Namespace) -> Results:
    """Per round and metric, the same-node paths back to back, then the cross-node ones: compared figures
    are seconds apart. The order of the groups rotates between rounds. sknf's own counters for the probe
    pod, per state, show that each state is what it claims to be."""
    res = Results({p.name: {"gbit": [], "rtt": []} for p in pairs}, {state: [0, 0] for state in STATES}, [])
    by_group: dict[tuple[str, str], list[Pair]] = {}
    for p in pairs:
        by_group.setdefault((p.group, p.limit), []).append(p)
    tests: dict[str, Callable[[Pair], float]] = {
        "gbit": lambda pair: throughput(pair, args.seconds, args.cpu),
        "rtt": lambda pair: rtt_p50_retried(pair, args.seconds, args.cpu, res.stalls),
    }
    for r in range(args.rounds):
        k = r % len(GROUPS)
        for metric, test in tests.items():
            for limit in (DIRECT, UNDERLAY):
                for pair in [p for g in GROUPS[k:] + GROUPS[:k] for p in by_group[(g, limit)] if metric in p.metrics]:
                    group = pair.group
                    if group in STATES:
                        switch.set(group)
                        before = switch.frames(probe)
                    value = test(pair)
                    if group in STATES:
                        after = switch.frames(probe)
                        res.frames[group] = [res.frames[group][i] + after[i] - before[i] for i in range(2)]
                    res.samples[pair.name][metric].append(value)
                    unit = "Gbit/s" if metric == "gbit" else "µs RTT p50"
                    print(f"round {r + 1}/{args.rounds}  {pair.name:<30} {value:7.2f} {unit}", flush=True)
    switch.set(EVENTS)  # as the agents left it (their default)
    return res


def paired(samples: Samples, path: str, reference: str, metric: str) -> list[float]:
    """path / reference for each round: both measured within the same minute."""
    return [a / b for a, b in zip(samples[path][metric], samples[reference][metric], strict=True)]


def report(pairs: list[Pair], res: Results, facts: list[str], mtus: tuple[int, int], load: tuple[str, str],
           probe: LabPod, args: argparse.Namespace) -> None:
    samples = res.samples
    print(f"\nsknf bench datapath: {args.rounds} rounds x {args.seconds} s per test; one TCP stream (iperf3) and "
          f"UDP ping-pong RTT p50 (sockperf), client and server on CPU {args.cpu}")
    print(f"load average before / after: {load[0]} / {load[1]}; MTU: pods and direct veth {mtus[0]}, "
          f"underlay {mtus[1]}")
    for line in facts:
        print(f"node {line}")
    print(f"\n{'path':<31} {'Gbit/s':>7} {'RTT p50 µs':>11} {'Gbit/s / limit':>15} {'RTT / limit':>12}")
    for p in pairs:
        gbit = statistics.median(samples[p.name]["gbit"])
        gbit_ratio = statistics.median(paired(samples, p.name, p.limit, "gbit"))
        rtt = rtt_ratio = "-"
        if "rtt" in p.metrics:
            rtt = f"{statistics.median(samples[p.name]['rtt']):.1f}"
            rtt_ratio = f"{statistics.median(paired(samples, p.name, p.limit, 'rtt')):.2f}"
        print(f"{p.name:<31} {gbit:>7.2f} {rtt:>11} {gbit_ratio:>15.2f} {rtt_ratio:>12}")
    shares = ", ".join(f"{state}: {fast / counted:.1%} of {counted}" if counted else f"{state}: none counted"
                       for state, (counted, fast) in res.frames.items())
    print(f"\nframes sknf counted for {probe.name} (on the fast path, of all): {shares}")
    if res.stalls:
        print(f"ping-pong tests repeated after a lost datagram stalled them: {len(res.stalls)} "
              f"({', '.join(sorted(set(res.stalls)))})")
    width = max(len(t.label) for t in TARGETS)
    print(f"\n{'target (median of per-round ratios)':<{width}} {'ratio':>6} {'rounds':>10} {'want':>7}")
    for t in TARGETS:
        per_round = paired(samples, t.path, t.reference, t.metric)
        ratio = statistics.median(per_round)
        want = f"{'>=' if t.metric == 'gbit' else '<='} {t.bound:.2f}"
        print(f"{t.label:<{width}} {ratio:>6.3f} {f'{min(per_round):.2f}-{max(per_round):.2f}':>10} {want:>7}  "
              f"{'PASS' if t.met(ratio) else 'MISS'}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    parser.add_argument("--seconds", type=int, default=2, help="length of each iperf3 and sockperf test (default 2)")
    parser.add_argument("--services", type=int, default=1000,
                        help="extra ClusterIP services on each node (default 1000: a realistic rule count)")
    parser.add_argument("--cpu", type=int, default=0, help="the CPU every client and server runs on (default 0)")
    parser.add_argument("--prefix", default="sknf-dp", help="name prefix of every namespace this makes")


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("sknf bench datapath: needs root (network namespaces, BPF)", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.seconds < 1 or args.services < 0:
        print("sknf bench datapath: --rounds and --seconds at least 1, --services at least 0", file=sys.stderr)
        return 2
    missing = [tool for tool in ("iperf3", "sockperf", "iptables-save") if shutil.which(tool) is None]
    if missing:
        print(f"sknf bench datapath: needs {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        with Lab(prefix=args.prefix, nodes=2, pods_per_node=2, datapath="bpf", extra_services=args.services,
                 dual_stack=True) as lab, \
                contextlib.ExitStack() as stack:
            for node in lab.state.nodes:
                lab.stop_agent(node)
            stack.callback(_restart_agents, lab)  # the lab tears down through live agents, as it was built
            switch = Switch(lab, stack)
            probe = next(p for p in lab.state.pods if p.name == "n1p1")
            mtus = (_mtu(probe.netns), _mtu(lab.state.nodes[0].netns))
            pairs = lab_pairs(lab, stack.enter_context(direct_pair(args.prefix, mtus[0])))
            stack.enter_context(servers(pairs, args.cpu))
            load_before = Path("/proc/loadavg").read_text().split()[0]
            res = measure(pairs, switch, probe, args)
            load = (load_before, Path("/proc/loadavg").read_text().split()[0])
            facts = [node_facts(n) for n in lab.state.nodes]
    except (BenchError, LabError, OSError, subprocess.SubprocessError) as e:
        print(f"sknf bench datapath: {e}", file=sys.stderr)
        return 1
    report(pairs, res, facts, mtus, load, probe, args)
    return 0


def _restart_agents(lab: Lab) -> None:
    for node in lab.state.nodes:
        with contextlib.suppress(LabError):
            lab.restart_agent(node)
