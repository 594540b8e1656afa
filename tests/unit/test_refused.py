"""Refused frames (source validation's drops by reason): the metric family, `sknf stats`, the log line."""

from __future__ import annotations

import pytest

from sknf import stats
from sknf.datapath import REFUSED_REASONS, PodCounters
from sknf.metrics import PROMETHEUS_ACCEPT, Metrics
from tests.unit.test_metrics import Node, lease, scrape, value


def refused(**counts: int) -> PodCounters:
    return PodCounters(tx_packets=100, drops=sum(counts.values()),
                       refused={r: counts.get(r, 0) for r in REFUSED_REASONS})


@pytest.mark.parametrize("accept", ["", PROMETHEUS_ACCEPT], ids=["text", "openmetrics"])
def test_series_per_pod_and_reason(accept: str) -> None:
    node = Node("kernel")
    node.add(lease(1), refused(spoofed_ip=3, ipv6=2))
    node.add(lease(2), PodCounters())  # attached before the datapath counted anything: zeros
    s = scrape(Metrics("n1", node.snapshot), accept)
    assert value(s, "sknf_pod_refused_packets_total", pod="pod-1", reason="spoofed_ip", node="n1") == 3
    assert value(s, "sknf_pod_refused_packets_total", pod="pod-1", reason="ipv6") == 2
    assert value(s, "sknf_pod_refused_packets_total", pod="pod-1", reason="spoofed_mac") == 0
    assert {x.labels["reason"] for x in s["sknf_pod_refused_packets_total"]} == set(REFUSED_REASONS)
    assert len(s["sknf_pod_refused_packets_total"]) == 2 * len(REFUSED_REASONS)


def rows(**counts: int) -> list[dict]:
    node = Node()
    node.add(lease(1), refused(**counts))
    return stats.pod_rows(node.snapshot())


def test_stats_rows_and_wide_column() -> None:
    (row,) = rows(spoofed_arp=4, protocol=1)
    assert row["refused"]["spoofed_arp"] == 4
    assert stats.refused_cell(row) == "spoofed_arp:4,protocol:1"
    assert stats.refused_cell(rows()[0]) == "-"
    reply = {"node": "n1", "source": "agent", "datapath": {"mode": "bpf", "reason": ""}, "rate_interval": None,
             "ipam": {"allocated": 1, "capacity": 253}, "overlay_peers": 1, "pods": [row]}
    assert "REFUSED" in stats.render_table(reply, wide=True)
    assert "spoofed_arp:4" in stats.render_table(reply, wide=True)
    assert "REFUSED" not in stats.render_table(reply, wide=False)


def test_log_is_rate_limited_per_pod_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    log = stats.RefusalLog(interval=60)
    assert log.observe(rows(spoofed_ip=5), now=0) == []  # the baseline: drops from before the agent started
    first = log.observe(rows(spoofed_ip=7, ipv6=1), now=1)
    assert len(first) == 2 and "2 frames dropped as spoofed_ip" in first[0] and "1 frames dropped as ipv6" in first[1]
    assert "lab" not in first[0] and "pod-1" in first[0]
    assert log.observe(rows(spoofed_ip=9, ipv6=1), now=30) == []  # within the minute: nothing, but kept
    assert log.observe(rows(spoofed_ip=10, ipv6=1), now=50) == []
    later = log.observe(rows(spoofed_ip=10, ipv6=1), now=61)
    assert len(later) == 1 and "3 frames dropped as spoofed_ip" in later[0]
    assert log.observe(rows(spoofed_ip=10, ipv6=1), now=200) == []  # no new drops: no line
    assert any("refused: pod" in r.message for r in caplog.records)


def test_log_forgets_gone_pods_and_counter_resets() -> None:
    log = stats.RefusalLog(interval=60)
    log.observe(rows(spoofed_mac=5), now=0)
    log.observe([], now=1)  # the pod is gone
    assert log.observe(rows(spoofed_mac=2), now=2) == [
        "pod default/pod-1 (10.244.1.3, sknf00000001): 2 frames dropped as spoofed_mac since the last report"]


def test_policy_drops_of_both_addresses_count_for_one_pod() -> None:
    """Dual-stack: drops counted against a pod's IPv6 address add to those against its IPv4 one."""
    import dataclasses
    from ipaddress import IPv6Address
    from types import SimpleNamespace

    from sknf.metrics import take_snapshot

    dual = dataclasses.replace(lease(1), ip6=IPv6Address("fd00:10:244:1::3"))
    store = SimpleNamespace(current=lambda: [dual], capacity=253)
    datapath = SimpleNamespace(mode="kernel", reason="", read_counters=lambda: {dual.host_ifname: refused()})
    snap = take_snapshot("n1", store, datapath, 1,  # type: ignore[arg-type]
                         policy_drops={"10.244.1.3": 2, "fd00:10:244:1::3": 3, "10.244.1.9": 7})
    (row,) = stats.pod_rows(snap)
    assert row["refused"]["policy"] == 5 and row["drops"] == 5
