"""`sknf stats`: units, filters, sorting, output formats, rates, and talking to the agent's socket."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
import yaml

from sknf import api, stats
from sknf.datapath import PodCounters
from sknf.datapath.flows import FlowTable
from sknf.ipam import Lease, Store
from sknf.metrics import Snapshot, render_snapshot


def lease(ns: str, pod: str, i: int) -> Lease:
    return Lease(IPv4Address(f"10.244.1.{i}"), f"{i:02d}" * 32, "eth0", ns, pod, f"sknf{i:08x}")


def snapshot(pods: list[tuple[Lease, PodCounters | None]], taken: float, mode: str = "bpf") -> Snapshot:
    return Snapshot(node="n1", datapath_mode=mode, datapath_reason="", pods=pods, ipam_allocated=len(pods),
                    ipam_capacity=253, peers=1, taken=taken)


def counters(rx: int, tx: int, fast: int | None = 0, kernel: int | None = 0, drops: int = 0) -> PodCounters:
    return PodCounters(rx_bytes=rx, rx_packets=rx // 100, tx_bytes=tx, tx_packets=tx // 100,
                       fast_packets=fast, kernel_packets=kernel, drops=drops)


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
                                         (5 * 2**20 + 2**19, "5.5 MiB"), (3 * 2**40, "3.0 TiB")])
def test_human_bytes(n: int, text: str) -> None:
    assert stats.human_bytes(n) == text


def test_human_count_and_rate() -> None:
    assert stats.human_count(999) == "999"
    assert stats.human_count(12_345) == "12.3k"
    assert stats.human_count(7_000_000) == "7.0M"
    assert stats.human_rate(None) == "-"
    assert stats.human_rate(100) == "800 bit/s"
    assert stats.human_rate(1_250_000) == "10.0 Mbit/s"
    assert stats.human_rate(2.5e9) == "20.0 Gbit/s"


def rows() -> list[dict]:
    pods = [
        (lease("default", "web-1", 2), counters(5000, 100, fast=90, kernel=10)),
        (lease("default", "web-2", 3), counters(100, 9000, fast=0, kernel=50, drops=4)),
        (lease("kube-system", "coredns-abc", 4), counters(700, 700, fast=None, kernel=None)),
        (lease("prod", "db", 10), None),
    ]
    out = stats.pod_rows(snapshot(pods, 100.0))
    stats.add_rates(out, None, None)
    return out


def names(rs: list[dict]) -> list[str]:
    return [r["pod"] for r in rs]


def test_filters() -> None:
    rs = rows()
    assert names(stats.arrange(rs, "default", None, "name")) == ["web-1", "web-2"]
    assert names(stats.arrange(rs, None, "dns", "name")) == ["coredns-abc"]
    assert names(stats.arrange(rs, None, "web-*", "name")) == ["web-1", "web-2"]
    assert names(stats.arrange(rs, None, "*-[2]", "name")) == ["web-2"]
    assert names(stats.arrange(rs, "prod", "web", "name")) == []


def test_sorts() -> None:
    rs = rows()
    assert names(stats.arrange(rs, None, None, "name")) == ["web-1", "web-2", "coredns-abc", "db"]
    assert names(stats.arrange(rs, None, None, "rx"))[:2] == ["web-1", "coredns-abc"]
    assert names(stats.arrange(rs, None, None, "tx"))[0] == "web-2"
    assert names(stats.arrange(rs, None, None, "drops"))[0] == "web-2"
    assert names(stats.arrange(rs, None, None, "fast"))[0] == "web-1"
    assert names(stats.arrange(rs, None, None, "ip")) == ["web-1", "web-2", "coredns-abc", "db"]
    # no rates known: "rate" falls back to name order
    assert names(stats.arrange(rs, None, None, "rate")) == ["web-1", "web-2", "coredns-abc", "db"]


def test_sampler_gives_current_rates() -> None:
    a, b = lease("default", "a", 2), lease("default", "b", 3)
    sampler = stats.Sampler()
    first = stats.handle_query(sampler, snapshot([(a, counters(1000, 0))], 100.0))
    assert first["rate_interval"] is None and first["pods"][0]["rx_bytes_rate"] is None
    sampler.tick(snapshot([(a, counters(1000, 0))], 100.0))
    sampler.tick(snapshot([(a, counters(3000, 0))], 101.5))  # only 0.5 s before the query: too recent
    reply = stats.handle_query(sampler, snapshot([(a, counters(5000, 400)), (b, counters(10, 10))], 102.0))
    assert reply["rate_interval"] == 2.0
    ra, rb = reply["pods"]
    assert ra["rx_bytes_rate"] == 2000.0 and ra["tx_bytes_rate"] == 200.0 and ra["rx_packets_rate"] == 20.0
    assert rb["rx_bytes_rate"] is None  # b is new: no earlier sample


def test_counter_reset_gives_no_rate() -> None:
    a = lease("default", "a", 2)
    sampler = stats.Sampler()
    sampler.tick(snapshot([(a, counters(5000, 5000))], 100.0))
    reply = stats.handle_query(sampler, snapshot([(a, counters(10, 10))], 103.0))
    assert reply["pods"][0]["rx_bytes_rate"] is None


def reply_of(rs: list[dict], mode: str = "bpf") -> dict:
    return stats.make_reply(snapshot([], 100.0, mode), rs, None, "agent")


def test_table_and_wide() -> None:
    text = stats.render(reply_of(stats.arrange(rows(), None, None, "name")), "table")
    lines = text.splitlines()
    assert lines[0].startswith("node n1  datapath bpf  pods 4  ipam 0/253")
    assert lines[1].split() == ["NAMESPACE", "POD", "IP", "RX", "TX", "RX-PKTS", "TX-PKTS", "RX-RATE",
                                "TX-RATE", "FAST%", "DROPS"]
    web1 = lines[2].split()
    assert web1[:5] == ["default", "web-1", "10.244.1.2", "4.9", "KiB"]
    assert "90%" in web1 and web1[-1] == "0"
    assert lines[4].split()[-2] == "-"  # coredns: kernel mode figures, no fast-path share
    wide = stats.render(reply_of(rows()), "wide").splitlines()
    assert wide[1].split()[-4:] == ["RX-PPS", "TX-PPS", "HOST-IF", "CONTAINER"]
    assert "sknf00000002" in wide[2]
    bare = stats.render(reply_of(rows()), "table", headers=False).splitlines()
    assert len(bare) == 4 and bare[0].split()[0] == "default"


def test_summary_shows_the_learned_flow_map() -> None:
    snap = dataclasses.replace(snapshot([], 100.0), flows=FlowTable(entries=64, capacity=64, full=True, syncing=False,
                                                                    failed_learns=3))
    reply = stats.make_reply(snap, [], None, "agent")
    assert reply["flows"] == {"entries": 64, "capacity": 64, "full": True, "syncing": False, "failed_learns": 3}
    assert "flows 64/64 FULL: all pod traffic on the kernel path" in stats.summary(reply)
    assert " flows " not in stats.summary(reply_of([], "kernel"))  # no learned-flow map in kernel mode
    text = render_snapshot(snap)
    assert 'sknf_flow_map_full{node="n1"} 1' in text and 'sknf_flow_map_failed_learns_total{node="n1"} 3' in text


def test_json_and_yaml_round_trip() -> None:
    reply = reply_of(rows())
    assert json.loads(stats.render(reply, "json")) == reply
    assert yaml.safe_load(stats.render(reply, "yaml")) == reply


def args_for(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    stats.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def agent(tmp_path: Path):
    """The real socket server (sknf.api) with the stats handler, over a fake node whose counters grow."""
    a = lease("default", "web-1", 2)
    state = {"t": 100.0, "rx": 1000}
    sampler = stats.Sampler()

    def snap() -> Snapshot:
        state["t"] += 1.0
        state["rx"] += 4000
        return snapshot([(a, counters(state["rx"], 0))], state["t"])

    sampler.tick(snap())
    path = tmp_path / "run" / "sknf.sock"
    handlers = {"stats": lambda _req: stats.handle_query(sampler, snap())}
    server = api.serve(path, handlers, peer_uid=os.getuid())
    try:
        yield path
    finally:
        server.shutdown()


def test_one_shot_via_agent(agent: Path, capsys) -> None:
    assert stats.run(args_for(["--socket", str(agent), "-o", "json"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == "agent"
    assert out["pods"][0]["rx_bytes"] == 9000
    assert out["pods"][0]["rx_bytes_rate"] == 4000.0


def test_watch_rates_between_refreshes(agent: Path, capsys) -> None:
    argv = ["--socket", str(agent), "-o", "json", "--watch", "--interval", "0.01", "--count", "3"]
    assert stats.run(args_for(argv)) == 0
    docs = [json.loads(d) for d in capsys.readouterr().out.replace("}\n{", "}\x00{").split("\x00")]
    assert len(docs) == 3
    assert [d["pods"][0]["rx_bytes"] for d in docs] == [9000, 13000, 17000]
    assert all(d["pods"][0]["rx_bytes_rate"] == 4000.0 for d in docs)


def test_nothing_reachable_says_why(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    monkeypatch.delenv("CLUSTER_CIDR", raising=False)
    assert stats.run(args_for(["--socket", str(tmp_path / "none.sock")])) == 1
    err = capsys.readouterr().err
    assert f"no agent socket at {tmp_path / 'none.sock'}" in err
    assert "give the agent's configuration (-c FILE" in err


def node_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "node_name": "n1", "cluster_cidr": "10.244.0.0/16", "pod_cidr": "10.244.1.0/24",
        "peers_file": str(tmp_path / "peers.yaml"), "state_dir": str(tmp_path / "state"),
        "run_dir": str(tmp_path / "run"), "bpf_pin_dir": str(tmp_path / "pins")}))
    return cfg


def test_agent_down_and_no_state_says_why(tmp_path: Path, capsys) -> None:
    assert stats.run(args_for(["-c", str(node_config(tmp_path))])) == 1
    err = capsys.readouterr().err
    assert f"no agent socket at {tmp_path / 'run' / 'sknf.sock'}" in err
    assert f"{tmp_path / 'state' / 'ipam' / 'store.json'}: no IPAM state" in err


def test_agent_down_reads_leases_and_links(tmp_path: Path, capsys) -> None:
    """No agent: identities from the IPAM store; counters from host veths (none exist here: zeros)."""
    store = Store(tmp_path / "state", IPv4Network("10.244.1.0/24"))
    store.allocate("c" * 64, "eth0", "default", "web-1", "sknfdeadbeef00")
    assert stats.run(args_for(["-c", str(node_config(tmp_path)), "-o", "json"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == "kernel-links" and out["node"] == "n1"
    assert out["ipam"] == {"allocated": 1, "capacity": 253}
    assert [(p["namespace"], p["pod"], p["ip"], p["rx_bytes"]) for p in out["pods"]] == [
        ("default", "web-1", "10.244.1.2", 0)]


def test_pod_filter_lists_the_policies_selecting_each_pod(agent: Path, capsys) -> None:
    rows = [{"namespace": "lab", "pod": "a", "container_id": "c" * 64,
             "policies": {"ingress": ["lab/deny", "lab/web"], "egress": ["lab/dns"]}},
            {"namespace": "lab", "pod": "b", "container_id": "d" * 64, "policies": {}},
            {"namespace": "lab", "pod": "c", "container_id": "e" * 64}]  # an agent without NetworkPolicy
    assert stats.policy_lines(rows) == ["lab/a: ingress lab/deny, lab/web; egress lab/dns",
                                        "lab/b: no NetworkPolicy selects it (all traffic allowed)"]
    assert stats.run(args_for(["--socket", str(agent), "--pod", "web"])) == 0
    assert "policies:" not in capsys.readouterr().out  # this agent enforces no policy: nothing to say
