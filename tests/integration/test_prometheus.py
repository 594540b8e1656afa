"""A real Prometheus scraping the lab's agents: the dashboard's queries, the counters, `sknf stats`.

Prometheus runs in the lab's underlay namespace, which reaches every node's metrics address (the
nodes bind it on their underlay IP), and listens on that namespace's loopback. Checked:
- every PromQL expression of the Grafana dashboard runs without error and returns data for the
  lab's pods (with the variables set to "All" and to one node/namespace/pod);
- Prometheus's counters equal what `sknf stats` reports, and the bytes a pod sent over TCP;
- a deleted pod's series go stale in Prometheus (no leftover series);
- a frame the kernel really drops (too big for the pod's eth0) is counted, in `sknf stats` and /metrics;
- with an agent stopped, `sknf stats` on that node still reads the kernel's figures (pinned BPF maps
  or link statistics), including traffic sent while no agent ran.

Both datapaths are asked for explicitly: `datapath: bpf` makes the agents fail rather than fall back.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from leftovers import managed_lab
from promserver import Prometheus
from pyroute2 import netns as pnetns

from sknf import netlink, nsutil
from sknf.lab import METRICS_PORT, Lab, LabNode, bulk, cni_exec, run_chain, who

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "manifests" / "grafana" / "sknf-dashboard.json"
RATE_INTERVAL = "5s"  # Grafana's $__rate_interval for a 1 s scrape interval is 4 s
EXTRA = "skd-extra"  # a pod added and deleted while Prometheus watches


@pytest.fixture(scope="module", params=["bpf", "kernel"])
def lab(request: pytest.FixtureRequest):
    """bpf: the fast path (an agent that cannot load it exits: no quiet fallback); kernel: no fast-path share."""
    with managed_lab("skd", nodes=2, pods_per_node=2, datapath=request.param) as lab:
        yield lab


@pytest.fixture(scope="module")
def prom(lab: Lab):
    p = Prometheus([f"{n.underlay_ip}:{METRICS_PORT}" for n in lab.state.nodes], lab.ul)
    try:
        p.start()
        p.wait_scraped(time.time())
        assert datapath_mode(p) == lab.state.datapath  # what was asked for, on every node
        yield p
    finally:
        p.stop()
    assert p.proc is None or p.proc.returncode is not None
    assert not p.dir.exists()


def sknf_stats(node: LabNode, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`sknf stats` as a user runs it on that node: inside its namespace, with the agent's config."""
    return subprocess.run([sys.executable, "-m", "sknf", "stats", "-c", node.config, *args],
                          preexec_fn=nsutil.preexec_enter(node.netns), capture_output=True, text=True,
                          check=check, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def pods_of(node: LabNode) -> dict[str, dict]:
    return {p["pod"]: p for p in json.loads(sknf_stats(node, "-o", "json").stdout)["pods"]}


def prom_value(prom: Prometheus, metric: str, pod: str) -> float | None:
    result = prom.query(f'{metric}{{namespace="lab", pod="{pod}"}}')
    return float(result[0]["value"][1]) if result else None


def datapath_mode(prom: Prometheus) -> str:
    modes = {r["metric"]["mode"] for r in prom.query("sknf_datapath_mode == 1")}
    assert len(modes) == 1, modes
    return modes.pop()


def test_counters_match_bytes_sent_and_sknf_stats(lab: Lab, prom: Prometheus) -> None:
    n1, n2 = lab.state.nodes[:2]
    a = next(p for p in lab.state.pods if p.node == n1.name)
    b = next(p for p in lab.state.pods if p.node == n2.name)
    before_a, before_b = pods_of(n1)[a.name], pods_of(n2)[b.name]
    nbytes = 16 << 20
    ok, detail = bulk(a.netns, b.ip, nbytes)
    assert ok, detail
    after_a, after_b = pods_of(n1)[a.name], pods_of(n2)[b.name]
    sent = after_a["tx_bytes"] - before_a["tx_bytes"]
    received = after_b["rx_bytes"] - before_b["rx_bytes"]
    # Frames carry Ethernet/IP/TCP headers on top of the payload: a few percent more, never less.
    assert nbytes <= sent <= nbytes * 1.08, (sent, nbytes)
    assert nbytes <= received <= nbytes * 1.08, (received, nbytes)

    # Prometheus shows what sknf stats shows. Counters only move with traffic, so once a scrape newer
    # than a stats reading shows the same figures, they agree; a stray packet in between just retries.
    names = {"rx_bytes": "sknf_pod_receive_bytes_total", "tx_bytes": "sknf_pod_transmit_bytes_total",
             "rx_packets": "sknf_pod_receive_packets_total", "tx_packets": "sknf_pod_transmit_packets_total",
             "drops": "sknf_pod_drops_total", "fast_packets": "sknf_pod_fastpath_packets_total",
             "kernel_packets": "sknf_pod_kernelpath_packets_total"}
    mismatches: list = []
    for _attempt in range(10):
        readings = {n.name: pods_of(n) for n in lab.state.nodes}
        prom.wait_scraped(time.time())
        mismatches = [(pod, field, row[field], prom_value(prom, metric, pod))
                      for rows in readings.values() for pod, row in rows.items()
                      for field, metric in names.items()
                      if (row[field] is None and prom_value(prom, metric, pod) is not None)
                      or (row[field] is not None and prom_value(prom, metric, pod) != row[field])]
        if not mismatches:
            break
    assert not mismatches, mismatches
    assert prom_value(prom, "sknf_pod_transmit_bytes_total", a.name) >= nbytes


def grafana_variables(node: str, namespace: str, pod: str) -> dict[str, str]:
    return {"$__rate_interval": RATE_INTERVAL, "$node": node, "$namespace": namespace, "$pod": pod}


def expand(expr: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def has_data(result: list[dict]) -> bool:
    return any(not math.isnan(float(v)) for series in result for _, v in series["values"])


def test_every_dashboard_query_returns_data(lab: Lab, prom: Prometheus) -> None:
    start = time.time()
    n1 = lab.state.nodes[0]
    target = next(p for p in lab.state.pods if p.node != n1.name)
    conflist = lab.conflist(n1)
    # CNI traffic while Prometheus watches: ADD, CHECKs and DEL of one more pod, which sends a little.
    pnetns.create(EXTRA)
    try:
        kw = {"container_id": "e" * 64, "netns": nsutil.netns_path(EXTRA)}
        added = run_chain(lab.plugin_dir, "ADD", conflist, args="K8S_POD_NAMESPACE=lab;K8S_POD_NAME=extra", **kw)
        check = {**conflist["plugins"][0], "cniVersion": conflist["cniVersion"], "name": conflist["name"],
                 "prevResult": added}
        try:
            for _ in range(5):
                who(EXTRA, target.ip)
                code, out = cni_exec(lab.plugin_dir, "CHECK", check, **kw)
                assert code == 0, out
                time.sleep(1)
            assert prom_value(prom, "sknf_pod_transmit_packets_total", "extra")
        finally:
            run_chain(lab.plugin_dir, "DEL", conflist, **kw)
    finally:
        pnetns.remove(EXTRA)
    deleted = time.time()
    prom.wait_scraped(deleted)
    # The deleted pod's series are gone from the next scrape: Prometheus marks them stale at once.
    assert prom.query('{__name__=~"sknf_pod_.*", pod="extra"}') == []
    ok, detail = bulk(lab.state.pods[0].netns, target.ip, 4 << 20)  # traffic in the rate window
    assert ok, detail
    prom.wait_scraped(time.time())
    end = time.time()

    dash = json.loads(DASHBOARD.read_text())
    kernel_mode = lab.state.datapath == "kernel"
    pod = lab.state.pods[0]
    checked = 0
    for values in (grafana_variables(".*", ".*", ".*"), grafana_variables(pod.node, "lab", pod.name)):
        for panel in dash["panels"]:
            for t in panel.get("targets", []):
                expr = expand(t["expr"], values)
                result = prom.query_range(expr, start, end)  # raises with Prometheus's message if invalid
                if kernel_mode and "fastpath" in expr and "or vector" not in expr:
                    assert not has_data(result), (panel["title"], expr)  # no fast path, no series
                else:
                    assert has_data(result), (panel["title"], expr)
                checked += 1
    assert checked >= 40
    # The deleted pod was visible while it lived, in the range queries' past.
    assert prom.query_range('sknf_pod_transmit_bytes_total{pod="extra"}', start, deleted)

    # The template variables' label_values() queries, as Grafana runs them.
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        label, selector = parse_label_values(expand(var["definition"], {"$node": ".*", "$namespace": ".*"}))
        got = set(prom.api(f"label/{label}/values", **{"match[]": selector}))
        want = {"node": {n.name for n in lab.state.nodes}, "namespace": {"lab"},
                "pod": {p.name for p in lab.state.pods}}[label]
        assert want <= got, (label, got)


def parse_label_values(definition: str) -> tuple[str, str]:
    m = re.fullmatch(r"label_values\((.+), (\w+)\)", definition)
    assert m, definition
    return m.group(2), m.group(1)


def set_mtu(netns: str, mtu: int) -> int:
    """Set eth0's MTU in netns (a pod may); returns the one it had."""
    with netlink.route(nsutil.netns_path(netns)) as ipr:
        link = netlink.link_info(ipr, "eth0")
        ipr.link("set", index=link["index"], mtu=mtu)
    return link.get("IFLA_MTU")


def eth0_rx_dropped(netns: str) -> int:
    with netlink.route(nsutil.netns_path(netns)) as ipr:
        return netlink.link_info(ipr, "eth0").get("IFLA_STATS64")["rx_dropped"]


def test_a_real_drop_is_counted_in_stats_and_metrics(lab: Lab, prom: Prometheus) -> None:
    """The pod shrinks its eth0's MTU; frames from the node bigger than that are dropped by the veth (on the
    kernel path in both datapaths). Each one must show up as a drop of that pod, in `sknf stats` and /metrics."""
    node = lab.state.nodes[0]
    pod = next(p for p in lab.state.pods if p.node == node.name)
    count = 20
    before, pod_before = pods_of(node)[pod.name], eth0_rx_dropped(pod.netns)
    mtu = set_mtu(pod.netns, 1000)
    try:
        with nsutil.entered(node.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            for _ in range(count):
                sock.sendto(b"d" * 1200, (pod.ip, 9))  # fits the bridge (and the host veth), not the pod
                time.sleep(0.01)
    finally:
        set_mtu(pod.netns, mtu)
        with nsutil.entered(pod.netns), open("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", "w") as f:
            f.write("1")  # back above 1280 the kernel made eth0's IPv6 anew, enabled: as the ADD left it
        time.sleep(0.5)  # the refusals of what it sent meanwhile are counted before the next read
    assert eth0_rx_dropped(pod.netns) - pod_before == count  # the pod's own view: all of them were dropped
    after = pods_of(node)[pod.name]
    # Raising the MTU back above 1280 re-creates the pod's IPv6 state, whose first frame the source
    # validation refuses: a drop too, by its own reason. The veth's drops are the rest.
    refused = sum(after["refused"].values()) - sum(before["refused"].values())
    drops = after["drops"]
    assert drops - before["drops"] - refused == count
    prom.wait_scraped(time.time())
    assert prom_value(prom, "sknf_pod_drops_total", pod.name) == drops


def test_stats_with_the_agent_stopped(lab: Lab, prom: Prometheus) -> None:
    """Last test of the module: it stops node 2's agent (a process the lab started for this test).

    The kernel keeps counting: BPF programs into their pinned maps, the kernel path into link statistics.
    """
    n2 = lab.state.nodes[1]
    source = {"bpf": "bpf-pins", "kernel": "kernel-links"}[lab.state.datapath]
    sender = next(p for p in lab.state.pods if p.node == n2.name)
    peer = next(p for p in lab.state.pods if p.node != n2.name)
    with_agent = pods_of(n2)
    lab.stop_agent(n2)  # SIGTERM by PID, reaped
    nbytes = 4 << 20
    ok, detail = bulk(sender.netns, peer.ip, nbytes)  # traffic while no agent runs
    assert ok, detail
    out = sknf_stats(n2, "-o", "json")
    doc = json.loads(out.stdout)
    assert doc["source"] == source and doc["datapath"]["mode"] == lab.state.datapath
    rows = {p["pod"]: p for p in doc["pods"]}
    assert set(rows) == set(with_agent)
    for name, row in rows.items():
        assert row["rx_bytes"] >= with_agent[name]["rx_bytes"] > 0
        if source == "bpf-pins":
            assert row["fast_packets"] >= with_agent[name]["fast_packets"]
        else:
            assert row["fast_packets"] is None
    assert rows[sender.name]["tx_bytes"] - with_agent[sender.name]["tx_bytes"] >= nbytes
    table = sknf_stats(n2).stdout
    assert f"source {source}" in table and sender.name in table
