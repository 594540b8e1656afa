"""NetworkPolicy rules as the BPF programs read them (bpf/lib/policy.h's policy_rules): per selected local
endpoint and direction, disjoint IPv4 peer prefixes, each with the ports allowed to it.

Why it works this way:
- An LPM trie answers with the longest matching prefix only, so the allows' peer intervals, which overlap
  (an ipBlock and a pod inside it, on other ports), are first cut into disjoint segments, each allowed
  the union of the ports of every allow covering it; adjacent segments with the same ports are joined,
  and each becomes the few prefixes that cover it exactly. A lookup then finds the one answer the
  nftables chain (sknf.policy.nft) would give by trying its rules in turn.
- Bounded: at most PORTS port ranges per prefix (SKNF_POLICY_PORTS) and MAX_PREFIXES prefixes per
  endpoint direction, and the map's room. An endpoint whose rules do not fit is returned apart: the
  programs leave it to the kernel path (ENDPOINT_POLICY), where nftables enforces the same rules. Never
  open: what does not fit is never half written.
- IPv4 only: the programs fast-path no IPv6, so IPv6 peers matter only to nftables.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from sknf.policy import DIRECTIONS, Compiled, Rules

PORTS = 16  # SKNF_POLICY_PORTS in bpf/lib/common.h
MAX_PREFIXES = 1024  # per endpoint and direction
PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}
ALL = (0, (1 << 32) - 1)

Ports = tuple[tuple[int, int, int], ...] | None  # ((IP protocol, first, last), ...) merged; None: anything
Prefix = tuple[int, int, Ports]  # (network as an int, prefix length, ports)


class TooBig(ValueError):
    """An endpoint direction's rules exceed the bounds."""


def _union(ports: Iterable[Ports]) -> Ports:
    by_proto: dict[int, list[tuple[int, int]]] = {}
    for p in ports:
        if p is None:
            return None
        for proto, first, last in p:
            by_proto.setdefault(proto, []).append((first, last))
    out: list[tuple[int, int, int]] = []
    for proto, ranges in sorted(by_proto.items()):
        merged: list[list[int]] = []
        for first, last in sorted(ranges):
            if merged and first <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], last)
            else:
                merged.append([first, last])
        out += [(proto, first, last) for first, last in merged]
    if len(out) > PORTS:
        raise TooBig(f"{len(out)} port ranges to one peer (at most {PORTS})")
    return tuple(out)


def _cidrs(lo: int, hi: int) -> Iterable[tuple[int, int]]:
    """The fewest prefixes covering exactly lo..hi."""
    while lo <= hi:
        size = (lo & -lo) if lo else 1 << 32
        while size > hi - lo + 1:
            size >>= 1
        yield lo, 32 - size.bit_length() + 1
        lo += size


def prefixes(rules: Rules) -> list[Prefix]:
    """One direction's allows as disjoint prefixes with their ports; TooBig when they do not fit."""
    edges: dict[int, list[tuple[int, Ports]]] = {}  # point -> [(+1/-1, ports)]
    for allow in rules.allows:
        ports: Ports = None if allow.ports is None else \
            tuple((PROTOCOLS[r.protocol], r.first, r.last) for r in allow.ports)
        for lo, hi in [ALL] if allow.peers is None else allow.peers:
            edges.setdefault(lo, []).append((1, ports))
            edges.setdefault(hi + 1, []).append((-1, ports))
    active: dict[Ports, int] = {}
    segments: list[list] = []  # [lo, hi, ports], adjacent ones with other ports
    points = sorted(edges)
    for at, nxt in itertools.pairwise(points):
        for delta, ports in edges[at]:
            active[ports] = active.get(ports, 0) + delta
            if not active[ports]:
                del active[ports]
        if not active:
            continue
        ports = _union(active)
        if segments and segments[-1][1] == at - 1 and segments[-1][2] == ports:
            segments[-1][1] = nxt - 1
        else:
            segments.append([at, nxt - 1, ports])
    out = [(net, length, ports) for lo, hi, ports in segments for net, length in _cidrs(lo, hi)]
    if len(out) > MAX_PREFIXES:
        raise TooBig(f"{len(out)} peer prefixes (at most {MAX_PREFIXES})")
    return out


def compile_rules(compiled: Compiled, room: int) -> tuple[dict[str, dict[str, list[Prefix]]], dict[str, str]]:
    """({IPv4 endpoint: {direction: prefixes}} for those whose rules fit in `room` prefixes in all,
    {IPv4 endpoint: why not} for the rest, which keep the kernel path)."""
    fit: dict[str, dict[str, list[Prefix]]] = {}
    kernel: dict[str, str] = {}
    for ip in sorted(ip for ip in compiled.selected() if ":" not in ip):
        try:
            mine = {d: prefixes(getattr(compiled, d)[ip]) for d in DIRECTIONS if ip in getattr(compiled, d)}
        except TooBig as e:
            kernel[ip] = str(e)
            continue
        need = sum(map(len, mine.values()))
        if need > room:
            kernel[ip] = f"policy map full ({need} prefixes do not fit)"
            continue
        room -= need
        fit[ip] = mine
    return fit, kernel
