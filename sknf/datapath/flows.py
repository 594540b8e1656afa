"""Forgetting learned NAT flows once conntrack has forgotten them.

The BPF programs learn, into the pinned `kernel_flows` map, the reply tuple of every pod frame that
came through the node's stack (see bpf/lib/flows.h): those flows may be NATed (Services), so their
replies must take the kernel path too. Losing a live flow's entry breaks that connection, so the map
has no LRU and no timer; entries go only when conntrack no longer knows the flow, in two steps:

1. a sweep finds an entry whose tuple no conntrack entry has (in either direction): it is marked
   exempt, and keeps working as before;
2. the next sweep deletes entries still exempt and still unknown to conntrack. A packet of the flow
   in between re-learns the entry, which clears the mark (the tuple was reused: keep it).

Deleting at first sight would race a flow being re-established over the same tuple between the
conntrack lookup and the delete. The sweep asks conntrack about each learned tuple (sknf.conntrack),
so its cost follows the learned flows, not the size of the conntrack table.

Flows that exist before the programs can learn them (the first BPF start on a node with live Service
connections, a map recreated at a new size, a map that was full) are seeded from conntrack's NATed
entries instead (`nat_reply_tuples`), while every pod frame takes the kernel path (see BpfDatapath).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from sknf import conntrack
from sknf.conntrack import PORT_PROTOS, FlowTuple

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class FlowTable:
    """The learned-flow map as metrics and `sknf stats` show it."""

    entries: int  # of the fuller learned-flow map (IPv4 or IPv6), each of `capacity` entries
    capacity: int
    full: bool  # a learn was refused: pod traffic on the kernel path until the agent made room
    syncing: bool  # the agent is seeding the map (mode transition): pod traffic on the kernel path
    failed_learns: int  # learns the full map refused, ever (since the map was created)

    @property
    def kernel_only(self) -> bool:
        return self.full or self.syncing


class SweepPlan(NamedTuple):
    mark: list[FlowTuple]  # unknown to conntrack for the first time: exempt now, delete next sweep
    unmark: list[FlowTuple]  # exempt, but conntrack knows the flow again
    delete: list[FlowTuple]  # exempt since the last sweep and still unknown to conntrack


def plan_sweep(learned: Mapping[FlowTuple, bool], alive: set[FlowTuple]) -> SweepPlan:
    """What to do with learned entries {tuple: exempt}, given which of them conntrack knows."""
    plan = SweepPlan([], [], [])
    for key, exempt in learned.items():
        if key in alive:
            if exempt:
                plan.unmark.append(key)
        else:
            (plan.delete if exempt else plan.mark).append(key)
    return plan


def alive(learned: Iterable[FlowTuple]) -> set[FlowTuple] | None:
    """The learned tuples this namespace's conntrack still knows (in either direction), or None when
    it cannot be read.

    Tuples with ports are looked up one by one (cost per learned flow, not per conntrack entry).
    Without ports (ICMP) the learned key lacks the ICMP id a lookup needs: those are matched against
    one kernel-filtered dump per protocol. Without the nf_conntrack module nothing is NATed, yet
    nothing can be proven either: None makes the caller keep every entry (flows then stay on the
    always-correct kernel path).
    """
    learned = list(learned)
    portless = {t for t in learned if t[4] not in PORT_PROTOS}
    try:
        with conntrack.Conntrack() as ct:
            found = ct.lookup(t for t in learned if t[4] in PORT_PROTOS)
            for family, proto in {(conntrack.family_of(t), t[4]) for t in portless}:
                for entry in ct.dump(proto=proto, family=family):
                    found.update({entry.orig, entry.reply} & portless)
        return found
    except OSError as e:
        log.warning("cannot read conntrack (%s): learned flows kept", errno.errorcode.get(e.errno, e))
        return None


def nat_reply_tuples(clusters: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> set[FlowTuple] | None:
    """What the programs would have learned from conntrack's NATed flows: each one's reply tuple whose
    destination is a pod (the post-NAT pod-sourced frame's reverse), and the original tuple of a pod
    to pod flow conntrack moved to another port (its tuple clashed with a Service flow's, see
    shares_kernel_flow in bpf/lib/flows.h); or None when conntrack cannot be read. One kernel-filtered
    dump per NAT kind and cluster network's family: the Python side only sees NATed entries.
    """
    seeds = set()
    try:
        with conntrack.Conntrack() as ct:
            for cluster in clusters:
                family = socket.AF_INET6 if cluster.version == 6 else socket.AF_INET
                for status in (conntrack.IPS_DST_NAT, conntrack.IPS_SRC_NAT):
                    for entry in ct.dump(status=status, family=family):
                        if ipaddress.ip_address(entry.reply[1]) in cluster:
                            seeds.add(entry.reply)
                            if ipaddress.ip_address(entry.orig[1]) in cluster:
                                seeds.add(entry.orig)
        return seeds
    except OSError as e:
        log.warning("cannot read conntrack (%s): no learned flows seeded", errno.errorcode.get(e.errno, e))
        return None
