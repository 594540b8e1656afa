"""Choosing the datapath: the kernel path on request or when eBPF cannot run (with the reason), the
same connectivity and exact counters either way, and nothing stale after switching modes."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
from pathlib import Path

import pytest
from conftest import SERVICES, SVC_TCP, SVC_UDP
from topo import Cluster, Node, Snapshot, counters, tcp_bulk, tcp_who, udp_exchange

from sknf import netlink
from sknf.datapath import tc as tcmod
from sknf.datapath.bpf import BPF_DIR, BpfDatapath, BpfUnavailable
from sknf.datapath.bpfload import UNITS
from sknf.datapath.select import choose

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.slow]

MiB = 1 << 20


def chooser(datapath: str, bpf_dir: Path = BPF_DIR):
    return lambda cfg: choose(dataclasses.replace(cfg, datapath=datapath), bpf_dir)


def sknf_filters_anywhere(node: Node) -> list[tuple[str, str]]:
    def read() -> list[tuple[str, str]]:
        with netlink.route() as ipr:
            return [(link.get("IFLA_IFNAME"), name) for link in ipr.get_links()
                    for _hook, name, _prio in tcmod.sknf_filters(ipr, link["index"])]
    return node.call(read)


def broken_sources(tmp_path: Path, unit: str, old: str, new: str) -> Path:
    target = tmp_path / "bpf"
    shutil.copytree(BPF_DIR, target)
    path = target / unit
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return target


def assert_connectivity(cluster: Cluster) -> None:
    a = cluster.pod(1, 1)
    for dst in (cluster.pod(1, 2), cluster.pod(2, 1)):
        assert tcp_who(a, dst.ip) == (a.ip, dst.name)
        assert udp_exchange(a, dst.ip, 20, 500) == 20
    for vip, where in SERVICES.items():
        assert tcp_who(a, vip, SVC_TCP) == (a.ip, cluster.pod(*where).name)
        assert udp_exchange(a, vip, 20, 500, port=SVC_UDP) == 20


def test_kernel_mode_gives_the_same_connectivity_and_exact_counters(serving: Cluster) -> None:
    for node in serving.nodes:
        dp = node.start(chooser("kernel"))
        assert (dp.mode, dp.reason) == ("kernel", "datapath: kernel in config")
    assert_connectivity(serving)
    a, b, r = serving.pod(1, 1), serving.pod(1, 2), serving.pod(2, 1)
    snap = Snapshot(serving, a, b, r)
    assert tcp_bulk(a, b.ip, 4 * MiB) == 4 * MiB
    assert tcp_bulk(a, r.ip, 4 * MiB) == 4 * MiB
    assert udp_exchange(r, a.ip, 500, 1000) == 500
    asked, answered = 500 * 1000, 500 * len(f"{r.ip} {a.name} 1000")  # labserver's answer to each datagram
    snap.assert_exact({a.name: (8 * MiB + answered, asked), b.name: (0, 4 * MiB),
                       r.name: (asked, 4 * MiB + answered)})
    c = counters(serving, a)
    assert c.fast_packets is None and c.kernel_packets is None
    assert set(serving.nodes[0].call(serving.nodes[0].datapath.read_counters)) == {a.host_ifname, b.host_ifname}


def test_auto_falls_back_when_sources_are_missing(cluster: Cluster, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    node = cluster.nodes[0]
    caplog.set_level(logging.WARNING, logger="sknf.datapath.select")
    dp = node.start(chooser("auto", tmp_path / "nowhere"))
    assert dp.mode == "kernel" and "nowhere" in dp.reason
    assert [r.getMessage() for r in caplog.records].count(f"eBPF datapath unavailable, using the kernel path: "
                                                          f"{dp.reason}") == 1
    assert not node.cfg.bpf_pin_dir.exists()
    with pytest.raises(BpfUnavailable, match="nowhere"):
        node.call(chooser("bpf", tmp_path / "nowhere"), node.cfg)


def test_auto_falls_back_on_a_compile_error(cluster: Cluster, tmp_path: Path) -> None:
    node = cluster.nodes[0]
    bad = broken_sources(tmp_path, "to_pod.c", "int to_pod(", "this is not C;\nint to_pod(")
    dp = node.start(chooser("auto", bad))
    assert dp.mode == "kernel"
    assert "Failed to compile" in dp.reason and "to_pod.c" in dp.reason and "error:" in dp.reason
    assert not node.cfg.bpf_pin_dir.exists() and sknf_filters_anywhere(node) == []


def test_auto_falls_back_on_a_verifier_rejection(cluster: Cluster, tmp_path: Path) -> None:
    node = cluster.nodes[0]
    bad = broken_sources(tmp_path, "to_pod.c", "\treturn TC_ACT_OK;\n}", "\treturn *(__u8 *)(long)skb->data;\n}")
    dp = node.start(chooser("auto", bad))
    assert dp.mode == "kernel"
    assert "Failed to load BPF program b'to_pod'" in dp.reason and "outside of the packet" in dp.reason
    assert not node.cfg.bpf_pin_dir.exists() and sknf_filters_anywhere(node) == []


def test_switching_modes_leaves_nothing_stale(serving: Cluster) -> None:
    for node in serving.nodes:
        assert node.start(chooser("bpf")).mode == "bpf"
    node = serving.nodes[0]
    assert {name for _, name in sknf_filters_anywhere(node)} == {
        "sknf_from_pod", "sknf_to_pod", "sknf_from_overlay", "sknf_to_overlay"}
    assert {p.name for p in node.cfg.bpf_pin_dir.iterdir()} >= {"endpoints", "pod_counters", "config",
                                                               "kernel_flows", "prog_from_pod"}
    for n in serving.nodes:  # restart both agents with `datapath: kernel`
        n.stop()
        assert n.start(chooser("kernel")).mode == "kernel"
        assert sknf_filters_anywhere(n) == [] and not n.cfg.bpf_pin_dir.exists()
    assert_connectivity(serving)
    for n in serving.nodes:  # and back
        n.stop()
        assert n.start(chooser("auto")).mode == "bpf"
    assert_connectivity(serving)
    for n in serving.nodes:  # uninstall
        n.call(n.datapath.cleanup)
        assert sknf_filters_anywhere(n) == [] and not n.cfg.bpf_pin_dir.exists()
    assert_connectivity(serving)


@pytest.mark.parametrize("unit", [u for u in UNITS if u.endswith(".c")])
def test_each_program_file_compiles_on_its_own(unit: str) -> None:
    """Every attach point's file is self-contained (what a CI compile of bpf/*.c relies on)."""
    from bcc import BPF

    pins = Path(f"/sys/fs/bpf/skb-compile-{os.getpid()}")
    pins.mkdir()
    try:
        BPF(src_file=str(BPF_DIR / unit).encode(),
            cflags=[f"-I{BPF_DIR}", f"-I{BPF_DIR / 'lib'}", f'-DSKNF_PIN_DIR="{pins}"']).cleanup()
    finally:
        shutil.rmtree(pins)


def test_bpf_mode_counts_what_kernel_mode_counts(serving: Cluster) -> None:
    """The same transfer, counted by each datapath, agrees with the pods' own figures."""
    a, r = serving.pod(1, 1), serving.pod(2, 1)
    for make in (functools.partial(BpfDatapath), chooser("kernel")):
        for node in serving.nodes:
            node.stop()
            node.start(make)
        snap = Snapshot(serving, a, r)
        assert tcp_bulk(a, r.ip, 4 * MiB) == 4 * MiB
        snap.assert_exact({a.name: (4 * MiB, 0), r.name: (0, 4 * MiB)})
