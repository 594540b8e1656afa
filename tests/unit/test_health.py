"""Peer health without the network: probe targets, the pacer's cap, verdicts, the ICMP packet, the log buffer,
and a probe round against loopback (raw ICMP needs root: skipped otherwise)."""

from __future__ import annotations

import itertools
import os
import struct
import threading
import time

import pytest

from sknf import health
from sknf.logbuffer import LogBuffer
from sknf.peers import Node, PeersFileError, parse_nodes


def test_two_probes_per_peer_and_none_for_this_node() -> None:
    peers = [Node("n1", "192.0.2.1", "10.244.1.0/24"), Node("n2", "192.0.2.2", "10.244.2.0/24"),
             Node("n3", "192.0.2.3")]
    assert health.targets_of(peers, "n1") == [
        health.Target("n2", "underlay", "192.0.2.2"), health.Target("n2", "overlay", "10.244.2.1"),
        health.Target("n3", "underlay", "192.0.2.3")]


def test_the_pacer_caps_every_caller_together() -> None:
    pacer = health.Pacer(rate=200)
    slots: list[float] = []
    threads = [threading.Thread(target=lambda: slots.extend(pacer.reserve() for _ in range(10))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    slots.sort()
    assert min(b - a for a, b in itertools.pairwise(slots)) >= 1 / 200 - 1e-9
    assert slots[-1] - slots[0] >= 29 / 200 - 1e-9


def test_the_cycle_stretches_to_fit_the_cap() -> None:
    h = health.PeerHealth("n1", list)
    assert h.cycle_seconds(10) == 60.0
    assert h.cycle_seconds(2 * 5000) == 200.0  # 5,000 peers, two probes each, at 50/s


def _row(under: bool | None, over: bool | None) -> dict:
    def path(ok: bool | None) -> dict | None:
        return None if ok is None else {"probed": True, "ok": ok}
    return {"underlay": path(under), "overlay": path(over)}


@pytest.mark.parametrize(("under", "over", "state"), [
    (True, True, "reachable"), (True, False, "overlay"), (False, False, "underlay"),
    (False, True, "icmp-filtered"), (True, None, "reachable"), (False, None, "underlay")])
def test_verdict_names_the_path_at_fault(under: bool, over: bool | None, state: str) -> None:
    assert health.verdict(_row(under, over)) == state


def test_echo_request_checksums_to_zero() -> None:
    packet = health.echo_request(0x1234, 7)
    assert packet[0] == health.ICMP_ECHO and struct.unpack("!HH", packet[4:8]) == (0x1234, 7)
    assert health._checksum(packet) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="raw ICMP sockets need root")
def test_a_round_against_loopback_is_paced() -> None:
    """Loopback only (nothing leaves the machine); unanswered probes are the lab test's part."""
    targets = [health.Target(f"lo{i}", "underlay", f"127.0.0.{i}") for i in range(1, 6)]
    started = time.monotonic()
    got = health.probe(targets, health.Pacer(rate=50), timeout=0.3)
    assert all(o.rtt is not None and o.rtt < 0.3 for o in got.values())
    assert 4 / 50 <= time.monotonic() - started < 2


def test_the_log_buffer_is_bounded_in_lines_and_width() -> None:
    import logging

    buf = LogBuffer(lines=5, width=40)
    buf.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("sknf.test.buffer")
    logger.addHandler(buf)
    logger.setLevel(logging.INFO)
    try:
        for i in range(20):
            logger.info("line %d %s", i, "x" * 100)
    finally:
        logger.removeHandler(buf)
    lines = buf.tail()
    assert len(lines) == 5 and all(len(line) <= 40 for line in lines)
    assert "line 19" in lines[-1] and buf.tail(2) == lines[-2:]


def test_peers_file_mtu_is_optional_and_checked() -> None:
    nodes = parse_nodes({"nodes": [{"name": "a", "underlay_ip": "192.0.2.1", "mtu": 1450},
                                   {"name": "b", "underlay_ip": "192.0.2.2"}]}, "peers.yaml")
    assert [n.mtu for n in nodes] == [1450, None]
    for bad in (100, "1450", True, 10000):
        with pytest.raises(PeersFileError, match="mtu"):
            parse_nodes({"nodes": [{"name": "a", "underlay_ip": "192.0.2.1", "mtu": bad}]}, "peers.yaml")


def test_an_icmpv6_echo_request_and_its_reply() -> None:
    packet = health.echo_request(0x1234, 7, family=6)
    assert packet[0] == health.ICMP6_ECHO and struct.unpack("!HH", packet[4:8]) == (0x1234, 7)
    reply = bytes([health.ICMP6_ECHO_REPLY]) + packet[1:]
    assert health._echo_reply(reply, 6) == (0x1234, 7)
    assert health._echo_reply(packet, 6) is None  # our own request, seen by the raw socket: not an answer


@pytest.mark.skipif(os.geteuid() != 0, reason="raw ICMP sockets need root")
def test_a_round_probes_both_families() -> None:
    """An IPv6 underlay (or an IPv6-only cluster's gateways) is probed with ICMPv6, beside IPv4 in one round."""
    targets = [health.Target("lo4", "underlay", "127.0.0.1"), health.Target("lo6", "underlay", "::1"),
               health.Target("lo6", "overlay", "0:0:0::1")]
    got = health.probe(targets, health.Pacer(rate=50), timeout=0.3)
    assert all(o.rtt is not None for o in got.values()), got
