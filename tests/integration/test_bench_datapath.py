"""`sknf bench datapath` end to end, shortened: it measures every path, prints every ratio and target,
shows from sknf's own counters that each datapath state is what it claims, and leaves nothing behind.
No figure is asserted: speed is the benchmark's business, not a test's."""

from __future__ import annotations

import argparse
import re

import pytest
from leftovers import assert_lab_gone, processes_mentioning

from sknf import bench
from sknf.bench import datapath as bench_datapath

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.bpf]

PREFIX = "skgt"


def test_one_short_round_prints_every_path_ratio_and_target(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["datapath", "--rounds", "1", "--seconds", "1", "--prefix", PREFIX])
    others = set(processes_mentioning(bench_datapath.DIRECT_SERVER))  # another benchmark's servers on this machine
    try:
        assert bench.run(args) == 0
    finally:
        assert_lab_gone(PREFIX, [])  # namespaces (the direct pair's too), state, agent processes
    assert set(processes_mentioning(bench_datapath.DIRECT_SERVER)) - others == set()  # its iperf3/sockperf are gone
    out = capsys.readouterr().out
    number = r"\d+\.\d+"
    for path in (bench_datapath.DIRECT, bench_datapath.UNDERLAY, bench_datapath.BRIDGE_SAME,
                 bench_datapath.BRIDGE_CROSS, bench_datapath.COUNT_SAME, bench_datapath.COUNT_CROSS,
                 bench_datapath.FAST_SAME, bench_datapath.FAST_CROSS, bench_datapath.TRACKED_SAME,
                 bench_datapath.TRACKED_CROSS, bench_datapath.EVENTS_SAME, bench_datapath.EVENTS_CROSS):
        assert re.search(rf"^{re.escape(path)} +{number} +{number} +{number} +{number}$", out, re.MULTILINE), path
    for path in (bench_datapath.BRIDGE6_SAME, bench_datapath.BRIDGE6_CROSS, bench_datapath.FAST6_SAME,
                 bench_datapath.FAST6_CROSS):  # IPv6: throughput only (no IPv6 in this sockperf)
        assert re.search(rf"^{re.escape(path)} +{number} +- +{number} +-$", out, re.MULTILINE), path
    for target in bench_datapath.TARGETS:
        assert re.search(rf"^{re.escape(target.label)} +{number} +{number}-{number} +[<>]= {number}  (PASS|MISS)$",
                         out, re.MULTILINE), target.label
    # sknf's own counters: no program in the bridge state, all on the kernel path while counting, and the
    # fast path carrying (nearly) everything, tracked or not, with flow events off and on, so the states
    # really differ in what the issue says.
    shares = re.search(r"bridge: none counted, counting: 0\.0% of \d+, fast path: (\d+\.\d)% of \d+, "
                       r"fast path, tracked: (\d+\.\d)% of \d+, fast path \+ flow events: (\d+\.\d)% of \d+", out)
    assert shares, out
    assert all(float(shares.group(i)) > 90 for i in (1, 2, 3))
