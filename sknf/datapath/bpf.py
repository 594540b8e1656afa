"""The eBPF datapath: tc programs that fast-path pod traffic and count it per pod.

Why it works this way:
- The programs are compiled (BCC, ~1 s) and pinned under cfg.bpf_pin_dir by a short-lived child
  process (sknf.datapath.bpfload), so libbcc and LLVM never enter the agent's memory. The agent
  opens the pins: map entries through libbpf (bpfmaps), programs attached to tc by fd.
- Maps are pinned and the programs stay attached when the agent exits (tc holds them), so a restart
  neither stops forwarding nor loses counters. A restart with unchanged sources reuses the pinned
  programs without compiling; changed sources are compiled again (over the same pinned maps) and
  every filter is replaced in place by the new program.
- Runtime settings (CIDRs, gateway MAC, vxsknf's ifindex) go into the `config` map; the only -D
  flags are the pin directory and the learned-flow map's size (`flow_map_capacity`, else
  nf_conntrack_max). A pinned map of another size is recreated at the new size (see bpfload) and its
  entries copied over.
- Learned flows are never silently lost. While the flow_guard map says so, every pod frame takes the
  kernel path: SYNCING from the start until every filter runs these programs and the map holds the
  flows that existed before (the retired map's entries, conntrack's NATed flows); FULL from a learn
  the map refused until the sweep has made room and seeded conntrack's NATed flows again.
- The agent keeps no state of its own: endpoints, counters and learned flows live in the pinned
  maps. It remembers only each endpoint's host veth name (from the reconcile and the CNI verbs), so
  reading counters (every sampler tick, scrape and query) resolves no interface names.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

import sknf
from sknf import guard, netlink, rtbulk
from sknf.config import HOST_VETH_PREFIX, Config
from sknf.datapath import Endpoint, NodeNet, PodCounters, bpfload, bpfmaps, events, flows, pins, tc
from sknf.datapath.kernel import remove_bpf_leftovers
from sknf.policy import Compiled, bpfrules

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
POD_PROGRAMS = {"from_pod": tc.INGRESS, "to_pod": tc.EGRESS}  # on each pod's host veth
SHAPED_FROM_POD = "from_shaped_pod"  # in from_pod's place when the pod's sending is shaped
OVERLAY_PROGRAMS = {"from_overlay": tc.INGRESS, "to_overlay": tc.EGRESS}  # on vxsknf
PROGRAMS = bpfload.PROGRAMS  # what the loader pins: these four
POD_MAPS = ("pod_identity", "pod_sources", "pod_sources6", "local_macs", "endpoints", "endpoints6")  # attach_pod's
# {map: (key type, value type)}: checked against each pinned map once, when the agent opens it.
MAP_LAYOUTS = {"config": (ctypes.c_uint32, bpfmaps.Config),
               "config6": (ctypes.c_uint32, bpfmaps.Config6),
               "endpoints": (ctypes.c_uint32, bpfmaps.EndpointInfo),
               "endpoints6": (bpfmaps.Addr6, bpfmaps.EndpointInfo),
               "local_macs": (bpfmaps.MacKey, ctypes.c_uint32),
               "pod_counters": (ctypes.c_uint32, bpfmaps.CounterValues),
               "kernel_flows": (bpfmaps.FlowKey, bpfmaps.FlowState),
               "kernel_flows6": (bpfmaps.Flow6Key, bpfmaps.FlowState),
               "pod_identity": (ctypes.c_uint32, bpfmaps.PodIdentity),
               "pod_sources": (bpfmaps.SourceKey, bpfmaps.PodIdentity),
               "pod_sources6": (bpfmaps.Source6Key, bpfmaps.PodIdentity),
               "pod_refused": (ctypes.c_uint32, bpfmaps.RefusedValues),
               "flow_guard": (ctypes.c_uint32, ctypes.c_uint64),
               "events_enabled": (ctypes.c_uint32, ctypes.c_uint32),
               "events_lost": (ctypes.c_uint32, ctypes.c_uint64),
               "events_seen": (bpfmaps.FlowKey, ctypes.c_uint64),
               "events_seen6": (bpfmaps.Flow6Key, ctypes.c_uint64),
               "policy_rules": (bpfmaps.PolicyKey, bpfmaps.PolicyPorts),
               "policy_flows": (bpfmaps.FlowKey, bpfmaps.PolicyFlow),
               "policy_drops": (ctypes.c_uint32, ctypes.c_uint64)}
DEFAULT_MAX_FLOWS = 262144
GUARD_FULL, GUARD_SYNCING, GUARD_FAILED_LEARNS = 0, 1, 2  # flow_guard's slots (FLOW_GUARD_* in bpf/lib/maps.h)
ROOM = 0.9  # FULL clears only once the map, re-seeded, is at most this full: no flapping at the brim
# policy_flows: an entry goes once its flow has been idle for conntrack's timeout of its kind (the sysctl,
# else its default), so the programs forget an allowed flow no sooner than the kernel path would.
CT_TIMEOUTS = {6: ("tcp_timeout_established", 432000), 17: ("udp_timeout_stream", 120), 1: ("icmp_timeout", 30)}
CT_CLOSING = ("tcp_timeout_time_wait", 120)  # a TCP flow that sent a FIN or RST
CT_OTHER = ("generic_timeout", 600)
PROBE_LINK = "probe-sknf"  # a throwaway veth proving clsact + cls_bpf work in this namespace


class BpfUnavailable(RuntimeError):
    """The eBPF datapath cannot run here; the message is the reason the agent reports."""


class BpfDatapath:
    mode = "bpf"

    def __init__(self, cfg: Config, bpf_dir: Path = BPF_DIR) -> None:
        self.reason = ""
        self.pin_dir = cfg.bpf_pin_dir
        self.sweep_interval = cfg.reconcile_interval
        self.flow_events = cfg.flow_events
        ensure_bpffs(self.pin_dir)
        max_flows = _max_flows(cfg.flow_map_capacity)
        # the first BPF start here, after the kernel path, or the first with IPv6 flows (an upgrade)
        fresh = not all((self.pin_dir / name).exists() for name in bpfload.FLOW_MAPS)
        try:
            if not bpfload.pins_current(bpf_dir, self.pin_dir, max_flows):
                _run_loader(bpf_dir, self.pin_dir, max_flows)
        except bpfload.LoadFailed as e:
            raise BpfUnavailable(str(e)) from None
        self.fds: dict[str, int] = {}  # programs
        self.maps: dict[str, int] = {}
        self._tc_events: rtbulk.TcEvents | None = None
        try:
            for name in PROGRAMS:
                self.fds[name] = bpfmaps.open_pinned(self.pin_dir / f"prog_{name}")
            for name, (key_type, value_type) in MAP_LAYOUTS.items():
                self.maps[name] = bpfmaps.open_pinned(self.pin_dir / name)
                bpfmaps.check_layout(self.maps[name], key_type, value_type)
            self.maps["events"] = bpfmaps.open_pinned(self.pin_dir / "events")  # a ring buffer: no layout
            self._prog_ids = {name: bpfmaps.prog_id(fd) for name, fd in self.fds.items()}
            self._tc_events = rtbulk.TcEvents()  # before any filter is checked
            _probe_tc(self.fds["from_pod"])
            self.capacity = bpfmaps.map_info(self.maps["kernel_flows"]).max_entries
            self._syncing = fresh or any(self._retired())
            if self._syncing:  # before any filter runs these programs
                self._set_guard(GUARD_SYNCING, 1)
        except (OSError, bpfmaps.LayoutMismatch, BpfUnavailable) as e:
            self._close_fds()
            raise BpfUnavailable(str(e)) from None
        self._filters_verified: set[int] = set()  # pod veths whose filters were right, as of the last sync
        self._names: dict[int, str] = {}  # host veth names by ifindex, of the endpoints attached or synced
        self._clusters: list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None  # from setup_node
        # {endpoint: its POLICY_FLAGS} of those a NetworkPolicy selects (set_policy); at start, what the
        # pinned entries say, so re-attaching pods before the policy source has answered keeps their rules.
        endpoints = bpfmaps.read_map(self.maps["endpoints"], ctypes.c_uint32, bpfmaps.EndpointInfo)
        self._policy: dict[str, int] = {_ip(key): entry.flags & bpfmaps.POLICY_FLAGS
                                        for key, entry in endpoints if entry.flags & bpfmaps.POLICY_FLAGS}
        # Endpoints (by their first address) a NetworkPolicy selects: their IPv6 takes the kernel path.
        owners = _owners(endpoints)
        self._selected: set[str] = set(self._policy) | {
            owners.get(entry.ifindex, _ip6(key)) for key, entry in
            bpfmaps.read_map(self.maps["endpoints6"], bpfmaps.Addr6, bpfmaps.EndpointInfo)
            if entry.flags & bpfmaps.ENDPOINT_POLICY}
        self._policy_applied: tuple[Any, Any] | None = None  # the compiled rules set_policy last wrote
        self.policy_kernel: dict[str, str] = {}  # selected endpoints left to the kernel path: why
        self._full_seen = bool(self._guard(GUARD_FULL))
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._reader: events.RingReader | None = None

    # -- Datapath protocol ---------------------------------------------------------------------
    def setup_node(self, node: NodeNet) -> None:
        clusters = [ipaddress.ip_network(c) for c in node.cluster_cidrs]
        cluster, pods = _family_net(node.cluster_cidrs, 4), _family_net(node.pod_cidrs, 4)
        self._clusters = clusters
        leaf = bpfmaps.Config(cluster_net=_be32(cluster.network_address), cluster_mask=_be32(cluster.netmask),
                              pod_net=_be32(pods.network_address), pod_mask=_be32(pods.netmask),
                              vxlan_ifindex=node.vxlan_ifindex)
        leaf.gateway_mac[:] = _mac(node.gateway_mac)
        cluster6, pods6 = _family_net(node.cluster_cidrs, 6), _family_net(node.pod_cidrs, 6)
        leaf6 = bpfmaps.Config6()
        for field, value in (("cluster_net", cluster6.network_address), ("cluster_mask", cluster6.netmask),
                             ("pod_net", pods6.network_address), ("pod_mask", pods6.netmask)):
            getattr(leaf6, field)[:] = value.packed
        bpfmaps.update(self.maps["config6"], ctypes.c_uint32(0), leaf6)  # before config: vxlan_ifindex says "ready"
        bpfmaps.update(self.maps["config"], ctypes.c_uint32(0), leaf)
        bpfmaps.update(self.maps["events_enabled"], ctypes.c_uint32(0), ctypes.c_uint32(int(self.flow_events)))
        self._remove_kernel_guard()
        with netlink.route() as ipr:
            for name, hook in OVERLAY_PROGRAMS.items():
                tc.attach(ipr, node.vxlan_ifindex, hook, self.fds[name], f"sknf_{name}")
        if self._sweeper is None:
            # Started here, in the calling thread's namespace: conntrack is per namespace.
            self._sweeper = threading.Thread(target=self._sweep_loop, name="sknf-flow-sweep", daemon=True)
            self._sweeper.start()

    @staticmethod
    def _remove_kernel_guard() -> None:
        """The kernel datapath's nftables guard goes after a mode switch: here the tc programs validate every
        pod frame before anything forwards it, fast path included, and count the drops themselves."""
        if guard.remove():
            log.info("removed the kernel datapath's nftables guard: the tc programs validate pod frames")

    def attach_pod(self, ep: Endpoint, in_place: Callable[[int, str], bool] | None = None) -> None:
        """Identity and sources first (the filter drops everything from a veth it has no identity for), then
        the filters, then the endpoint entry: nothing is fast-pathed into a pod before its rx is counted.
        With `in_place(hook, program)` (the reconcile), filters it vouches for are left as they are."""
        first, last = self._pod_entries(ep)
        for name, key, value in first:
            bpfmaps.update(self.maps[name], key, value)
        wrong = []
        for name, hook in POD_PROGRAMS.items():
            program = SHAPED_FROM_POD if name == "from_pod" and ep.shaped_from_pod else name
            if in_place is None or not in_place(hook, program):
                wrong.append((hook, program))
        if wrong:
            with netlink.route() as ipr:
                for hook, program in wrong:
                    tc.attach(ipr, ep.host_ifindex, hook, self.fds[program], f"sknf_{program}")
        for name, key, value in last:
            bpfmaps.update(self.maps[name], key, value)
        self._names[ep.host_ifindex] = ep.host_ifname

    def _pod_entries(self, ep: Endpoint) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
        """The pod's map entries as (map, key, value): those its filters need before they run (identity,
        sources), and those that send traffic its way (its MAC, its endpoint)."""
        ident = bpfmaps.PodIdentity()
        ident.mac[:] = _mac(ep.mac)
        first: list[tuple[str, Any, Any]] = [("pod_identity", ctypes.c_uint32(ep.host_ifindex), ident)]
        for ip in ep.sources:
            if ":" in ip:
                first.append(("pod_sources6", _source6(ep.host_ifindex, ip), ident))
            else:
                first.append(("pod_sources", bpfmaps.SourceKey(ep.host_ifindex, _be32(ip)), ident))
        leaf = bpfmaps.EndpointInfo(ifindex=ep.host_ifindex,
                                    flags=(bpfmaps.ENDPOINT_SHAPED if ep.shaped_to_pod else 0)
                                    | self._policy.get(ep.ip, 0))
        leaf.mac[:] = _mac(ep.mac)
        last: list[tuple[str, Any, Any]] = [("local_macs", _mac_key(ep.mac), ctypes.c_uint32(ep.host_ifindex))]
        if ":" not in ep.ip:  # an IPv6-only pod has no IPv4 endpoint
            last.append(("endpoints", ctypes.c_uint32(_be32(ep.ip)), leaf))
        if ip6 := _ip6_of(ep):
            leaf6 = bpfmaps.EndpointInfo(ifindex=ep.host_ifindex,
                                         flags=(bpfmaps.ENDPOINT_SHAPED if ep.shaped_to_pod else 0)
                                         | (bpfmaps.ENDPOINT_POLICY if ep.ip in self._selected else 0))
            leaf6.mac[:] = leaf.mac
            last.append(("endpoints6", _addr6(ip6), leaf6))
        return first, last

    def detach_pod(self, ep: Endpoint) -> None:
        """Endpoint entry first (no new fast-path deliveries), then the pod's own hooks, then its counters:
        in this order no frame in flight can re-create the counters of a pod that is gone."""
        key = ctypes.c_uint32(_be32(ep.ip) if ":" not in ep.ip else 0)  # 0.0.0.0: never an endpoint's
        ifindex = ep.host_ifindex
        entry = bpfmaps.lookup(self.maps["endpoints"], key, bpfmaps.EndpointInfo)
        if entry is not None and ifindex in (0, entry.ifindex):  # leave a newer pod reusing the address alone
            ifindex = entry.ifindex
            bpfmaps.delete(self.maps["endpoints"], key)
        if ifindex:
            mac = _mac_key(ep.mac) if ep.mac else None
            owner = bpfmaps.lookup(self.maps["local_macs"], mac, ctypes.c_uint32) if mac else None
            if owner is not None and owner.value == ifindex:  # not the same MAC on a newer pod
                bpfmaps.delete(self.maps["local_macs"], mac)
            with netlink.route() as ipr:
                tc.detach(ipr, ifindex)
            bpfmaps.delete(self.maps["pod_counters"], ctypes.c_uint32(ifindex))
            bpfmaps.delete(self.maps["pod_refused"], ctypes.c_uint32(ifindex))
            bpfmaps.delete(self.maps["policy_drops"], ctypes.c_uint32(ifindex))
            bpfmaps.delete(self.maps["pod_identity"], ctypes.c_uint32(ifindex))
            self._names.pop(ifindex, None)
        # Its sources, and its address wherever a sibling attachment was allowed it; a newer pod that
        # already holds the address (GC releases before detaching) keeps its own entry.
        owner = entry.ifindex if entry is not None else 0
        addr = key.value
        self._prune("pod_sources", lambda key, _: key.ifindex == ifindex or (key.addr == addr and key.ifindex != owner))
        if ifindex:
            self._prune("pod_sources6", lambda key, _: key.ifindex == ifindex)
        packed6 = _packed6(ep)
        self._prune("endpoints6", lambda key, entry: entry.ifindex == ifindex if ifindex else bytes(key) == packed6)

    def _prune(self, name: str, unwanted: Callable[[Any, Any], bool]) -> None:
        """Delete the entries of map `name` that `unwanted(key, value)` picks: one batch read, a delete each."""
        key_type, value_type = MAP_LAYOUTS[name]
        for key, value in bpfmaps.read_map(self.maps[name], key_type, value_type):
            if unwanted(key, value):
                key = key_type(key) if isinstance(key, int) else key_type.from_buffer_copy(key)
                bpfmaps.delete(self.maps[name], key)

    def sync_endpoints(self, eps: list[Endpoint]) -> None:
        """Pods' filters are dumped and checked only where tc changed since the last round (tc's
        notifications: a filter or clsact removed by hand, a new pod), or everywhere when notifications
        were lost; each check is one lean dump per hook, each repair three pyroute2 requests. A pod whose
        filters stand and whose map entries all hold what they should (one batch read per map) is left alone."""
        touched = self._tc_events.drain() if self._tc_events is not None else None
        verified = set() if touched is None else self._filters_verified - touched
        held = {name: bpfmaps.read_raw(self.maps[name]) for name in POD_MAPS}
        with rtbulk.Rtnl() as nl:
            for ep in eps:
                if ep.host_ifindex in verified and all(held[name].get(bytes(key)) == bytes(value)
                                                       for name, key, value in itertools.chain(*self._pod_entries(ep))):
                    continue
                self.attach_pod(ep, lambda hook, program, ep=ep: ep.host_ifindex in verified or tc.running(
                    nl, ep.host_ifindex, hook, f"sknf_{program}", self._prog_ids[program]))
        self._filters_verified = {ep.host_ifindex for ep in eps}
        self._names = {ep.host_ifindex: ep.host_ifname for ep in eps}
        wanted = {_be32(ep.ip): ep.host_ifindex for ep in eps if ":" not in ep.ip}
        self._prune("endpoints", lambda key, entry: wanted.get(key) != entry.ifindex)
        wanted6 = {bytes(_addr6(ip6)): ep.host_ifindex for ep in eps if (ip6 := _ip6_of(ep))}
        self._prune("endpoints6", lambda key, entry: wanted6.get(bytes(key)) != entry.ifindex)
        macs = {bytes(_mac_key(ep.mac)) for ep in eps}
        self._prune("local_macs", lambda key, _: bytes(key) not in macs)
        live = {ep.host_ifindex for ep in eps}
        for name in ("pod_counters", "pod_refused", "pod_identity", "policy_drops"):
            self._prune(name, lambda key, _: key not in live)
        sources = {(ep.host_ifindex, _be32(ip)) for ep in eps for ip in ep.sources if ":" not in ip}
        self._prune("pod_sources", lambda key, _: (key.ifindex, key.addr) not in sources)
        sources6 = {bytes(_source6(ep.host_ifindex, ip)) for ep in eps for ip in ep.sources if ":" in ip}
        self._prune("pod_sources6", lambda key, _: bytes(key) not in sources6)
        if self._syncing and self._clusters is not None:
            self._finish_sync()

    def set_policy(self, compiled: Compiled) -> None:
        """Compile the selected endpoints' rules into policy_rules and flag each endpoint with the directions
        the programs decide, or ENDPOINT_POLICY (kernel path) when its rules do not fit (called after the
        nftables rules are in place). A changed endpoint's entries are written under its other generation,
        then its flags flip in one update: the programs see its old rules or its new ones, never a mix."""
        if self._policy_applied == (compiled.ingress, compiled.egress):
            return
        fd = self.maps["policy_rules"]
        present: dict[tuple[int, int], dict[bytes, bytes]] = {}  # (endpoint, direction | gen): {key: value}
        for key in bpfmaps.keys(fd, bpfmaps.PolicyKey):
            value = bpfmaps.lookup(fd, key, bpfmaps.PolicyPorts)
            if value is not None:
                present.setdefault((key.endpoint, key.direction), {})[bytes(key)] = bytes(value)
        fit, self.policy_kernel = bpfrules.compile_rules(compiled, bpfmaps.map_info(fd).max_entries // 2)
        flags = dict.fromkeys(self.policy_kernel, bpfmaps.ENDPOINT_POLICY)
        for ip, directions in fit.items():
            endpoint, old = _be32(ip), self._policy.get(ip, 0)
            gen = bpfmaps.POLICY_GEN if old & bpfmaps.ENDPOINT_POLICY_GEN else 0
            dir_flags = sum(_DIRECTION_FLAG[_DIRECTION[d]] for d in directions)
            want = {_DIRECTION[d] | gen: _policy_entries(endpoint, _DIRECTION[d] | gen, prefixes)
                    for d, prefixes in directions.items()}
            if old & ~bpfmaps.ENDPOINT_POLICY_GEN == dir_flags and \
                    all(present.get((endpoint, d), {}) == entries for d, entries in want.items()):
                flags[ip] = old
                continue
            gen ^= bpfmaps.POLICY_GEN
            want = {_DIRECTION[d] | gen: _policy_entries(endpoint, _DIRECTION[d] | gen, prefixes)
                    for d, prefixes in directions.items()}
            try:
                for d, entries in want.items():
                    for key in present.pop((endpoint, d), {}):  # leftovers of a generation not live
                        bpfmaps.delete(fd, bpfmaps.PolicyKey.from_buffer_copy(key))
                    for key, value in entries.items():
                        bpfmaps.update(fd, bpfmaps.PolicyKey.from_buffer_copy(key),
                                       bpfmaps.PolicyPorts.from_buffer_copy(value))
            except OSError as e:  # the map is full: nftables on the kernel path enforces it
                self.policy_kernel[ip] = f"policy map: {e.strerror}"
                flags[ip] = bpfmaps.ENDPOINT_POLICY
                continue
            flags[ip] = dir_flags | (bpfmaps.ENDPOINT_POLICY_GEN if gen else 0)
        self._policy = flags
        endpoints = bpfmaps.read_map(self.maps["endpoints"], ctypes.c_uint32, bpfmaps.EndpointInfo)
        for key, entry in endpoints:
            want_flags = entry.flags & ~bpfmaps.POLICY_FLAGS | flags.get(_ip(key), 0)
            if want_flags != entry.flags:
                entry.flags = want_flags
                bpfmaps.update(self.maps["endpoints"], ctypes.c_uint32(key), entry)
        self._selected = compiled.selected()
        owners = _owners(endpoints)
        for key, entry in bpfmaps.read_map(self.maps["endpoints6"], bpfmaps.Addr6, bpfmaps.EndpointInfo):
            selected = owners.get(entry.ifindex, _ip6(key)) in self._selected
            want_flags = entry.flags & ~bpfmaps.ENDPOINT_POLICY | (bpfmaps.ENDPOINT_POLICY if selected else 0)
            if want_flags != entry.flags:
                entry.flags = want_flags
                bpfmaps.update(self.maps["endpoints6"], bpfmaps.Addr6.from_buffer_copy(key), entry)
        live = {(_be32(ip), d | (bpfmaps.POLICY_GEN if f & bpfmaps.ENDPOINT_POLICY_GEN else 0))
                for ip, f in flags.items() if not f & bpfmaps.ENDPOINT_POLICY
                for d in (bpfmaps.POLICY_INGRESS, bpfmaps.POLICY_EGRESS)}
        for where, entries in present.items():
            if where not in live:
                for key in entries:
                    bpfmaps.delete(fd, bpfmaps.PolicyKey.from_buffer_copy(key))
        self._policy_applied = (compiled.ingress, compiled.egress)
        for ip, why in sorted(self.policy_kernel.items()):
            log.info("network policy: %s is enforced on the kernel path: %s", ip, why)

    def read_counters(self) -> dict[str, PodCounters]:
        return _pod_counters(self.maps["pod_identity"], self.maps["pod_counters"], self.maps["pod_refused"],
                             self.maps["policy_drops"], self._names)

    def cleanup(self) -> None:
        self.close()
        remove_bpf_leftovers(self.pin_dir)

    def close(self) -> None:
        """Stop the flow sweeper; programs, filters and pins stay (that is what a restart relies on)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join()
        if self._reader is not None:
            self._reader.close()
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (*self.fds.values(), *self.maps.values()):
            os.close(fd)
        self.fds, self.maps = {}, {}
        if self._tc_events is not None:
            self._tc_events.close()
            self._tc_events = None

    def _finish_sync(self) -> None:
        """Every filter runs these programs now, and they learn every new flow: take over the retired
        map's entries and conntrack's NATed flows (those that began before), then let the fast path go."""
        refused = 0
        for name, retired in self._retired():
            with bpfmaps.pinned(retired) as old:
                entries = bpfmaps.read_map(old, *MAP_LAYOUTS[name])
            refused += self._learn(entries)
            retired.unlink()
            log.info("learned-flow map %s resized to %d entries: %d entries copied", name, self.capacity, len(entries))
        seeds = flows.nat_reply_tuples(self._clusters or []) or set()
        refused += self._learn((_flow_key(t), bpfmaps.FlowState(0)) for t in seeds)
        if refused:
            self._set_guard(GUARD_FULL, 1)
        self._set_guard(GUARD_SYNCING, 0)
        self._syncing = False
        log.info("learned flows seeded from conntrack: %d NATed flows%s", len(seeds),
                 f", {refused} did not fit" if refused else "")
        self._note_full()

    def _retired(self) -> list[tuple[str, Path]]:
        """(flow map, its retired pin) of each flow map the loader resized and whose entries are not copied yet."""
        retired = [(name, self.pin_dir / (name + bpfload.RETIRED)) for name in bpfload.FLOW_MAPS]
        return [(name, path) for name, path in retired if path.exists()]

    def _learn(self, entries: Iterable[tuple[bpfmaps.FlowKey | bpfmaps.Flow6Key, bpfmaps.FlowState]]) -> int:
        """Write entries into the learned-flow map of their family; returns how many the full map refused."""
        refused = 0
        for key, state in entries:
            try:
                bpfmaps.update(self.maps[_flow_map(key)], key, state)
            except OSError as e:
                if e.errno != errno.E2BIG:
                    raise
                refused += 1
        return refused

    def _guard(self, slot: int) -> int:
        return _guard_slot(self.maps["flow_guard"], slot)

    def _set_guard(self, slot: int, value: int) -> None:
        bpfmaps.update(self.maps["flow_guard"], ctypes.c_uint32(slot), ctypes.c_uint64(value))

    def _relieve(self) -> None:
        """Clear FULL once there is room again. The flows whose learn failed are unknown, but all that
        matter are NATed and in conntrack: seed those first, and clear only if the map then has room
        and no learn failed in the meantime (else its flow might have missed the seeding)."""
        if not self._guard(GUARD_FULL) or self._clusters is None:
            return
        failed = self._guard(GUARD_FAILED_LEARNS)
        if self._fullest() > ROOM * self.capacity:
            return
        seeds = flows.nat_reply_tuples(self._clusters)
        if seeds is None or self._learn((_flow_key(t), bpfmaps.FlowState(0)) for t in seeds):
            return
        if self._fullest() > ROOM * self.capacity:
            return
        self._set_guard(GUARD_FULL, 0)
        if self._guard(GUARD_FAILED_LEARNS) != failed:
            self._set_guard(GUARD_FULL, 1)

    def _fullest(self) -> int:
        """The entries of the fuller learned-flow map (each family's has the same capacity)."""
        return max(bpfmaps.count(self.maps[name]) for name in bpfload.FLOW_MAPS)

    def _note_full(self) -> None:
        """One log line each time the map fills up or has room again."""
        full = bool(self._guard(GUARD_FULL))
        if full and not self._full_seen:
            log.warning("learned-flow map full (%d entries, %d learns refused): pod traffic takes the kernel path "
                        "until there is room", self.capacity, self._guard(GUARD_FAILED_LEARNS))
        elif self._full_seen and not full:
            log.warning("learned-flow map has room again (%d of %d entries): fast path back on",
                        self._fullest(), self.capacity)
        self._full_seen = full

    def flow_table(self) -> flows.FlowTable:
        """The learned-flow map's occupancy and guard, for metrics and `sknf stats`."""
        return _flow_table([self.maps[name] for name in bpfload.FLOW_MAPS], self.maps["flow_guard"])

    def watch_events(self, sink: Callable[[events.RawEvent], None]) -> None:
        """Hand every flow event the programs report to sink, from a thread of its own, until close()."""
        if self._reader is None:
            self._reader = events.RingReader(self.maps["events"], sink)

    def events_lost(self) -> int:
        """Events the programs could not queue (the ring buffer was full), ever."""
        return events.lost(self.maps["events_lost"])

    def learned_flows(self) -> dict[flows.FlowTuple, bool]:
        """{tuple: exempt} of the kernel_flows map."""
        return {_flow_tuple(k): bool(v.exempt) for _, k, v in self._flow_entries()}

    def sweep_flows(self) -> tuple[int, int]:
        """One sweep of the learned-flow map against conntrack, then FULL cleared if there is room;
        returns (marked exempt, deleted).

        The map is read before conntrack: an entry is learned only after its conntrack entry
        exists, so a fresh flow can never look dead.
        """
        snapshot = self._flow_entries()
        keys = {_flow_tuple(k): (self.maps[name], k) for name, k, _ in snapshot}
        learned = {_flow_tuple(k): bool(v.exempt) for _, k, v in snapshot}
        alive = flows.alive(learned)
        if alive is None:
            return 0, 0
        plan = flows.plan_sweep(learned, alive)
        for t, exempt in [(t, 1) for t in plan.mark] + [(t, 0) for t in plan.unmark]:
            bpfmaps.update(*keys[t], bpfmaps.FlowState(exempt))
        for t in plan.delete:
            state = bpfmaps.lookup(*keys[t], bpfmaps.FlowState)
            if state is not None and state.exempt:  # not re-learned while conntrack was being read
                bpfmaps.delete(*keys[t])
        if plan.mark or plan.delete:
            log.debug("learned flows: %d marked exempt, %d deleted", len(plan.mark), len(plan.delete))
        self._relieve()
        self._note_full()
        return len(plan.mark), len(plan.delete)

    def _flow_entries(self) -> list[tuple[str, Any, bpfmaps.FlowState]]:
        """(map, key, state) of both families' learned flows."""
        return [(name, key, state) for name in bpfload.FLOW_MAPS
                for key, state in bpfmaps.read_map(self.maps[name], *MAP_LAYOUTS[name])]

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.sweep_interval):
            try:
                self.sweep_flows()
                sweep_policy_flows(self.maps["policy_flows"])
            except Exception:  # keep sweeping: a failed round only delays forgetting
                log.exception("learned-flow sweep failed")


def read_pinned_counters(pin_dir: Path) -> dict[str, PodCounters]:
    """Per-pod counters of a node whose agent is not running, read from the pinned maps in place.

    Nothing is compiled or loaded (see bpfmaps); FileNotFoundError when the maps are not pinned.
    """
    with (bpfmaps.pinned(pin_dir / "pod_identity") as identities, bpfmaps.pinned(pin_dir / "pod_counters") as counters,
          bpfmaps.pinned(pin_dir / "pod_refused") as refused, bpfmaps.pinned(pin_dir / "policy_drops") as policy):
        return _pod_counters(identities, counters, refused, policy)


def sweep_policy_flows(fd: int, now_ns: int | None = None) -> int:
    """Forget the allowed flows (policy_flows) idle for longer than conntrack would keep them; returns how
    many went. Each is looked up again right before its delete: a frame in between keeps it."""
    now = time.clock_gettime_ns(time.CLOCK_BOOTTIME) if now_ns is None else now_ns
    timeouts = {proto: _ct_timeout(*what) for proto, what in CT_TIMEOUTS.items()}
    closing, other = _ct_timeout(*CT_CLOSING), _ct_timeout(*CT_OTHER)
    gone = 0
    for key, flow in bpfmaps.read_map(fd, bpfmaps.FlowKey, bpfmaps.PolicyFlow):
        limit = closing if flow.closing else timeouts.get(key.proto, other)
        if now - flow.last_seen <= limit * 1_000_000_000:
            continue
        again = bpfmaps.lookup(fd, key, bpfmaps.PolicyFlow)
        if again is not None and again.last_seen == flow.last_seen and bpfmaps.delete(fd, key):
            gone += 1
    return gone


def read_pinned_flow_table(pin_dir: Path) -> flows.FlowTable:
    """The learned-flow map of a node whose agent is not running, from the pins; FileNotFoundError without."""
    with contextlib.ExitStack() as pins_open:
        tables = [pins_open.enter_context(bpfmaps.pinned(pin_dir / name)) for name in bpfload.FLOW_MAPS]
        guard = pins_open.enter_context(bpfmaps.pinned(pin_dir / "flow_guard"))
        for name, fd in zip(bpfload.FLOW_MAPS, tables, strict=True):
            bpfmaps.check_layout(fd, *MAP_LAYOUTS[name])
        bpfmaps.check_layout(guard, *MAP_LAYOUTS["flow_guard"])
        return _flow_table(tables, guard)


def _flow_table(table_fds: list[int], guard_fd: int) -> flows.FlowTable:
    """The fuller of the two families' maps (what fills first sends every pod frame to the kernel path); each
    map holds `capacity`."""
    return flows.FlowTable(entries=max(map(bpfmaps.count, table_fds)),
                           capacity=bpfmaps.map_info(table_fds[0]).max_entries,
                           full=bool(_guard_slot(guard_fd, GUARD_FULL)),
                           syncing=bool(_guard_slot(guard_fd, GUARD_SYNCING)),
                           failed_learns=_guard_slot(guard_fd, GUARD_FAILED_LEARNS))


def _guard_slot(fd: int, slot: int) -> int:
    value = bpfmaps.lookup(fd, ctypes.c_uint32(slot), ctypes.c_uint64)
    return value.value if value is not None else 0


def _pod_counters(identity_fd: int, counters_fd: int, refused_fd: int, policy_fd: int,
                  names: Mapping[int, str] | None = None) -> dict[str, PodCounters]:
    """Every attached pod (a pod without traffic yet reads zero), per-CPU values summed, keyed by host veth;
    drops include the kernel's for the link, the programs' NetworkPolicy drops are refused reason `policy`.
    Attached pods are those with an identity (an IPv6-only pod has no IPv4 endpoint entry). `names`: host
    veths by ifindex, as far as known (others are resolved here)."""
    names = names or {}
    with rtbulk.Rtnl() as nl:
        links = nl.link_stats()
    counted = dict(bpfmaps.read_map(counters_fd, ctypes.c_uint32, bpfmaps.CounterValues))
    refused = dict(bpfmaps.read_map(refused_fd, ctypes.c_uint32, bpfmaps.RefusedValues))
    by_policy = {k: sum(v) for k, v in bpfmaps.read_map(policy_fd, ctypes.c_uint32, ctypes.c_uint64)}
    out = {}
    for key, _ in bpfmaps.read_map(identity_fd, ctypes.c_uint32, bpfmaps.PodIdentity):
        ifindex = int(key)
        if (stats := links.get(ifindex)) is None:
            continue  # the pod's veth is gone: its DEL is under way
        if (name := names.get(ifindex)) is None:
            try:
                name = socket.if_indextoname(ifindex)
            except OSError:
                continue  # gone since the statistics were read
            if not name.startswith(HOST_VETH_PREFIX):
                continue  # not a pod's host veth (a stale entry whose ifindex was reused)
        per_cpu = counted.get(ifindex)
        sums = bpfmaps.sum_cpus(per_cpu) if per_cpu is not None else dict.fromkeys(bpfmaps.COUNTER_FIELDS, 0)
        sums["drops"] += stats.rx_dropped + stats.tx_dropped
        per_cpu = refused.get(ifindex)
        reasons = (bpfmaps.sum_cpus(per_cpu, bpfmaps.REFUSED_FIELDS) if per_cpu is not None
                   else dict.fromkeys(bpfmaps.REFUSED_FIELDS, 0))
        if by_policy.get(ifindex):
            reasons["policy"] = by_policy[ifindex]
        out[name] = PodCounters(**sums, refused=reasons)
    return out


def _run_loader(bpf_dir: Path, pin_dir: Path, max_flows: int) -> None:
    """Compile, load and pin the programs in a child process (see bpfload); BpfUnavailable with its reason."""
    root = str(Path(sknf.__file__).resolve().parents[1])  # the child imports this very sknf
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "sknf.datapath.bpfload", str(bpf_dir), str(pin_dir),
                           str(max_flows)], capture_output=True, text=True, env=env, check=False)
    if done.stderr.strip():
        log.debug("BPF loader output:\n%s", done.stderr.strip())
    if done.returncode == bpfload.FAILED:
        raise BpfUnavailable(done.stdout.strip())
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise BpfUnavailable(f"BPF loader failed: {tail[0]}")


def _probe_tc(fd: int) -> None:
    """Attach a loaded program to a throwaway veth: proves clsact and cls_bpf exist before we rely on them."""
    with netlink.route() as ipr:
        netlink.delete_link(ipr, PROBE_LINK)  # left by a crash mid-probe
        try:
            ipr.link("add", ifname=PROBE_LINK, kind="veth", peer=f"{PROBE_LINK}-p")
            tc.attach(ipr, netlink.link_index(ipr, PROBE_LINK), tc.INGRESS, fd, "sknf_probe")
        except NetlinkError as e:
            raise BpfUnavailable(f"cannot attach a tc program (clsact qdisc, cls_bpf): {os.strerror(e.code)}") from None
        finally:
            netlink.delete_link(ipr, PROBE_LINK)


def ensure_bpffs(pin_dir: Path) -> None:
    """The pin directory exists on a bpf filesystem; /sys/fs/bpf is mounted if nothing is (fresh boot)."""
    if pins.fs_type(pin_dir) != "bpf":
        if not pin_dir.is_relative_to(pins.BPFFS):
            raise BpfUnavailable(f"bpf_pin_dir {pin_dir} is not on a bpf filesystem")
        libc = ctypes.CDLL(None, use_errno=True)
        if pins.fs_type(pins.BPFFS) != "bpf" and libc.mount(b"bpf", str(pins.BPFFS).encode(), b"bpf", 0, None):
            raise BpfUnavailable(f"cannot mount bpffs on {pins.BPFFS}: {os.strerror(ctypes.get_errno())}")
    pin_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


def _max_flows(configured: int | None = None) -> int:
    """The configured capacity, else one learned flow per conntrack entry at most (the module may be
    absent: then the default)."""
    if configured is not None:
        return configured
    try:
        return int(Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())
    except (OSError, ValueError):
        return DEFAULT_MAX_FLOWS


_DIRECTION = {"ingress": bpfmaps.POLICY_INGRESS, "egress": bpfmaps.POLICY_EGRESS}
_DIRECTION_FLAG = {bpfmaps.POLICY_INGRESS: bpfmaps.ENDPOINT_INGRESS, bpfmaps.POLICY_EGRESS: bpfmaps.ENDPOINT_EGRESS}


def _policy_entries(endpoint: int, direction: int, prefixes: list[bpfrules.Prefix]) -> dict[bytes, bytes]:
    """{policy_key: policy_ports} of one endpoint direction's prefixes (as bytes: comparable with the map's)."""
    out = {}
    for net, length, ports in prefixes:
        key = bpfmaps.PolicyKey(prefixlen=bpfmaps.POLICY_KEY_BITS + length, endpoint=endpoint,
                                direction=direction, peer=_be32(ipaddress.IPv4Address(net)))
        value = bpfmaps.PolicyPorts(any=int(ports is None), count=len(ports or ()))
        for i, (proto, first, last) in enumerate(ports or ()):
            value.ranges[i] = bpfmaps.PortRange(proto=proto, first=first, last=last)
        out[bytes(key)] = bytes(value)
    return out


def _ct_timeout(name: str, default: int) -> int:
    try:
        return int(Path(f"/proc/sys/net/netfilter/nf_conntrack_{name}").read_text())
    except (OSError, ValueError):
        return default


def _source6(ifindex: int, addr: str) -> bpfmaps.Source6Key:
    key = bpfmaps.Source6Key(ifindex=ifindex)
    key.addr[:] = ipaddress.IPv6Address(addr).packed
    return key


# A family the cluster does not have: for IPv4 a /32 no pod holds, for IPv6 an all-zero mask (config6 off).
NO_NET = {4: ipaddress.IPv4Network("0.0.0.0/32"), 6: ipaddress.IPv6Network("::/0")}


def _family_net(cidrs: Iterable[str], family: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The network of that family among cidrs, else NO_NET's."""
    return next((net for net in map(ipaddress.ip_network, cidrs) if net.version == family), NO_NET[family])


def _ip6_of(ep: Endpoint) -> str:
    """The pod's own IPv6 address (dual-stack: ip6; IPv6-only: ip), or ""."""
    return ep.ip6 or (ep.ip if ":" in ep.ip else "")


def _addr6(addr: str) -> bpfmaps.Addr6:
    key = bpfmaps.Addr6()
    key.a[:] = socket.inet_pton(socket.AF_INET6, addr)
    return key


def _packed6(ep: Endpoint) -> bytes:
    return bytes(_addr6(ip6)) if (ip6 := _ip6_of(ep)) else b""


def _ip6(key: Any) -> str:
    return socket.inet_ntop(socket.AF_INET6, bytes(key))


def _be32(addr: str | ipaddress.IPv4Address) -> int:
    """An IPv4 address as the native integer whose bytes are in network order (__be32 in C). inet_pton, not
    ipaddress: the reconcile converts a few per pod (ipaddress parses in Python, ~20 µs each)."""
    packed = addr.packed if isinstance(addr, ipaddress.IPv4Address) else socket.inet_pton(socket.AF_INET, addr)
    return int.from_bytes(packed, sys.byteorder)


def _ip(be32: int) -> str:
    return socket.inet_ntop(socket.AF_INET, be32.to_bytes(4, sys.byteorder))


def _owners(endpoints: list[tuple[int, bpfmaps.EndpointInfo]]) -> dict[int, str]:
    """{host veth ifindex: first address} of the endpoints with an IPv4 entry (the endpoints map's entries)."""
    return {entry.ifindex: _ip(key) for key, entry in endpoints}


def _port(be16: int) -> int:
    return int.from_bytes(be16.to_bytes(2, sys.byteorder), "big")


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _mac_key(text: str) -> bpfmaps.MacKey:
    key = bpfmaps.MacKey()
    key.mac[:] = _mac(text)
    return key


def _flow_map(key: Any) -> str:
    return "kernel_flows6" if isinstance(key, bpfmaps.Flow6Key) else "kernel_flows"


def _flow_tuple(key: Any) -> flows.FlowTuple:
    addr = _ip6 if isinstance(key, bpfmaps.Flow6Key) else _ip
    return addr(key.saddr), addr(key.daddr), _port(key.sport), _port(key.dport), key.proto


def _flow_key(t: flows.FlowTuple) -> bpfmaps.FlowKey | bpfmaps.Flow6Key:
    saddr, daddr, sport, dport, proto = t
    if ":" in saddr:
        key = bpfmaps.Flow6Key(sport=_port(sport), dport=_port(dport), proto=proto)
        key.saddr[:], key.daddr[:] = (socket.inet_pton(socket.AF_INET6, a) for a in (saddr, daddr))
        return key
    return bpfmaps.FlowKey(saddr=_be32(saddr), daddr=_be32(daddr), sport=_port(sport), dport=_port(dport),
                           proto=proto)
