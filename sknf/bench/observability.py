"""`sknf bench observability`: how long a Prometheus scrape and a `sknf stats` take on a busy node.

Set-up, in a throwaway network namespace (nothing touches the host's network):
- N host veths and an IPAM store in a temp dir holding N leases that name them, as on a node with N
  pods; the counters come from the real BPF datapath (compiled, one per-CPU entry per pod in its
  pinned map; --datapath bpf, the default) or from the veths' link statistics (--datapath kernel);
- a scrape = the agent's work for one GET /metrics: read the leases and the datapath's counters,
  render the exposition text (timed in-process, then once over HTTP on the namespace's loopback);
- `sknf stats` = a fresh `python -m sknf stats -o table` process in the namespace, timed from exec to
  exit: against a socket served by the real socket server (sknf.api) with the agent's stats handler,
  and with no agent (`-c config`: the pinned maps or link statistics, and the IPAM store, read in place).
Targets: scrape of 2,000 pods <= 100 ms, `sknf stats` of 1,000 pods <= 300 ms. Printed as
measured/target ratios (below 1 is within target); medians of several rounds.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml
from pyroute2 import netns as pnetns

from sknf import api, netlink, nsutil, stats
from sknf.bench import median_seconds
from sknf.config import HOST_VETH_PREFIX, Config
from sknf.datapath import Datapath, Endpoint, bpfmaps
from sknf.datapath.kernel import KernelDatapath
from sknf.ipam import Lease, Store
from sknf.metrics import PROMETHEUS_ACCEPT, Metrics, Snapshot, take_snapshot

SCRAPE_TARGET = 0.100
STATS_TARGET = 0.300
POD_CIDR = ipaddress.IPv4Network("10.244.0.0/20")  # room for 4,093 pods


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scrape-pods", type=int, default=2000, help="pods for the scrape (default 2000)")
    parser.add_argument("--stats-pods", type=int, default=1000, help="pods for sknf stats (default 1000)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds; the median is reported")
    parser.add_argument("--netns", default="skd-bench", help="name of the throwaway network namespace")
    parser.add_argument("--datapath", choices=("bpf", "kernel"), default="bpf",
                        help="whose counters a scrape reads (default bpf: real maps, needs BCC)")


def _leases(n: int) -> list[Lease]:
    hosts = POD_CIDR.hosts()
    next(hosts)  # the gateway
    out = []
    for i in range(n):
        cid = f"{i:064x}"
        out.append(Lease(next(hosts), cid, "eth0", f"ns-{i % 20}", f"pod-{i}",
                         f"{HOST_VETH_PREFIX}{i:011x}", f"0a:58:00:00:{i >> 8 & 255:02x}:{i & 255:02x}",
                         created=time.time()))
    return out


def _make_veths(ns: str, leases: list[Lease]) -> None:
    """One veth pair per lease inside `ns`: the host end carries the lease's name, as on a node."""
    with netlink.route(nsutil.netns_path(ns)) as ipr:
        for i, lease in enumerate(leases):
            ipr.link("add", ifname=lease.host_ifname, kind="veth", peer={"ifname": f"skdp{i:07x}"})


def _snapshot_fn(store: Store, dp: Datapath) -> Callable[[], Snapshot]:
    """The agent's snapshot: current leases joined with the datapath's counters."""
    return lambda: take_snapshot("bench", store, dp, peers=1)


def _config(ns: str, dp_kind: str, work: Path) -> Config:
    """The bench node's configuration: its IPAM state, and BPF pins under /sys/fs/bpf/<ns> (BPF only)."""
    return Config(node_name="bench", cluster_cidr=ipaddress.IPv4Network("10.244.0.0/16"), pod_cidr=POD_CIDR,
                  state_dir=work / "state", run_dir=work / "no-agent",
                  bpf_pin_dir=Path("/sys/fs/bpf") / ns if dp_kind == "bpf" else work / "no-pins")


def _bpf_datapath(ns: str, cfg: Config, leases: list[Lease]) -> Datapath:
    """The real BPF datapath (compiled, maps pinned) with every pod attached and one per-CPU counter
    entry per pod, filled as if every pod had sent and received on every CPU."""
    from sknf.datapath.bpf import BpfDatapath

    with nsutil.entered(ns):
        dp = BpfDatapath(cfg)
        with netlink.route() as ipr:
            index = netlink.host_veths(ipr, HOST_VETH_PREFIX)
        for lease in leases:  # as the agent does at ADD: tc filters and the endpoint entry
            dp.attach_pod(Endpoint(ip=str(lease.ip), mac=lease.mac, host_ifname=lease.host_ifname,
                                   host_ifindex=index[lease.host_ifname], container_id=lease.container_id,
                                   ifname=lease.ifname, namespace=lease.namespace, pod=lease.pod))
    cpus = bpfmaps.possible_cpus()
    for i, lease in enumerate(leases):
        leaf = (bpfmaps.CounterValues * cpus)()
        for cpu in range(cpus):
            leaf[cpu].rx_packets, leaf[cpu].rx_bytes = i + 1, 1500 * (i + 1)
            leaf[cpu].tx_packets, leaf[cpu].tx_bytes = i + 2, 1500 * (i + 2)
            leaf[cpu].fast_packets, leaf[cpu].kernel_packets = 2 * i + 2, 1
        bpfmaps.update(dp.maps["pod_counters"], ctypes.c_uint32(index[lease.host_ifname]), leaf)
    return dp


def _node(ns: str, cfg: Config, leases: list[Lease], dp_kind: str) -> tuple[Datapath, str]:
    """The pods' host veths in `ns` and the datapath that counts them; (datapath, description)."""
    _make_veths(ns, leases)
    if dp_kind == "bpf":
        return _bpf_datapath(ns, cfg, leases), "BPF datapath: per-CPU entries in the pinned pod_counters map"
    return KernelDatapath(cfg, "benchmark"), "kernel datapath: the host veths' link statistics"


def bench_scrape(ns: str, leases: list[Lease], dp: Datapath, rounds: int, work: Path) -> tuple[float, ...]:
    """(in-process, over-HTTP, datapath read_counters alone, body bytes) for one scrape of these pods."""
    store = Store(work / "scrape", POD_CIDR)
    store.rebuild(leases)
    metrics = Metrics("bench", _snapshot_fn(store, dp))
    with nsutil.entered(ns):  # netlink sockets and the HTTP server live in the namespace
        body, _ = metrics.exposition(PROMETHEUS_ACCEPT)
        if body.count(b"sknf_pod_receive_bytes_total{") != len(leases):
            raise RuntimeError("scrape did not show every pod")
        in_process = median_seconds(lambda: metrics.exposition(PROMETHEUS_ACCEPT), rounds)
        counters = median_seconds(dp.read_counters, rounds)
        server = metrics.serve(("127.0.0.1", 0), lambda: True)
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{server.port}/metrics",
                                             headers={"Accept": PROMETHEUS_ACCEPT})
            # urllib opens its socket in the calling thread, which is inside the namespace.
            over_http = median_seconds(lambda: urllib.request.urlopen(request, timeout=10).read(), rounds)
        finally:
            server.shutdown()
    return in_process, over_http, counters, len(body)


def bench_stats(ns: str, cfg: Config, leases: list[Lease], dp: Datapath, rounds: int,
                work: Path) -> tuple[float, float, float]:
    """Seconds for a whole `sknf stats` process of these pods: against an agent socket, with the agent
    reading the datapath per query (what users get) and with a ready reply (the client alone); and with
    no agent, reading the node itself (pinned maps or link statistics, and the IPAM store)."""
    store = Store(cfg.state_dir, POD_CIDR)
    store.rebuild(leases)
    snapshot = _snapshot_fn(store, dp)
    sampler = stats.Sampler()

    def handle(_req: dict) -> dict:
        with nsutil.entered(ns):
            return stats.handle_query(sampler, snapshot())

    with nsutil.entered(ns):
        sampler.tick(snapshot())
    ready = handle({})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

    def timed(*args: str, netns: str | None = None) -> float:
        argv = [sys.executable, "-m", "sknf", "stats", *args]
        run = functools.partial(subprocess.run, argv, capture_output=True, text=True, env=env,
                                preexec_fn=nsutil.preexec_enter(netns) if netns else None)
        out = run()
        if out.returncode or len(out.stdout.splitlines()) != len(leases) + 2:
            raise RuntimeError(f"sknf stats {' '.join(args)} gave {len(out.stdout.splitlines())} lines for "
                               f"{len(leases)} pods: {out.stderr.strip()}")
        return median_seconds(run, rounds)

    results = []
    for name, handler in (("live", handle), ("ready", lambda _req: ready)):
        sock = work / name / "sknf.sock"
        server = api.serve(sock, {"stats": handler}, peer_uid=os.getuid())
        try:
            results.append(timed("--socket", str(sock)))
        finally:
            server.shutdown()
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({"node_name": cfg.node_name, "cluster_cidr": str(cfg.cluster_cidr),
                                      "pod_cidr": str(POD_CIDR), "state_dir": str(cfg.state_dir),
                                      "run_dir": str(cfg.run_dir), "bpf_pin_dir": str(cfg.bpf_pin_dir),
                                      "peers_file": str(work / "peers.yaml")}))  # required, never read here
    return results[0], results[1], timed("-c", str(config), netns=ns)  # the host veths are in ns


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("sknf bench observability: needs root (it creates a network namespace)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="skd-bench-"))
    pnetns.create(args.netns)
    dp = None
    try:
        with netlink.route(nsutil.netns_path(args.netns)) as ipr:
            ipr.link("set", index=netlink.link_index(ipr, "lo"), state="up")
        leases = _leases(max(args.scrape_pods, args.stats_pods))
        cfg = _config(args.netns, args.datapath, work)
        dp, what = _node(args.netns, cfg, leases, args.datapath)
        print(f"a node with {len(leases)} pods; {what}")
        scrape, scrape_http, counters, size = bench_scrape(args.netns, leases[: args.scrape_pods], dp,
                                                           args.rounds, work)
        target = f"ratio to {SCRAPE_TARGET * 1000:.0f} ms target:"
        print(f"scrape of {args.scrape_pods} pods ({size} bytes):")
        print(f"  in process  {scrape * 1000:7.1f} ms   {target} {scrape / SCRAPE_TARGET:.2f}")
        print(f"  over HTTP   {scrape_http * 1000:7.1f} ms   {target} {scrape_http / SCRAPE_TARGET:.2f}")
        print(f"  of which the datapath's read_counters: {counters * 1000:.1f} ms")
        live, client, down = bench_stats(args.netns, cfg, leases[: args.stats_pods], dp, args.rounds, work)
        target = f"ratio to {STATS_TARGET * 1000:.0f} ms target:"
        print(f"sknf stats of {args.stats_pods} pods (agent socket, table output, whole process):")
        print(f"  agent reads the datapath per query  {live * 1000:7.1f} ms   {target} {live / STATS_TARGET:.2f}")
        print(f"  agent answers a ready reply         {client * 1000:7.1f} ms   {target} {client / STATS_TARGET:.2f}")
        print(f"  agent down: reads the node itself   {down * 1000:7.1f} ms   {target} {down / STATS_TARGET:.2f}")
    finally:
        if dp is not None and args.datapath == "bpf":
            with nsutil.entered(args.netns):
                dp.cleanup()  # its filters and pins
        pnetns.remove(args.netns)  # its veths go with it
        shutil.rmtree(work, ignore_errors=True)
    return 0
