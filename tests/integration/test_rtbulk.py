"""The reconcile's bulk netlink path (sknf.rtbulk through sknf.netlink) against the real kernel, in one
namespace of its own: 5,000 peers land in the VXLAN FDB and go again (counted with pyroute2's decoder,
not sknf's), learned MACs behind removed peers go with them, peer routes likewise, a refused entry is
named without stopping the others, and the lean link dump reads what pyroute2 reads.

Negative control: the counts are taken before each sync too, so a sync that did nothing would fail them.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import netns as pnetns

from sknf import netlink, nsutil, rtbulk
from sknf.datapath.kernel import host_veth_stats

NS = "skt-bulk"
LOCAL = "192.0.2.1"  # TEST-NET-1, held by the namespace's own veth
PEERS = 5000
TABLE = 4789


def peer_ips(count: int) -> set[str]:
    base = ipaddress.IPv4Address("198.18.0.1")  # RFC 2544's benchmarking range: nothing sends there
    return {str(base + i) for i in range(count)}


@pytest.fixture(scope="module")
def vxlan() -> Iterator[tuple[int, int]]:
    """(vxlan ifindex, underlay ifindex) in a fresh namespace entered by this thread for the module."""
    with contextlib.suppress(OSError):
        pnetns.remove(NS)
    pnetns.create(NS)
    try:
        with nsutil.entered(nsutil.netns_path(NS)), netlink.route() as ipr:
            ipr.link("add", ifname="ul0", kind="veth", peer={"ifname": "ul1"})
            ul = netlink.link_index(ipr, "ul0")
            ipr.link("set", index=ul, state="up")
            ipr.addr("add", index=ul, address=LOCAL, prefixlen=24)
            ipr.link("add", ifname="vx0", kind="vxlan", vxlan_id=1, vxlan_port=4789, vxlan_link=ul,
                     vxlan_local=LOCAL, vxlan_learning=1)
            vx = netlink.link_index(ipr, "vx0")
            ipr.link("set", index=vx, state="up")
            yield vx, ul
    finally:
        pnetns.remove(NS)


def fdb(vx: int) -> tuple[set[str], list[tuple[str, str]]]:
    """(flood VTEPs, [(learned MAC, VTEP)]) on the device, read through pyroute2."""
    with netlink.route() as ipr:
        entries = [(f.get("NDA_LLADDR"), f.get("NDA_DST")) for f in ipr.fdb("dump", ifindex=vx)
                   if f["ifindex"] == vx and f.get("NDA_DST")]
    return ({dst for mac, dst in entries if mac == netlink.ZERO_MAC},
            [(mac, dst) for mac, dst in entries if mac != netlink.ZERO_MAC])


def test_five_thousand_peers_land_in_the_fdb_and_go(vxlan: tuple[int, int]) -> None:
    vx, _ = vxlan
    wanted = peer_ips(PEERS)
    assert fdb(vx)[0] == set()
    added, removed = netlink.sync_flood_list(vx, wanted)
    assert (len(added), removed) == (PEERS, set())
    flood, _ = fdb(vx)
    assert len(flood) == PEERS and flood == wanted
    assert netlink.sync_flood_list(vx, wanted) == (set(), set())  # idempotent: nothing sent

    # Two MACs learned behind peers about to go, one behind a peer that stays.
    gone, kept = sorted(wanted)[:2], sorted(wanted)[-1]
    with netlink.route() as ipr:
        for i, ip in enumerate([*gone, kept]):
            ipr.fdb("append", ifindex=vx, lladdr=f"02:00:00:00:00:{i:02x}", dst=ip)
    remaining = set(sorted(wanted)[2500:])  # half the peers go, those two among them
    added, removed = netlink.sync_flood_list(vx, remaining)
    assert added == set() and len(removed) == PEERS - len(remaining)
    flood, learned = fdb(vx)
    assert flood == remaining and learned == [("02:00:00:00:00:02", kept)]

    assert netlink.sync_flood_list(vx, set())[1] == remaining
    assert fdb(vx) == (set(), [])


def test_peer_routes_in_bulk(vxlan: tuple[int, int]) -> None:
    _, ul = vxlan
    wanted = dict.fromkeys(peer_ips(PEERS), "192.0.2.9")

    def table() -> dict[str, tuple[str, int]]:
        with netlink.route() as ipr:
            return {r.get("RTA_DST"): (r.get("RTA_GATEWAY"), r.get("RTA_OIF"))
                    for r in ipr.get_routes(family=2, table=TABLE) if r.get("RTA_TABLE") == TABLE}

    assert table() == {}
    netlink.sync_host_routes(TABLE, ul, wanted)
    assert table() == dict.fromkeys(wanted, ("192.0.2.9", ul))
    changed = {**dict.fromkeys(sorted(wanted)[:10], "192.0.2.8"), **dict.fromkeys(sorted(wanted)[10:20], "192.0.2.9")}
    netlink.sync_host_routes(TABLE, ul, changed)
    assert table() == {dst: (gw, ul) for dst, gw in changed.items()}
    netlink.sync_host_routes(TABLE, ul, {})
    assert table() == {}


def test_a_refused_entry_is_named_and_the_others_land(vxlan: tuple[int, int]) -> None:
    vx, _ = vxlan
    good = sorted(peer_ips(3))
    requests = [(f"flood {ip}", *rtbulk.fdb_request("append", vx, netlink.ZERO_MAC, ip)) for ip in good]
    requests.insert(1, ("on a missing device", *rtbulk.fdb_request("append", 999_999, netlink.ZERO_MAC, good[0])))
    with rtbulk.Rtnl() as nl, pytest.raises(rtbulk.BulkError) as refused:
        nl.apply(requests)
    assert refused.value.failed == {"on a missing device": errno.ENODEV}
    assert fdb(vx)[0] == set(good)
    with rtbulk.Rtnl() as nl:  # the same appends again: EEXIST is benign when the caller says so
        nl.apply(requests[:1] + requests[2:], benign=(errno.EEXIST,))
    assert netlink.sync_flood_list(vx, set())[1] == set(good)


def test_lean_link_dump_reads_what_pyroute2_reads(vxlan: tuple[int, int]) -> None:
    with netlink.route() as ipr:
        ipr.link("add", ifname="sknfbulk0", kind="veth", peer={"ifname": "bulkpeer0"}, mtu=1400)
        idx = netlink.link_index(ipr, "sknfbulk0")
        netlink.set_alias(ipr, idx, '{"cid":"x"}')
        bridge = netlink.ensure_bridge(ipr, "brbulk", 1400, "02:00:00:00:01:01")
        netlink.set_port(ipr, idx, bridge)
        try:
            theirs = ipr.link("get", index=idx)[0]
            ours = netlink.host_veth_links("sknf")
            assert list(ours) == ["sknfbulk0"]
            link = ours["sknfbulk0"]
            for key in ("IFLA_IFNAME", "IFLA_MTU", "IFLA_ADDRESS", "IFLA_IFALIAS", "IFLA_LINK"):
                assert link.get(key) == theirs.get(key), key
            assert (link["index"], link["state"], link.get("IFLA_MASTER")) == (idx, theirs.get("state"),
                                                                                 theirs.get("IFLA_MASTER"))
            assert link["state"] == "up" and link["IFLA_MASTER"] == bridge
        finally:
            netlink.delete_link(ipr, "sknfbulk0")
            netlink.delete_link(ipr, "brbulk")
    assert netlink.host_veth_links("sknf") == {}


def test_one_links_addresses_both_families(vxlan: tuple[int, int]) -> None:
    """The kernel-filtered address dump reads the link's addresses as pyroute2 does, and no other link's."""
    vx, ul = vxlan
    with netlink.route() as ipr:
        ipr.addr("add", index=vx, address="fd00:b::1", prefixlen=64)
        ipr.addr("add", index=vx, address="10.99.0.1", prefixlen=16)
        try:
            for index in (ul, vx):
                theirs = {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index)}
                with rtbulk.Rtnl() as nl:
                    ours = nl.addresses(index)
                assert sorted(ours) == sorted(theirs) and len(ours) == len(set(ours)), index
            assert (LOCAL, 24) in theirs_of(ipr, ul) and (LOCAL, 24) not in set(rtbulk_addresses(vx))
            assert {("fd00:b::1", 64), ("10.99.0.1", 16)} <= set(rtbulk_addresses(vx))
        finally:
            ipr.addr("del", index=vx, address="fd00:b::1", prefixlen=64)
            ipr.addr("del", index=vx, address="10.99.0.1", prefixlen=16)


def theirs_of(ipr, index: int) -> set[tuple[str, int]]:
    return {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index)}


def rtbulk_addresses(index: int) -> list[tuple[str, int]]:
    with rtbulk.Rtnl() as nl:
        return nl.addresses(index)


def test_ipv6_settings_of_a_link_in_another_namespace(vxlan: tuple[int, int]) -> None:
    """ipv6_conf reads the far end of a veth in another namespace as that namespace's /proc/sys shows it,
    sees a change made there, says None while the link has no IPv6 state (MTU below 1280), and leaves
    out a link that is gone."""
    other = f"{NS}-far"
    pnetns.create(other)
    try:
        with netlink.route() as ipr:
            ipr.link("add", ifname="sknfbulk1", kind="veth", peer={"ifname": "farend", "net_ns_fd": other})
        host = netlink.host_veth_links("sknf")["sknfbulk1"]
        nsid, index = host["IFLA_LINK_NETNSID"], host["IFLA_LINK"]
        conf = "/proc/sys/net/ipv6/conf/farend"

        def there() -> tuple[int, int, int]:
            with nsutil.entered(other):
                return tuple(int(Path(f"{conf}/{k}").read_text()) for k in ("accept_ra", "accept_redirects",
                                                                            "disable_ipv6"))

        def read() -> tuple[int, int, int] | None:
            with rtbulk.Rtnl() as nl:
                got = nl.ipv6_conf([("far", nsid, index), ("gone", nsid, 999_999)])
            assert "gone" not in got
            c = got["far"]
            return None if c is None else (c[3], c[4], c[26])  # DEVCONF_ACCEPT_RA, _ACCEPT_REDIRECTS, _DISABLE_IPV6

        assert read() == there()
        with nsutil.entered(other):
            for key in ("accept_ra", "disable_ipv6"):
                setting = Path(f"{conf}/{key}")
                setting.write_text(str(1 - int(setting.read_text())))
        assert read() == there()  # the change made there is what is read here
        with netlink.route(nsutil.netns_path(other)) as far:
            far.link("set", index=index, mtu=1200)
            assert read() is None
            far.link("set", index=index, mtu=1500)
        assert read() == there() and there()[2] == 0  # the kernel's defaults again: IPv6 on
    finally:
        with netlink.route() as ipr:
            netlink.delete_link(ipr, "sknfbulk1")
        pnetns.remove(other)


def test_link_statistics_read_what_proc_net_dev_shows(vxlan: tuple[int, int]) -> None:
    """RTM_GETSTATS's figures per ifindex are /proc/net/dev's (links down: nothing moves in between)."""
    vx, _ = vxlan
    with netlink.route() as ipr:
        ipr.link("add", ifname="sknfbulk2", kind="veth", peer={"ifname": "bulkpeer2"})
        try:
            index = netlink.link_index(ipr, "sknfbulk2")
            ipr.link("set", index=index, state="up")  # a few IPv6 frames (DAD, MLD) would count if it stayed up
            ipr.link("set", index=netlink.link_index(ipr, "bulkpeer2"), state="up")
            time.sleep(0.5)
            ipr.link("set", index=index, state="down")
            with rtbulk.Rtnl() as nl:
                ours = nl.link_stats()
            theirs = host_veth_stats()["sknfbulk2"]
            assert ours[index].tx_packets == theirs["tx_packets"] > 0  # negative control: something was counted
            assert (ours[index].rx_bytes, ours[index].tx_bytes, ours[index].rx_dropped, ours[index].tx_dropped) == \
                (theirs["rx_bytes"], theirs["tx_bytes"], theirs["rx_dropped"], theirs["tx_dropped"])
            assert vx in ours
        finally:
            netlink.delete_link(ipr, "sknfbulk2")
