"""`sknf bench cni`: CNI ADD and DEL latency of sknf next to the reference plugins, in one run.

What runs, all in namespaces this command makes (nothing touches the host's network):
- sknf: a 1-node lab (`sknf.lab`) whose real agent serves the real plugin; the plugin is exec'd in the
  node's namespace with a bare environment, as a runtime does; one lab per datapath asked for (kernel, bpf);
- reference: Debian's `bridge` plugin (isGateway; it execs `host-local` with a 0.0.0.0/0 route, its store
  in a temp dir) in a second node namespace, without ipMasq: the configuration Flannel delegates to, and
  the fair one, since sknf masquerades with one node-wide rule instead of two rules per pod;
- N pod namespaces, shared by both (each phase removes every attachment it made).
Only the first plugin of each network is timed (sknf; bridge with host-local), not sknf's portmap and
bandwidth chain entries. Rounds interleave both sides (order alternating), each round doing a
sequential phase (ADD all pods, then DEL all) and a parallel one (the same with W workers). Each
operation is timed from exec to exit. Reported: p50/p90 per side and the ratios sknf/reference, plus
where sknf's time goes: the plugin's own start-up (a VERSION exec, which never reaches the agent, next to
an exec of /bin/true timed the same way, interleaved) and the agent's handler time (the mean from its
sknf_cni_request_duration_seconds histogram).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import netns as pnetns

from sknf import nsutil
from sknf.config import host_port
from sknf.lab import METRICS_PORT, REFERENCE_PLUGINS, Lab, LabError

BARE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
REFERENCE_SUBNET = "10.99.0.0/16"


class BenchError(RuntimeError):
    pass


@dataclass
class Side:
    """One plugin under test: the executable, its netconf, and the node namespace it runs in."""

    name: str
    plugin: Path
    netconf: dict
    node_netns: str
    cni_path: str
    samples: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (phase, verb) -> seconds
    walls: dict[str, list[float]] = field(default_factory=dict)  # phase -> seconds for all pods, both verbs

    def exec(self, command: str, container_id: str, netns: str) -> float:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": nsutil.netns_path(netns),
               "CNI_IFNAME": "eth0", "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={netns}",
               "CNI_PATH": self.cni_path, "PATH": BARE_PATH}
        started = time.perf_counter()
        proc = subprocess.run([str(self.plugin)], input=json.dumps(self.netconf).encode(), env=env,
                              capture_output=True, timeout=120)
        took = time.perf_counter() - started
        if proc.returncode != 0:
            raise BenchError(f"{self.name} {command} {netns}: {proc.stdout.decode()} {proc.stderr.decode()}")
        return took


def cycle(side: Side, pods: list[str], workers: int, phase: str) -> None:
    """ADD every pod, then DEL every pod, with `workers` runtime threads in the side's node namespace."""
    started = time.perf_counter()
    for command in ("ADD", "DEL"):
        todo: queue.SimpleQueue[str] = queue.SimpleQueue()
        for pod in pods:
            todo.put(pod)
        times: list[float] = []
        errors: list[BaseException] = []

        def work(command: str = command, todo: queue.SimpleQueue[str] = todo, times: list[float] = times,
                 errors: list[BaseException] = errors) -> None:
            with nsutil.entered(side.node_netns):  # children inherit this thread's namespace
                while not errors:
                    try:
                        pod = todo.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        times.append(side.exec(command, f"bench-{pod}", pod))
                    except BaseException as e:
                        errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        side.samples.setdefault((phase, command), []).extend(times)
    side.walls.setdefault(phase, []).append(time.perf_counter() - started)


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1] if len(values) > 1 \
        else values[0]


# -- the sknf side's breakdown ------------------------------------------------------------------

def agent_handler_seconds(lab: Lab) -> dict[str, tuple[float, float]]:
    """command -> (sum, count) of successful requests from the agent's own histogram."""
    node = lab.state.nodes[0]
    url = f"http://{host_port(node.underlay_ip, METRICS_PORT)}/metrics"
    with nsutil.entered(node.netns), urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list[float]] = {}
    for kind, command, value in re.findall(
            r'^sknf_cni_request_duration_seconds_(sum|count)\{[^}]*command="(\w+)"[^}]*result="success"[^}]*\}'
            r" (\S+)$", text, re.MULTILINE):
        out.setdefault(command, [0.0, 0.0])[0 if kind == "sum" else 1] += float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


def plugin_start(side: Side, n: int = 200) -> tuple[float, float]:
    """p50 of a VERSION exec (the plugin's own start to exit, without the agent) and of /bin/true exec'd
    the same way, interleaved so both see the same load."""
    netconf = json.dumps({"cniVersion": "1.0.0"}).encode()
    times: dict[str, list[float]] = {str(side.plugin): [], "/bin/true": []}
    for _ in range(n):
        for binary, samples in times.items():
            started = time.perf_counter()
            subprocess.run([binary], input=netconf, env={"CNI_COMMAND": "VERSION", "PATH": BARE_PATH},
                           capture_output=True, check=True)
            samples.append(time.perf_counter() - started)
    return statistics.median(times[str(side.plugin)]), statistics.median(times["/bin/true"])


# -- set-up ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def namespaces(names: list[str]) -> Iterator[None]:
    made = []
    try:
        for name in names:
            pnetns.create(name)
            made.append(name)
        yield
    finally:
        for name in made:
            with contextlib.suppress(OSError):
                pnetns.remove(name)


def reference_netconf(data_dir: Path) -> dict:
    return {"cniVersion": "1.0.0", "name": "skbench-ref", "type": "bridge", "bridge": "refbr0",
            "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": REFERENCE_SUBNET}]],
                     "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(data_dir)}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pods", type=int, default=200, help="pods per phase (at most 250: one node's /24)")
    parser.add_argument("--parallel", type=int, default=8, help="runtime workers in the parallel phase")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (order alternates)")
    parser.add_argument("--prefix", default="sknf-bench", help="name prefix of every namespace this makes")
    parser.add_argument("--datapath", default="kernel,bpf", help="comma-separated datapaths, one lab each")


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("sknf bench cni: needs root (network namespaces)", file=sys.stderr)
        return 2
    if not 1 <= args.pods <= 250 or args.parallel < 1 or args.rounds < 1:
        print("sknf bench cni: --pods 1-250, --parallel and --rounds at least 1", file=sys.stderr)
        return 2
    datapaths = args.datapath.split(",")
    if not set(datapaths) <= {"kernel", "bpf"}:
        print("sknf bench cni: --datapath takes kernel, bpf or both", file=sys.stderr)
        return 2
    for datapath in datapaths:
        code = run_one(args, datapath)
        if code:
            return code
    return 0


def run_one(args: argparse.Namespace, datapath: str) -> int:
    pods = [f"{args.prefix}-p{i}" for i in range(args.pods)]
    ref_node = f"{args.prefix}-ref"
    work = Path(tempfile.mkdtemp(prefix=f"{args.prefix}-"))
    try:
        with Lab(prefix=args.prefix, nodes=1, pods_per_node=1, datapath=datapath) as lab, \
                namespaces([ref_node, *pods]):
            node = lab.state.nodes[0]
            conflist = lab.conflist(node)
            sknf = Side("sknf", lab.root / "bin" / "sknf",
                        {**conflist["plugins"][0], "cniVersion": conflist["cniVersion"], "name": conflist["name"]},
                        node.netns, lab.plugin_dir)
            reference = Side("bridge+host-local", Path(REFERENCE_PLUGINS) / "bridge",
                             reference_netconf(work / "host-local"), ref_node, REFERENCE_PLUGINS)
            agent: dict[tuple[str, str], list[float]] = {}  # (phase, verb) -> [seconds, requests] in the agent
            for r in range(args.rounds):
                for phase, workers in (("sequential", 1), ("parallel", args.parallel)):
                    for side in (sknf, reference) if r % 2 == 0 else (reference, sknf):
                        before = agent_handler_seconds(lab) if side is sknf else {}
                        cycle(side, pods, workers, phase)
                        for verb, (total, count) in (agent_handler_seconds(lab) if side is sknf else {}).items():
                            was = before.get(verb, (0.0, 0.0))
                            acc = agent.setdefault((phase, verb), [0.0, 0.0])
                            acc[0], acc[1] = acc[0] + total - was[0], acc[1] + count - was[1]
            start = plugin_start(sknf)
            mode = lab_datapath(lab)
    except (BenchError, LabError) as e:
        print(f"sknf bench cni: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(sknf, reference, args, start, agent, mode)
    return 0


def lab_datapath(lab: Lab) -> str:
    """The datapath the agent actually runs (bpf falls back to kernel when BCC cannot compile)."""
    text = (lab.node_dir(lab.state.nodes[0].name) / "agent.log").read_text(errors="replace")
    found = re.search(r"sknf agent on .* datapath (\w+)", text)
    return found.group(1) if found else "?"


def report(sknf: Side, ref: Side, args: argparse.Namespace, start: tuple[float, float],
           agent: dict[tuple[str, str], list[float]], datapath: str) -> None:
    ms = 1000
    print(f"sknf bench cni, {datapath} datapath: {args.pods} pods x {args.rounds} rounds, parallel phase with "
          f"{args.parallel} workers; per-operation latency from exec to exit, ms")
    print(f"{'phase':<11} {'verb':<4} {'sknf p50':>9} {'p90':>7} {'ref p50':>8} {'p90':>7} {'ratio p50':>10} "
          f"{'ratio p90':>10} {'sknf agent mean':>16}")
    for phase in ("sequential", "parallel"):
        for verb in ("ADD", "DEL"):
            s, r = sknf.samples[(phase, verb)], ref.samples[(phase, verb)]
            s50, s90, r50, r90 = quantile(s, .5), quantile(s, .9), quantile(r, .5), quantile(r, .9)
            seconds, count = agent.get((phase, verb), (0.0, 0.0))
            in_agent = f"{seconds / count * ms:.1f}" if count else "?"
            print(f"{phase:<11} {verb:<4} {s50 * ms:>9.1f} {s90 * ms:>7.1f} {r50 * ms:>8.1f} {r90 * ms:>7.1f} "
                  f"{s50 / r50:>10.2f} {s90 / r90:>10.2f} {in_agent:>16}")
    for phase in ("sequential", "parallel"):
        s, r = statistics.median(sknf.walls[phase]), statistics.median(ref.walls[phase])
        print(f"{phase} ADD+DEL of all pods (median of rounds): sknf {s:.2f} s, reference {r:.2f} s, "
              f"ratio {s / r:.2f}; sknf {2 * args.pods / s:.0f} ops/s")
    print(f"sknf plugin start-up alone (VERSION exec, no agent): p50 {start[0] * ms:.2f} ms, /bin/true exec'd the same "
          f"way {start[1] * ms:.2f} ms ({(start[0] - start[1]) * ms:+.2f} ms); the agent column is the handler's own "
          "time (sknf_cni_request_duration_seconds); the rest is socket, JSON and scheduling")
