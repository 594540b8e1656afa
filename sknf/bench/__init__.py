"""`sknf bench BENCHMARK`: one module per benchmark, listed in BENCHES.

Each module provides `add_arguments(parser)` and `run(args) -> int`, like the `sknf` subcommands.
To add a benchmark, write `sknf/bench/<name>.py` and add one line to BENCHES. All of them are
imported when `sknf bench` parses its arguments, so keep heavy imports (bcc) inside functions.
What more than one benchmark needs (median_seconds) lives here.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable

BENCHES = {
    "cni": ("sknf.bench.cni", "CNI ADD/DEL latency: sknf vs the reference bridge + host-local plugins"),
    "observability": ("sknf.bench.observability", "Prometheus scrape and `sknf stats` on a busy node"),
    "scale": ("sknf.bench.scale", "agent memory, start-up and peer programming with many pods and nodes"),
    "datapath": ("sknf.bench.datapath", "pod TCP throughput and RTT: limits, bridge, counting, eBPF fast path"),
    "bandwidth": ("sknf.bench.bandwidth", "a bandwidth-annotated pod's achieved/requested rate, per direction"),
    "sweep": ("sknf.bench.sweep", "learned-flow sweep: agent CPU and CNI ADD with a large conntrack table"),
    "policy": ("sknf.bench.policy", "NetworkPolicy compile and nftables apply with many pods and policies"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module, help_text) in BENCHES.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_text))


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(BENCHES[args.benchmark][0]).run(args) or 0)


def median_seconds(fn: Callable[[], object], rounds: int) -> float:
    """The median wall time of `rounds` calls of fn: one slow round (the shared machine) does not move it."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)
