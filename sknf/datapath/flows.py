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
conntrack dump and the delete.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

# (saddr, daddr, sport, dport, proto): one direction of a flow, ports 0 where the protocol has none.
FlowTuple = tuple[str, str, int, int, int]
PORT_PROTOS = (socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.IPPROTO_SCTP)


def flow_tuple(saddr: str, daddr: str, sport: int | None, dport: int | None, proto: int) -> FlowTuple:
    """The tuple as the BPF programs key it: without ports for protocols that have none."""
    if proto in PORT_PROTOS:
        return saddr, daddr, sport or 0, dport or 0, proto
    return saddr, daddr, 0, 0, proto


def conntrack_tuples(entries: Iterable) -> set[FlowTuple]:
    """Both directions of every IPv4 conntrack entry (pyroute2 ConntrackEntry objects)."""
    alive = set()
    for entry in entries:
        for t in (entry.tuple_orig, entry.tuple_reply):
            if t.family == socket.AF_INET and t.saddr and t.daddr:
                alive.add(flow_tuple(t.saddr, t.daddr, t.sport, t.dport, t.proto))
    return alive


class SweepPlan(NamedTuple):
    mark: list[FlowTuple]  # unknown to conntrack for the first time: exempt now, delete next sweep
    unmark: list[FlowTuple]  # exempt, but conntrack knows the flow again
    delete: list[FlowTuple]  # exempt since the last sweep and still unknown to conntrack


def plan_sweep(learned: Mapping[FlowTuple, bool], alive: set[FlowTuple]) -> SweepPlan:
    """What to do with learned entries {tuple: exempt}, given conntrack's live tuples."""
    plan = SweepPlan([], [], [])
    for key, exempt in learned.items():
        if key in alive:
            if exempt:
                plan.unmark.append(key)
        else:
            (plan.delete if exempt else plan.mark).append(key)
    return plan


def read_conntrack() -> set[FlowTuple] | None:
    """Live IPv4 tuples of this namespace's conntrack, or None when it cannot be read.

    Without the nf_conntrack module nothing is NATed, yet nothing can be proven either: None makes
    the caller keep every entry (flows then stay on the always-correct kernel path).
    """
    from pyroute2 import Conntrack

    try:
        with Conntrack() as ct:
            return conntrack_tuples(ct.dump_entries())
    except (NetlinkError, OSError) as e:
        code = getattr(e, "code", None) or getattr(e, "errno", None)
        log.warning("cannot read conntrack (%s): learned flows kept", errno.errorcode.get(code, e))
        return None
