"""tc.detach on a link: with only sknf's filters the clsact goes with them (one request); another tool's
filter on the same hook keeps the clsact and itself, and only sknf's go."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from pyroute2 import netns as pnetns

from sknf import netlink, nsutil, shaping
from sknf.datapath import tc

pytestmark = [pytest.mark.root, pytest.mark.bpf]

NETNS = "skl-tc"


@pytest.fixture
def link() -> Iterator[tuple[object, int]]:
    pnetns.create(NETNS)
    try:
        with netlink.route(nsutil.netns_path(NETNS)) as ipr:
            ipr.link("add", ifname="d0", kind="veth", peer="d1")
            index = netlink.link_index(ipr, "d0")
            ipr.link("set", index=index, state="up")
            yield ipr, index
    finally:
        with contextlib.suppress(OSError):
            pnetns.remove(NETNS)


@pytest.fixture(scope="module")
def program_fd() -> int:
    from bcc import BPF

    prog = BPF(text="int pass(struct __sk_buff *skb) { return 0; }")
    return prog.load_func(b"pass", BPF.SCHED_CLS).fd


def qdiscs(ipr, index: int) -> list[str]:
    return [q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index=index)]


def test_only_sknf_filters_go_with_the_clsact(link, program_fd: int) -> None:
    ipr, index = link
    tc.attach(ipr, index, tc.INGRESS, program_fd, "sknf_from_pod")
    tc.attach(ipr, index, tc.EGRESS, program_fd, "sknf_to_pod")
    assert len(tc.sknf_filters(ipr, index)) == 2
    assert tc.detach(ipr, index) == 2
    assert tc.sknf_filters(ipr, index) == []
    assert "clsact" not in qdiscs(ipr, index)
    assert tc.detach(ipr, index) == 0  # again: nothing left, no error


def test_another_tools_filter_stays(link, program_fd: int) -> None:
    ipr, index = link
    tc.attach(ipr, index, tc.INGRESS, program_fd, "sknf_from_pod")
    tc.attach(ipr, index, tc.EGRESS, program_fd, "sknf_to_pod")
    redirect = {"kind": "mirred", "direction": "egress", "action": "redirect",
                "ifindex": netlink.link_index(ipr, "d1")}  # as sknf's own shaping does, but not named sknf_
    ipr.tc("add-filter", "u32", index, parent=tc.INGRESS, prio=7, protocol=0x0003, target=0x10001,
           keys=["0x0/0x0+0"], action=redirect)
    assert tc.detach(ipr, index) == 2
    assert tc.sknf_filters(ipr, index) == []
    assert "clsact" in qdiscs(ipr, index)
    others = [f for f in ipr.get_filters(index=index, parent=tc.INGRESS) if f["handle"]]
    assert others and all(f.get_attr("TCA_KIND") == "u32" for f in others)


def test_removing_the_shaping_redirect_keeps_sknfs_program(link, program_fd: int) -> None:
    """A pod shaped only towards it has no redirect, and every reconcile makes sure of that: the deletion
    must name the redirect's filter exactly, or the kernel flushes the hook and the pod's BPF program
    (its source validation) goes with it."""
    ipr, index = link
    tc.attach(ipr, index, tc.INGRESS, program_fd, "sknf_from_pod")
    shaping._delete_redirect(ipr, index)  # none there: nothing to delete
    assert [name for _hook, name, _prio in tc.sknf_filters(ipr, index)] == ["sknf_from_pod"]
    redirect = {"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": netlink.link_index(ipr, "d1")}
    ipr.tc("add-filter", "u32", index, parent=tc.INGRESS, prio=shaping.FILTER_PRIO, protocol=shaping.ETH_P_ALL,
           target=0x10001, keys=["0x0/0x0+0"], action=redirect)
    assert shaping._redirect_target(ipr, index) is not None
    shaping._delete_redirect(ipr, index)
    assert shaping._redirect_target(ipr, index) is None
    assert [name for _hook, name, _prio in tc.sknf_filters(ipr, index)] == ["sknf_from_pod"]
