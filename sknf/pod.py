"""Pod network set-up: the CNI verbs as the agent carries them out, one function per verb.

ADD reads top to bottom as the steps it takes. Every acquired resource registers its undo on an
ExitStack right after it is acquired; `pop_all()` on the last line keeps them. Any failure in
between rolls back in reverse order: no leftover link, no allocated address.

DEL is idempotent: a missing namespace, link or lease is success, and the lease is always released.

Each pod's host veth carries its lease in the link's ifalias, so the lease store is a copy of what
the host holds: when the store is lost or corrupt, `rebuild_from_host` reads the leases back and no
running pod's address is handed out again.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from sknf import netlink, nsutil, rtbulk, shaping
from sknf.cni import ALREADY_EXISTS, CHECK_FAILED, Bandwidth, CniError, Request, build_result
from sknf.config import BRIDGE, HOST_VETH_PREFIX, Config
from sknf.datapath import Datapath, Endpoint
from sknf.ipam import CorruptStore, Lease, Store
from sknf.overlay import NodeOverlay

log = logging.getLogger(__name__)


def host_veth_name(container_id: str, ifname: str) -> str:
    """`sknf` + 11 hex digits: stable per attachment, within the kernel's 15-character limit."""
    return HOST_VETH_PREFIX + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:11]


def host_veth_mac(container_id: str, ifname: str) -> str:
    """The host end's MAC, chosen up front as the pod's is (so the result needs no lookup)."""
    return pod_mac(f"host/{container_id}", ifname)


def pod_mac(container_id: str, ifname: str) -> str:
    """The pod interface's MAC, chosen up front so the lease is written once, complete.

    Locally administered unicast (02:...), derived from the attachment so it is stable across
    retries; 40 hashed bits make a clash in one L2 domain unlikely below millions of pods.
    """
    digest = hashlib.sha256(f"mac/{container_id}/{ifname}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


class SharedLock:
    """Held shared by many (the verbs that change leases) or exclusively by one (a store rebuild).

    A waiting exclusive holder goes first: new shared holders wait behind it, so a stream of ADDs
    cannot starve a rebuild.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            self._cond.wait_for(lambda: self._shared == 0)
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass
class PodNetwork:
    """What the verbs need from the agent; `node` is None until the overlay is first reconciled."""

    cfg: Config
    store: Store
    datapath: Datapath
    node: Callable[[], NodeOverlay | None]
    # Serializes datapath attach/detach with the periodic endpoint sync, so a sync computed before
    # an ADD cannot remove the entry that ADD has just attached.
    datapath_lock: threading.Lock = field(default_factory=threading.Lock)
    # ADD, DEL and GC hold it shared, a store rebuild exclusively: a rebuild reads the host and
    # writes the store with no verb half done (an ADD between its lease and its link's record).
    store_guard: SharedLock = field(default_factory=SharedLock)

    def ready_node(self) -> NodeOverlay:
        node = self.node()
        if node is None:
            raise CniError(11, "sknf agent is starting: node network not ready yet")
        return node


def endpoint_of(lease: Lease, host_ifindex: int, siblings: tuple[str, ...] = (),
                bw: Bandwidth | None = None) -> Endpoint:
    """The datapath's view of a lease; siblings are the addresses of the container's other leases, bw its
    recorded shaping."""
    return Endpoint(ip=str(lease.ip), mac=lease.mac, host_ifname=lease.host_ifname, host_ifindex=host_ifindex,
                    container_id=lease.container_id, ifname=lease.ifname, namespace=lease.namespace,
                    pod=lease.pod, shaped_to_pod=bool(bw and bw.ingress), shaped_from_pod=bool(bw and bw.egress),
                    siblings=tuple(sorted({str(x) for x in siblings} - {str(ip) for ip in lease.ips})),
                    ip6=str(lease.ip6 or ""))


def _attach_container(net: PodNetwork, ipr: IPRoute, container_id: str, skip: str = "") -> None:
    """(Re)attach the container's other attachments than `skip`, each allowed every address the
    container now holds (source validation): called when an attachment is added or deleted."""
    leases = [lease for lease in net.store.of_container(container_id) if lease.ifname != skip]
    if not leases:
        return
    ips = tuple(str(ip) for lease in net.store.of_container(container_id) for ip in lease.ips)
    shaped = shaping.load_records(net.cfg.state_dir)
    for lease in leases:
        if index := netlink.link_index(ipr, lease.host_ifname):
            net.datapath.attach_pod(endpoint_of(lease, index, ips, shaped.get(lease.host_ifname)))


# The pod interface's IPv6 settings: only with an IPv6 address (dual-stack), and then no router
# advertisement or redirect is taken (a pod must not learn routes from other pods; the datapath drops
# pods' RAs and redirects too). Without one, IPv6 is off (loopback keeps ::1): the kernel then sends no
# router solicitation, DAD or MLD, and the datapath drops any IPv6 frame a pod crafts anyway.
POD_IPV6 = {True: (("accept_ra", "0"), ("accept_redirects", "0"), ("disable_ipv6", "0")),
            False: (("disable_ipv6", "1"),)}
DEVCONF = {"accept_ra": 3, "accept_redirects": 4, "disable_ipv6": 26}  # places in IFLA_INET6_CONF (DEVCONF_*)


def set_pod_ipv6(netns: str, ifname: str, enabled: bool, only_if_changed: bool = False) -> bool:
    """Apply POD_IPV6 in the pod; with only_if_changed, only when a setting differs. True if it wrote."""
    with nsutil.entered(netns):
        if not os.path.isdir("/proc/sys/net/ipv6"):  # no IPv6 in this kernel at all: nothing to set
            return False
        paths = [(f"/proc/sys/net/ipv6/conf/{ifname}/{key}", value) for key, value in POD_IPV6[enabled]]  # dots kept
        if only_if_changed and all(Path(path).read_text().strip() == value for path, value in paths):
            return False
        for path, value in paths:
            with open(path, "w") as f:
                f.write(value)
        return True


def _ipv6_as_added(conf: tuple[int, ...] | None, enabled: bool) -> bool:
    """Whether a pod interface's IPv6 settings (IFLA_INET6_CONF, see rtbulk.ipv6_conf) are POD_IPV6's."""
    return conf is not None and all(len(conf) > DEVCONF[key] and conf[DEVCONF[key]] == int(value)
                                    for key, value in POD_IPV6[enabled])


def _sync_pod_ipv6(net: PodNetwork, node: NodeOverlay, leases: list[Lease], links: dict[str, dict]) -> None:
    """Each pod's IPv6 as its ADD left it. Whoever takes a pod's MTU below 1280 and back (the pod itself,
    the reconcile's MTU change) makes the kernel recreate the device's IPv6 state with the defaults:
    enabled, taking RAs, without its address. The settings of every pod's end of its veth are read from
    here over rtnetlink (0.3 s less per reconcile at 1,000 pods than entering each namespace to read
    /proc/sys); only a pod that read differs, or that the read could not vouch for, is entered, and
    written to where a setting differs."""
    family6 = net.cfg.cidr(6) is not None and bool(node.gateway(6))  # as pod_addresses keeps IPv6
    enabled = {lease.host_ifname: family6 and lease.address(6) is not None for lease in leases}
    with rtbulk.Rtnl() as nl:
        confs = nl.ipv6_conf((name, link["IFLA_LINK_NETNSID"], link["IFLA_LINK"]) for name, link in links.items()
                             if name in enabled and "IFLA_LINK_NETNSID" in link and "IFLA_LINK" in link)
    for lease in leases:
        if not lease.netns:  # leased before sknf recorded namespaces
            continue
        if lease.host_ifname in confs and _ipv6_as_added(confs[lease.host_ifname], enabled[lease.host_ifname]):
            continue
        v6 = [a for a in pod_addresses(net, node, lease) if ":" in a[0]]
        try:
            if set_pod_ipv6(lease.netns, lease.ifname, bool(v6), only_if_changed=True):
                if v6:
                    with netlink.route(lease.netns) as pod:
                        netlink.configure_pod_interface(pod, lease.ifname, v6)
                log.warning("%s (%s/%s): IPv6 settings restored", lease.host_ifname, lease.namespace, lease.pod)
        except (OSError, NetlinkError) as e:  # the pod is going away: its DEL cleans up
            log.warning("%s: cannot check IPv6 settings: %s", lease.host_ifname, e)


def pod_addresses(net: PodNetwork, node: NodeOverlay, lease: Lease) -> list[tuple[str, int, str]]:
    """(address, cluster prefix length, gateway) of each family the lease holds, IPv4 first; a family the
    cluster no longer has (dual-stack turned off) is left out."""
    return [(str(ip), cluster.prefixlen, gateway) for ip in lease.ips
            if (cluster := net.cfg.cidr(ip.version)) is not None and (gateway := node.gateway(ip.version))]



def _require_netns(req: Request) -> None:
    if not nsutil.is_netns(req.netns):
        raise CniError(3, f"network namespace {req.netns!r} does not exist or is not a network namespace")


def add(net: PodNetwork, req: Request) -> dict:
    node = net.ready_node()
    _require_netns(req)
    if req.bandwidth is not None:
        shaping.plan(req.bandwidth, node.mtu)  # refused (code 7) before anything is made
    host_ifname = host_veth_name(req.container_id, req.ifname)
    with net.store_guard.shared(), netlink.route() as ipr, ExitStack() as undo:
        # 1. An address of each family from this node's pod subnets (raises "already exists" on a duplicate ADD).
        mac = pod_mac(req.container_id, req.ifname)
        lease = net.store.allocate(req.container_id, req.ifname, req.pod_namespace, req.pod_name, host_ifname, mac,
                                   req.netns)
        undo.callback(net.store.release, req.container_id, req.ifname)

        # 2. The veth pair, pod end created directly inside the pod's namespace, host end created on the
        #    bridge and up, in one request (the pod's end stays down until step 3; the kernel datapath's
        #    source validation lets nothing through from a host veth it has not attached in step 5).
        host_mac = host_veth_mac(req.container_id, req.ifname)
        try:
            host_index = netlink.create_veth(ipr, host_ifname, req.ifname, req.netns, node.mtu, peer_mac=mac,
                                             master=node.bridge_ifindex, host_mac=host_mac)
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                raise CniError(ALREADY_EXISTS, f"interface {req.ifname} or {host_ifname} already exists") from None
            raise
        undo.callback(netlink.delete_link, ipr, host_ifname)
        record = attachment_record(lease)  # the store's backup on the host (rebuild_from_host)
        if record is None:
            log.warning("%s: lease record longer than an ifalias; it cannot be rebuilt from the host", host_ifname)
        else:
            netlink.set_alias(ipr, host_index, record)

        # 3. Inside the pod: the IPv4 address with the cluster-wide prefix, up, default route via the bridge.
        #    IPv6 stays off until step 6: a pod's first IPv6 frames (DAD, MLD, sent as the link comes up)
        #    would meet source validation that does not know the pod yet.
        addrs = pod_addresses(net, node, lease)
        set_pod_ipv6(req.netns, req.ifname, False)
        with netlink.route(req.netns) as pod:
            netlink.configure_pod_interface(pod, req.ifname, [a for a in addrs if ":" not in a[0]])

        # 4. Shaping (runtimeConfig.bandwidth): the record first, so a crash midway is finished by the
        # reconcile or undone with the lease; under the lock the reconcile shapes recorded pods with.
        if req.bandwidth is not None:
            with net.datapath_lock:
                shaping.save_record(net.cfg.state_dir, host_ifname, req.bandwidth)
                undo.callback(shaping.forget, ipr, net.cfg.state_dir, host_ifname)
                shaping.ensure(ipr, host_ifname, host_index, req.bandwidth, node.mtu)

        # 5. Source validation, fast path and counters; the container's other attachments are allowed
        #    this address too.
        siblings = tuple(str(ip) for x in net.store.of_container(req.container_id) for ip in x.ips)
        endpoint = endpoint_of(lease, host_index, siblings, req.bandwidth)
        with net.datapath_lock:
            # Undo first: an attach that fails halfway (maps written, filter refused) leaves nothing behind.
            undo.callback(net.datapath.detach_pod, endpoint)
            net.datapath.attach_pod(endpoint)
            if len(siblings) > len(lease.ips):
                _attach_container(net, ipr, req.container_id, skip=req.ifname)

        # 6. IPv6 (dual-stack), now that the datapath knows the pod: on (no RAs, no redirects), the address
        #    with its cluster-wide prefix, a default route via the bridge's IPv6 gateway.
        if v6 := [a for a in addrs if ":" in a[0]]:
            set_pod_ipv6(req.netns, req.ifname, True)
            with netlink.route(req.netns) as pod:
                netlink.configure_pod_interface(pod, req.ifname, v6)

        result = build_result(
            req.cni_version,
            interfaces=[{"name": host_ifname, "mac": host_mac},
                        {"name": req.ifname, "mac": mac, "sandbox": req.netns}],
            ips=[{"address": f"{ip}/{plen}", "gateway": gw, "interface": 1} for ip, plen, gw in addrs],
            routes=[{"dst": netlink.DEFAULT_ROUTE[ipaddress.ip_address(gw).version], "gw": gw} for _, _, gw in addrs],
        )
        undo.pop_all()
    log.info("ADD %s/%s %s %s -> %s", req.pod_namespace, req.pod_name, req.container_id[:12], req.ifname,
             ", ".join(map(str, lease.ips)))
    return result


def delete(net: PodNetwork, req: Request) -> None:
    with net.store_guard.shared():
        lease = net.store.get(req.container_id, req.ifname)
        host_ifname = lease.host_ifname if lease else host_veth_name(req.container_id, req.ifname)
        with netlink.route() as ipr:
            host_index = netlink.link_index(ipr, host_ifname)
            if lease is not None:
                siblings = tuple(str(ip) for x in net.store.of_container(req.container_id) for ip in x.ips)
                with net.datapath_lock:
                    net.datapath.detach_pod(endpoint_of(lease, host_index or 0, siblings))
            # Deleting the host end removes the pod end too, wherever the namespace is.
            netlink.delete_link(ipr, host_ifname, host_index)
            if shaping.recorded(net.cfg.state_dir, host_ifname):  # else no ifb: two lookups saved per DEL
                shaping.forget(ipr, net.cfg.state_dir, host_ifname)
            net.store.release(req.container_id, req.ifname)
            if lease is not None:
                with net.datapath_lock:  # its other attachments may no longer send from this address
                    _attach_container(net, ipr, req.container_id)
    if lease is not None:
        log.info("DEL %s/%s %s %s -> freed %s", lease.namespace, lease.pod, req.container_id[:12], req.ifname,
                 lease.ip)


def check(net: PodNetwork, req: Request) -> None:
    """The pod still has what ADD gave it: lease, host port on the bridge, address, gateway."""
    node = net.ready_node()
    _require_netns(req)
    lease = net.store.get(req.container_id, req.ifname)
    if lease is None:
        raise CniError(CHECK_FAILED, f"no address allocated to {req.container_id}/{req.ifname}")
    addrs = pod_addresses(net, node, lease)
    wanted = [f"{ip}/{plen}" for ip, plen, _ in addrs]
    for ip in (req.prev_result or {}).get("ips", []):
        if ip.get("address") not in wanted:
            raise CniError(CHECK_FAILED, f"prevResult address {ip.get('address')} is not the lease's "
                           f"{', '.join(wanted)}")
    with netlink.route() as ipr:
        link = netlink.link_info(ipr, lease.host_ifname)
        if link is None or link.get("IFLA_MASTER") != node.bridge_ifindex:
            raise CniError(CHECK_FAILED, f"host interface {lease.host_ifname} is missing or not on {BRIDGE}")
    with netlink.route(req.netns) as pod:
        mac, have, gateways = netlink.pod_interface_state(pod, req.ifname)
    if mac is None:
        raise CniError(CHECK_FAILED, f"interface {req.ifname} is missing in {req.netns}")
    for want, (ip, _, gw) in zip(wanted, addrs, strict=True):
        if want not in have:
            raise CniError(CHECK_FAILED, f"{req.ifname} has {have or 'no address'}, expected {want}")
        if gateways.get(ipaddress.ip_address(ip).version) != gw:
            raise CniError(CHECK_FAILED, f"default route via {gateways.get(ipaddress.ip_address(ip).version)}, "
                           f"expected {gw}")
    recorded = shaping.load_records(net.cfg.state_dir).get(lease.host_ifname)
    if recorded != req.bandwidth:
        raise CniError(CHECK_FAILED, f"shaping of {lease.host_ifname} is {recorded}, the request asks {req.bandwidth}")
    with netlink.route() as ipr:
        found = shaping.problems(ipr, lease.host_ifname, link["index"], recorded, node.mtu)
    if found:
        raise CniError(CHECK_FAILED, "; ".join(found))


def gc(net: PodNetwork, req: Request) -> None:
    """Free every lease (and its link and map entries) not among the runtime's valid attachments."""
    with net.store_guard.shared():
        with netlink.route() as ipr:
            for lease in net.store.gc(req.valid_attachments or frozenset()):
                net.datapath.detach_pod(endpoint_of(lease, netlink.link_index(ipr, lease.host_ifname) or 0))
                netlink.delete_link(ipr, lease.host_ifname)
                shaping.forget(ipr, net.cfg.state_dir, lease.host_ifname)
                log.info("GC freed %s (%s/%s %s)", ", ".join(map(str, lease.ips)), lease.namespace, lease.pod,
                         lease.container_id[:12])
        remove_orphan_links(net)


def status(net: PodNetwork, req: Request) -> None:
    if net.node() is None:
        raise CniError(50, "sknf agent has not set up the node network yet")
    if net.store.allocated >= net.store.capacity:
        raise CniError(50, f"address pool {net.store.pod_cidr} is exhausted: no new pod can be added")


def remove_orphan_links(net: PodNetwork) -> list[Lease]:
    """Host veths no lease accounts for are deleted (see _delete_orphans); returns the lost leases."""
    with netlink.route() as ipr:
        links = netlink.host_veth_links(HOST_VETH_PREFIX)
        return _delete_orphans(ipr, links, net.store.leases())


def _delete_orphans(ipr: IPRoute, links: dict, leases: list[Lease]) -> list[Lease]:
    """Delete the links (name -> link message) that no lease names and no record explains.

    Such a link is what an ADD killed before writing its record, or a GC killed midway, leaves. A
    link whose record names an address no lease holds is a live pod whose lease the store lost (a
    lease file deleted): it is kept, and its lease returned for `rebuild_from_host`. The links must
    be listed before the leases are read: ADD allocates its lease before it creates its link, so
    every listed link that belongs to a live ADD already has its lease when we read them.
    """
    known = {lease.host_ifname for lease in leases}
    taken = {ip for lease in leases for ip in lease.ips}
    lost, removed = [], []
    for name, link in links.items():
        if name in known:
            continue
        lease = lease_from_record(name, link.get("IFLA_IFALIAS"))
        if lease is not None and taken.isdisjoint(lease.ips):
            lost.append(lease)
        elif netlink.delete_link(ipr, name):
            removed.append(name)
    if removed:
        log.warning("removed %d orphan pod links: %s", len(removed), ", ".join(removed))
    return lost


# -- the lease record on the host veth --------------------------------------------------------------

def attachment_record(lease: Lease) -> str | None:
    """The lease as compact JSON for the host veth's ifalias, or None when it cannot fit.

    Pod namespace and name only describe the pod, so they give way first when the record is too
    long; the attachment key, address and MAC must fit (they do for real runtimes' 64-character
    container ids).
    """
    doc = {"cid": lease.container_id, "if": lease.ifname, "ip": str(lease.ip),
           **({"ip6": str(lease.ip6)} if lease.ip6 else {}), "mac": lease.mac, "ns": lease.namespace, "pod": lease.pod}
    for dropped in ((), ("pod",), ("pod", "ns")):
        text = json.dumps({k: v for k, v in doc.items() if k not in dropped}, separators=(",", ":"))
        if len(text.encode()) <= netlink.IFALIAS_MAX:
            return text
    return None


def lease_from_record(host_ifname: str, record: str | None) -> Lease | None:
    """The lease a host veth's record describes; None for no record or one that is not this link's."""
    try:
        doc = json.loads(record or "")
        lease = Lease(ip=ipaddress.ip_address(doc["ip"]), container_id=str(doc["cid"]), ifname=str(doc["if"]),
                      namespace=str(doc.get("ns", "")), pod=str(doc.get("pod", "")), host_ifname=host_ifname,
                      mac=str(doc.get("mac", "")), ip6=ipaddress.IPv6Address(doc["ip6"]) if doc.get("ip6") else None)
    except (ValueError, KeyError, TypeError):
        return None
    # The link's name hashes the attachment: a record copied onto another link does not count.
    return lease if host_veth_name(lease.container_id, lease.ifname) == host_ifname else None


def rebuild_from_host(net: PodNetwork) -> list[Lease]:
    """Make the store hold every lease the host veths record; returns the leases it added.

    After CorruptStore the records are all there is; when the store merely lost some leases (a
    lease file deleted), they are added to what it still holds. Runs with ADD, DEL and GC held
    off. A link without a readable record gets no lease, and the orphan sweep removes it; a record
    naming an address or attachment the store (or an earlier link by name) holds is ignored.
    """
    with net.store_guard.exclusive():
        links = netlink.host_veth_links(HOST_VETH_PREFIX)
        try:
            held = net.store.leases()
        except CorruptStore:
            held = []
        by_ip = {ip: lease for lease in held for ip in lease.ips}
        keys = {lease.key for lease in held}
        added = []
        for name in sorted(links):
            lease = lease_from_record(name, links[name].get("IFLA_IFALIAS"))
            if lease is None or lease.key in keys:
                continue
            if clash := next((ip for ip in lease.ips if ip in by_ip), None):
                log.error("%s records %s, which %s holds; not restoring it", name, clash, by_ip[clash].key)
                continue
            by_ip.update(dict.fromkeys(lease.ips, lease))
            keys.add(lease.key)
            added.append(lease)
        net.store.rebuild({lease.key: lease for lease in by_ip.values()}.values())
    return sorted(added, key=lambda x: (x.ip.version, int(x.ip)))


def sync_pods(net: PodNetwork, node: NodeOverlay) -> list[Lease]:
    """The reconcile of the pods' host side, from one link dump (pyroute2 decodes ~0.3 ms per link).

    Links no lease accounts for are deleted, or returned as lost leases when their record says the
    store lost them (see _delete_orphans); every leased link is an up port of the bridge; the
    datapath gets exactly the leased pods with a live link, counting those whose lease the store lost
    (they run on, and the rebuild that follows restores their leases). A bridge deleted and recreated (by
    hand, by another tool) comes back without ports, and its pods stay cut off until their host
    ends rejoin it. An ADD in flight may be enslaved here a moment early, which changes nothing:
    its own step 4 does the same.
    """
    rejoined = []
    with net.datapath_lock, netlink.route() as ipr:
        # Records before links and leases: an ADD saves its record after both exist.
        shaped = shaping.load_records(net.cfg.state_dir)
        links = netlink.host_veth_links(HOST_VETH_PREFIX)
        leases = net.store.leases()  # after the dump, see _delete_orphans
        lost = _delete_orphans(ipr, links, leases)
        live = [lease for lease in (*leases, *lost) if lease.host_ifname in links]  # lost: still live pods
        _sync_shaping(net, ipr, node, shaped, {lease.host_ifname: links[lease.host_ifname]["index"] for lease in live},
                      {lease.host_ifname for lease in (*leases, *lost)})
        for lease in live:
            link = links[lease.host_ifname]
            if link.get("IFLA_MTU") != node.mtu:
                _set_mtu(ipr, lease, link, node.mtu)
            if link.get("IFLA_MASTER") == node.bridge_ifindex and link.get("state") == "up":
                continue
            try:
                netlink.set_port(ipr, link["index"], node.bridge_ifindex)
            except NetlinkError as e:
                if e.code != errno.ENODEV:  # gone: a DEL deleted it since the dump
                    raise
                continue
            rejoined.append(lease.host_ifname)
        by_container: dict[str, list[str]] = {}
        for lease in live:
            by_container.setdefault(lease.container_id, []).extend(str(ip) for ip in lease.ips)
        net.datapath.sync_endpoints([endpoint_of(lease, links[lease.host_ifname]["index"],
                                                 tuple(by_container[lease.container_id]),
                                                 shaped.get(lease.host_ifname))
                                     for lease in live if lease.mac])
    _sync_pod_ipv6(net, node, live, links)  # after the datapath knows every live pod: their IPv6 frames pass
    if rejoined:
        log.warning("re-attached %d pod links to %s: %s", len(rejoined), BRIDGE, ", ".join(rejoined))
    return lost


def _set_mtu(ipr: IPRoute, lease: Lease, host_link, mtu: int) -> None:
    """Both ends of the pod's veth to the overlay's MTU (an operator changed `mtu`, or the underlay's
    changed): the pod's end first, so the host never forwards it frames larger than it accepts. The
    pod's end is the one in the recorded namespace that is this veth's peer; a pod leased before sknf
    recorded namespaces gets its host end only."""
    try:
        if lease.netns:
            with netlink.route(lease.netns) as pod_ipr:
                idx = netlink.link_index(pod_ipr, lease.ifname)
                if idx is not None and idx == host_link.get("IFLA_LINK"):
                    pod_ipr.link("set", index=idx, mtu=mtu)
        ipr.link("set", index=host_link["index"], mtu=mtu)
    except (OSError, NetlinkError) as e:  # the pod is going away: its DEL cleans up
        log.warning("%s: cannot set MTU %d: %s", lease.host_ifname, mtu, e)
        return
    log.info("%s (%s/%s): MTU now %d", lease.host_ifname, lease.namespace, lease.pod, mtu)


def _sync_shaping(net: PodNetwork, ipr: IPRoute, node: NodeOverlay, shaped: dict[str, Bandwidth],
                  live: dict[str, int], leased: set[str]) -> None:
    """Every recorded pod with a live link (name -> ifindex) is shaped as recorded; records no lease
    names go, with their ifb. A leased pod whose link is gone keeps both until its DEL or GC."""
    for host_ifname, bw in shaped.items():
        if host_ifname in live:
            try:
                shaping.ensure(ipr, host_ifname, live[host_ifname], bw, node.mtu)
            except (NetlinkError, CniError) as e:  # one pod's failure must not stop the others' reconcile
                log.error("cannot shape %s as recorded (%s): %s", host_ifname, bw, e)
        elif host_ifname not in leased:
            shaping.forget(ipr, net.cfg.state_dir, host_ifname)
            log.warning("removed the shaping of %s: no lease names it", host_ifname)


VERBS: dict[str, Callable[[PodNetwork, Request], dict | None]] = {
    "ADD": add, "DEL": delete, "CHECK": check, "GC": gc, "STATUS": status,
}

