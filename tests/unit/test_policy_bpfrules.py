"""The BPF programs' form of the rules (sknf.policy.bpfrules): looked up as the LPM trie does (the one prefix
holding the peer, then its ports), they give what sknf.policy.allows gives for the compiled rules, and
rules beyond the bounds are refused, never truncated."""

from __future__ import annotations

import ipaddress

import pytest

from sknf.policy import Allow, Compiled, PortRange, Rules, allows, bpfrules

TCP, UDP = "TCP", "UDP"


def lpm(prefixes: list[bpfrules.Prefix], peer: str, protocol: str, port: int) -> bool:
    addr = int(ipaddress.IPv4Address(peer))
    hits = [p for net, length, p in prefixes if addr >> (32 - length) == net >> (32 - length) or length == 0]
    assert len(hits) <= 1  # disjoint: the longest match is the only one
    if not hits:
        return False
    ports = hits[0]
    return ports is None or any(proto == bpfrules.PROTOCOLS[protocol] and first <= port <= last
                                for proto, first, last in ports)


def net(cidr: str) -> tuple[int, int]:
    n = ipaddress.IPv4Network(cidr)
    return int(n.network_address), int(n.broadcast_address)


RULES = [
    Rules((), ("deny",)),
    Rules((Allow(None, None),), ("all",)),
    Rules((Allow(None, (PortRange(TCP, 80, 80),)),), ("port",)),
    # an ipBlock with an except on one port, a pod inside it on another, a range elsewhere
    Rules((Allow((net("10.0.0.0/9"), net("10.192.0.0/10")), (PortRange(TCP, 443, 443),)),
           Allow(((int(ipaddress.IPv4Address("10.0.0.7")),) * 2,), (PortRange(UDP, 53, 53), PortRange(TCP, 80, 81))),
           Allow((net("10.1.0.0/16"),), None)), ("mix",)),
]
PROBES = [(peer, proto, port) for peer in ("10.0.0.7", "10.0.0.8", "10.1.2.3", "10.130.0.1", "10.200.0.1",
                                           "192.168.1.1", "0.0.0.0", "255.255.255.255")
          for proto, port in ((TCP, 80), (TCP, 81), (TCP, 443), (UDP, 53), (UDP, 80))]


@pytest.mark.parametrize("rules", RULES, ids=[r.policies[0] for r in RULES])
def test_lookups_agree_with_the_compiled_rules(rules: Rules) -> None:
    prefixes = bpfrules.prefixes(rules)
    for peer, proto, port in PROBES:
        assert lpm(prefixes, peer, proto, port) == allows(rules, peer, proto, port), (peer, proto, port)


def test_too_many_port_ranges_or_prefixes_go_to_the_kernel_path() -> None:
    many_ports = Rules((Allow(None, tuple(PortRange(TCP, p, p) for p in range(1000, 1000 + 2 * 17, 2))),), ("p",))
    many_peers = Rules((Allow(tuple((a, a) for a in range(0, 2 * 1100, 2)), None),), ("a",))
    fits = Rules((Allow(None, (PortRange(TCP, 1, 10), PortRange(TCP, 11, 20))),), ("f",))  # merged: one range
    compiled = Compiled(ingress={"10.244.1.2": many_ports, "10.244.1.3": many_peers, "10.244.1.4": fits,
                                 "fd00::2": fits})
    fit, kernel = bpfrules.compile_rules(compiled, room=100)
    assert set(kernel) == {"10.244.1.2", "10.244.1.3"} and set(fit) == {"10.244.1.4"}
    assert fit["10.244.1.4"]["ingress"] == [(0, 0, ((6, 1, 20),))]
    _, kernel = bpfrules.compile_rules(compiled, room=0)  # the map has no room: kernel path too
    assert "10.244.1.4" in kernel
