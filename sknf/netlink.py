"""Netlink operations sknf needs, on pyroute2 (pinned: its API moves between releases).

Convergent helpers are `ensure_*`: look, create if missing, fix what differs, tolerate "already
exists" from a racing writer. Deletions tolerate "no such device/entry". Callers branch on errno,
never on message text.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from sknf import nsutil, rtbulk

ZERO_MAC = "00:00:00:00:00:00"
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
LOOPBACK_IFINDEX = 1  # the kernel's: every namespace's loopback is registered first, as index 1
IFALIAS_MAX = 255  # IFALIASZ (256) less the terminating NUL
IFA_F_NODAD = 0x02  # sknf's addresses are unique by IPAM: no duplicate address detection delay
DEFAULT_ROUTE = {4: "0.0.0.0/0", 6: "::/0"}
AF = {4: socket.AF_INET, 6: socket.AF_INET6}


def _version(ip: str) -> int:
    return ipaddress.ip_address(ip).version


def _add_addr(ipr: IPRoute, index: int, ip: str, prefixlen: int) -> None:
    """Add an address (IPv6 without DAD), tolerating one already there."""
    try:
        ipr.addr("add", index=index, address=ip, prefixlen=prefixlen,
                 **({"flags": IFA_F_NODAD} if _version(ip) == 6 else {}))
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise


@contextmanager
def route(netns: str | None = None) -> Iterator[IPRoute]:
    """An rtnetlink socket, in the current namespace or in the one at path `netns`.

    A socket belongs to the namespace it was created in, so for another namespace this thread
    steps in, opens the socket and steps back (about 1 ms); pyroute2's own `netns=` forks a
    helper process for it (6-10 ms, most of a pod ADD).
    """
    if netns:
        with nsutil.entered(netns):
            ipr = IPRoute()
    else:
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def link_index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def link_info(ipr: IPRoute, ifname: str):
    """The link message for ifname, or None. A targeted RTM_GETLINK: `get_links(ifname=)` dumps
    every link and filters in Python, which costs 50 ms on a node with a few hundred pods."""
    try:
        return ipr.link("get", ifname=ifname)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def link_kind(link) -> str | None:
    info = link.get("IFLA_LINKINFO")
    return info.get("IFLA_INFO_KIND") if info else None


def delete_link(ipr: IPRoute, ifname: str, index: int | None = None) -> bool:
    """Delete ifname if present; True if something was deleted. `index`: the caller already looked it up."""
    idx = index or link_index(ipr, ifname)
    if idx is None:
        return False
    try:
        ipr.link("del", index=idx)
    except NetlinkError as e:
        if e.code != errno.ENODEV:
            raise
        return False
    return True


def ensure_bridge(ipr: IPRoute, name: str, mtu: int, mac: str) -> int:
    """The bridge exists, is up, and has the MTU (ports with a larger MTU do not raise it) and MAC.

    A fixed MAC, because a bridge otherwise takes its lowest port's, which changes as ports come
    and go and whenever the bridge is recreated: the pods' ARP entries for a gateway address would
    then point at a MAC nobody answers to until they expire (tens of seconds without traffic).
    """
    link = link_info(ipr, name)
    if link is not None and link_kind(link) != "bridge":
        delete_link(ipr, name)
        link = None
    if link is None:
        try:
            ipr.link("add", ifname=name, kind="bridge", address=mac, br_stp_state=0, br_forward_delay=0)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        link = link_info(ipr, name)
    idx = link["index"]
    if link.get("IFLA_MTU") != mtu or link.get("state") != "up" or link.get("IFLA_ADDRESS") != mac:
        ipr.link("set", index=idx, mtu=mtu, address=mac, state="up")
    return idx


def ensure_vxlan(ipr: IPRoute, name: str, *, vni: int, port: int, dev_index: int, local_ip: str,
                 mtu: int, master: int) -> int:
    """The FDB-mode VXLAN device with these parameters exists, enslaved to master and up.

    VNI, port, underlay device and local address (its family included: an IPv6 local address makes an
    IPv6 VXLAN device, whose remotes are all IPv6) cannot change on a live device: a device that differs in
    any of them is recreated (pods on the bridge keep their links).
    """
    local = "vxlan_local6" if _version(local_ip) == 6 else "vxlan_local"
    link = link_info(ipr, name)
    if link is not None:
        data = (link.get("IFLA_LINKINFO") or {}).get("IFLA_INFO_DATA") or {}
        wanted = (vni, port, dev_index, ipaddress.ip_address(local_ip))
        have_local = data.get("IFLA_VXLAN_LOCAL6") or data.get("IFLA_VXLAN_LOCAL")
        have = (data.get("IFLA_VXLAN_ID"), data.get("IFLA_VXLAN_PORT"), data.get("IFLA_VXLAN_LINK"),
                ipaddress.ip_address(have_local) if have_local else None)
        if link_kind(link) != "vxlan" or have != wanted:
            delete_link(ipr, name)
            link = None
    if link is None:
        try:
            ipr.link("add", ifname=name, kind="vxlan", vxlan_id=vni, vxlan_port=port, vxlan_link=dev_index,
                     vxlan_learning=1, mtu=mtu, **{local: local_ip})
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        link = link_info(ipr, name)
    idx = link["index"]
    if link.get("IFLA_MTU") != mtu or link.get("IFLA_MASTER") != master or link.get("state") != "up":
        ipr.link("set", index=idx, mtu=mtu, master=master, state="up")
    return idx


def ensure_only_addrs(ipr: IPRoute, index: int, wanted: Sequence[tuple[str, int]]) -> None:
    """The (address, prefixlen) pairs are the link's only IPv4 and global IPv6 addresses (a stale gateway
    from an old subnet or family goes; the kernel's IPv6 link-local stays). ipr is of the calling thread's
    namespace: the link's addresses are read there, in one dump the kernel filters (`rtbulk`)."""
    want = {(ipaddress.ip_address(ip), plen) for ip, plen in wanted}
    present = set()
    with rtbulk.Rtnl() as nl:
        found = nl.addresses(index)
    for text, plen in found:
        addr = ipaddress.ip_address(text)
        if (addr, plen) in want:
            present.add((addr, plen))
        elif not addr.is_link_local:
            ipr.addr("del", index=index, address=str(addr), prefixlen=plen)
    for addr, plen in sorted(want - present, key=str):
        _add_addr(ipr, index, str(addr), plen)


IFA_F_DADFAILED, IFA_F_DEPRECATED, IFA_F_TENTATIVE = 0x08, 0x20, 0x40
RT_SCOPE_UNIVERSE = 0


def address_of(ipr: IPRoute, index: int, family: int = 4) -> str | None:
    """The link's first address of one family a VTEP can use: for IPv6 of global scope, not tentative
    (duplicate address detection still running), deprecated or duplicated."""
    unusable = IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE
    for a in ipr.get_addr(family=AF[family], index=index):
        flags = a.get("IFA_FLAGS", a["flags"])
        if family == 4 or (a["scope"] == RT_SCOPE_UNIVERSE and not flags & unusable):
            return a.get("IFA_ADDRESS")
    return None


def default_route_ifindex(ipr: IPRoute, family: int = 4) -> int | None:
    for r in ipr.get_default_routes(family=AF[family]):
        oif = r.get("RTA_OIF")
        if oif:
            return oif
    return None


def flood_entries(ipr: IPRoute, vxlan_index: int) -> set[str]:
    """Remote VTEPs in the VXLAN device's all-zeros FDB entries (the head-end replication list).

    Through pyroute2, for the readers outside the reconcile (`sknf doctor`, tests): a decoder
    independent of the one `sync_flood_list` uses."""
    out = set()
    for f in ipr.fdb("dump", ifindex=vxlan_index):
        if f.get("NDA_LLADDR") == ZERO_MAC and f.get("NDA_DST") and f["ifindex"] == vxlan_index:
            out.add(f.get("NDA_DST"))
    return out


def sync_flood_list(vxlan_index: int, wanted: set[str]) -> tuple[set[str], set[str]]:
    """The VXLAN device floods to exactly the `wanted` VTEPs; returns (added, removed).

    A removed VTEP loses its flood entry and every MAC learned behind it, so nothing keeps pointing at
    a gone node. One dump, then the changes in bulk (`sknf.rtbulk`): one pyroute2 request per entry
    took 1-4 s for 5,000 peers.
    """
    with rtbulk.Rtnl() as nl:
        entries = list(nl.fdb(vxlan_index))
        have = {dst for mac, dst in entries if mac == ZERO_MAC}
        added, removed = wanted - have, have - wanted
        nl.apply(((f"flood entry {ip}", *rtbulk.fdb_request("append", vxlan_index, ZERO_MAC, ip))
                  for ip in sorted(added)), benign=(errno.EEXIST,))
        nl.apply(((f"fdb {mac} dst {dst}", *rtbulk.fdb_request("del", vxlan_index, mac, dst))
                  for mac, dst in entries if dst in removed), benign=(errno.ENOENT, errno.ENODEV))
    return added, removed


def ensure_source_rule(ipr: IPRoute, *, priority: int, src: str, iifname: str, table: int) -> None:
    """The policy rule `from src iif iifname lookup table` exists at priority, in src's family (once: a rerun
    adds nothing)."""
    net, _, plen = src.partition("/")
    family = AF[_version(net)]
    for r in ipr.get_rules(family=family, priority=priority):
        if (r.get("FRA_TABLE"), r.get("FRA_SRC"), r["src_len"], r.get("FRA_IIFNAME")) == (table, net, int(plen),
                                                                                          iifname):
            return
        ipr.rule("del", family=family, priority=priority, table=r.get("FRA_TABLE"))  # a stale rule of ours
    try:
        ipr.rule("add", family=family, priority=priority, table=table, src=net, src_len=int(plen), iifname=iifname)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise


def remove_rules(ipr: IPRoute, priority: int, family: int = 4) -> None:
    """Every policy rule of one family at priority (uninstall, or the underlay moved to the other family)."""
    for r in ipr.get_rules(family=AF[family], priority=priority):
        try:
            ipr.rule("del", family=AF[family], priority=priority, table=r.get("FRA_TABLE"))
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.ESRCH):
                raise


def sync_host_routes(table: int, oif: int, wanted: dict[str, str], family: int = 4) -> None:
    """Table holds exactly the host routes of one family {destination: gateway} via oif (an empty wanted
    empties it).

    In bulk (`sknf.rtbulk`): one route per peer node, 5,000 of them in well under a second."""
    plen_host = 32 if family == 4 else 128
    with rtbulk.Rtnl() as nl:
        have = nl.routes(AF[family], table)
        nl.apply(((f"route {dst} via {gateway}", *rtbulk.route_request("replace", table, dst, gateway, oif))
                  for dst, gateway in wanted.items() if have.get((dst, plen_host)) != (gateway, oif)))
        nl.apply(((f"route {dst}/{plen}", *rtbulk.route_request("del", table, dst, dst_len=plen))
                  for dst, plen in have if plen != plen_host or dst not in wanted),
                 benign=(errno.ESRCH, errno.ENOENT))


def create_veth(ipr: IPRoute, host_ifname: str, peer_ifname: str, peer_netns: str, mtu: int,
                peer_mac: str | None = None, master: int | None = None, host_mac: str | None = None) -> int:
    """A veth pair with one end already inside the pod's namespace; returns the host end's index.

    With `master`, the host end is created already a port of that bridge and up, in the same request
    (each pyroute2 request costs about a millisecond of Python; a pod ADD is mostly requests)."""
    peer = {"ifname": peer_ifname, "net_ns_fd": os.open(peer_netns, os.O_RDONLY), "mtu": mtu}
    if peer_mac:
        peer["address"] = peer_mac
    host: dict = {"master": master, "state": "up"} if master else {}
    if host_mac:
        host["address"] = host_mac
    fd = peer["net_ns_fd"]
    try:
        ipr.link("add", ifname=host_ifname, kind="veth", mtu=mtu, peer=peer, **host)
    finally:
        os.close(fd)
    return link_index(ipr, host_ifname)


def configure_pod_interface(pod: IPRoute, ifname: str, addrs: Sequence[tuple[str, int, str]]) -> None:
    """Each (address, prefixlen, gateway): the address (IPv6 without DAD), then link up, loopback up, and
    per family the default route unless the pod has one (a second interface from a chained or meta
    plugin keeps the first one's default route)."""
    pod.link("set", index=LOOPBACK_IFINDEX, state="up")
    idx = link_index(pod, ifname)
    for ip, prefixlen, _ in addrs:
        _add_addr(pod, idx, ip, prefixlen)
    pod.link("set", index=idx, state="up")
    for ip, _, gateway in addrs:
        family = _version(ip)
        if not pod.get_default_routes(family=AF[family]):
            pod.route("add", dst=DEFAULT_ROUTE[family], gateway=gateway, oif=idx, family=AF[family])


def pod_interface_state(pod: IPRoute, ifname: str) -> tuple[str | None, list[str], dict[int, str | None]]:
    """(mac, IPv4 and global IPv6 addresses with prefix, {family: default gateway}) of the pod's
    interface, for CHECK."""
    link = link_info(pod, ifname)
    if link is None:
        return None, [], {}
    addrs = [f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in pod.get_addr(index=link["index"])
             if not ipaddress.ip_address(a.get("IFA_ADDRESS")).is_link_local]
    gws = {f: next((r.get("RTA_GATEWAY") for r in pod.get_default_routes(family=AF[f])), None) for f in AF}
    return link.get("IFLA_ADDRESS"), addrs, gws


def host_veth_links(prefix: str) -> dict:
    """Host-side pod veths (those whose name starts with prefix) of the current namespace: name -> link
    fields, as `sknf.rtbulk` decodes them (the reconcile's dump: pyroute2 decoded ~0.3 ms per link)."""
    with rtbulk.Rtnl() as nl:
        return {link["IFLA_IFNAME"]: link for link in nl.links("veth")
                if link.get("IFLA_IFNAME", "").startswith(prefix)}


def host_veths(ipr: IPRoute, prefix: str) -> dict[str, int]:
    """Host-side pod veths by name: their ifindex (in ipr's namespace, for uninstall and diagnostics)."""
    return {link.get("IFLA_IFNAME"): link["index"] for link in ipr.get_links()
            if (link.get("IFLA_IFNAME") or "").startswith(prefix) and link_kind(link) == "veth"}


def set_port(ipr: IPRoute, index: int, master: int) -> None:
    ipr.link("set", index=index, master=master, state="up")


def ensure_ifb(ipr: IPRoute, name: str, mtu: int) -> int:
    """An ifb device (the target of a redirect that shapes a pod's frames), up, with the pod's MTU."""
    link = link_info(ipr, name)
    if link is not None and link_kind(link) != "ifb":
        delete_link(ipr, name)
        link = None
    if link is None:
        try:
            ipr.link("add", ifname=name, kind="ifb", mtu=mtu)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        link = link_info(ipr, name)
    idx = link["index"]
    if link.get("IFLA_MTU") != mtu or link.get("state") != "up":
        ipr.link("set", index=idx, mtu=mtu, state="up")
    return idx


def set_alias(ipr: IPRoute, index: int, alias: str) -> None:
    """The link's ifalias (IFLA_IFALIAS, at most IFALIAS_MAX bytes): a note the kernel keeps for us."""
    ipr.link("set", index=index, ifalias=alias)



def sysctl(key: str, value: str | int) -> None:
    """Write a sysctl of the current network namespace if it differs (net.* are per namespace)."""
    path = "/proc/sys/" + key.replace(".", "/")
    with open(path) as f:
        if f.read().strip() == str(value):
            return
    with open(path, "w") as f:
        f.write(str(value))

