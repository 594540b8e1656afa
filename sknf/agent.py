"""The node agent: the one place where sknf's parts are wired together.

Start-up order matters and is the contract with kubelet:
1. configuration, the node's pod subnet, the address store, the datapath (BPF or kernel);
2. a first full reconcile of the node (bridge, VXLAN, sysctls, iptables, peers, datapath);
3. DEL requests the plugin queued while no agent was running are replayed;
4. the CNI socket and the metrics/health endpoints start serving;
5. only then, if configured, the plugin and its conflist are installed: kubelet reports the node
   NotReady until a conflist exists, so no pod is scheduled before its network can be built.
Then it reconciles on a timer and as soon as the peer source changes (inotify on the peers file's
directory, or the Node watch pokes it: `sknf.wakeup`). Stopping the agent leaves the
network as it is: running pods keep forwarding, and the next agent picks everything up.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import logging
import signal
import threading
import time
from pathlib import Path

from sknf import api, cni, flowlog, ipam, iptables, overlay, pod
from sknf.config import Config, Network, load
from sknf.datapath import NodeNet
from sknf.datapath.select import choose
from sknf.health import PeerHealth
from sknf.logbuffer import FORMAT, LogBuffer
from sknf.metrics import Metrics, Snapshot, take_snapshot
from sknf.peers import Node, PeerSource, StaticPeerSource, join_subnets, pod_subnets
from sknf.policy.enforcer import Enforcer, source_for
from sknf.stats import Sampler, handle_query
from sknf.wakeup import Wakeup

log = logging.getLogger("sknf.agent")

# Seconds between the stats sampler's ticks: rates want a sample at least a second old, the refusal log
# reports at most once a minute; a snapshot costs ~20 ms at 1,000 pods (the kernel's link statistics).
SAMPLE_PERIOD = 2.0


def peer_source(cfg: Config) -> PeerSource:
    if cfg.peer_source == "kubernetes":
        from sknf.kube import KubePeerSource  # the kubernetes client costs 0.3 s to import

        return KubePeerSource(cfg)
    return StaticPeerSource(cfg.peers_file, cfg.underlay_family)


def node_pod_cidrs(cfg: Config, source: PeerSource, peers: list[Node]) -> tuple[Network, ...]:
    """This node's pod subnet of each cluster family, IPv4 first: configured, else what the cluster
    assigned, else carved without collisions."""
    found = {n.version: n for n in cfg.pod_cidrs}
    own = next((p for p in peers if p.name == cfg.node_name and p.pod_cidr), None)
    for net in pod_subnets(own.pod_cidr if own is not None else None):
        found.setdefault(net.version, net)
    assigned = getattr(source, "own_pod_cidr", None)
    if any(f not in found for f in cfg.families) and assigned is not None and (cidr := assigned()) is not None:
        for net in pod_subnets(cidr):
            found.setdefault(net.version, net)
        if missing := [f for f in cfg.families if f not in found]:
            log.warning("node %s: the cluster assigned pod subnets %s, none of IPv%s that cluster_cidr has; carving "
                        "one", cfg.node_name, cidr, missing[0])
    for family in cfg.families:
        if family in found:
            continue
        taken = [n for p in peers if p.name != cfg.node_name for n in pod_subnets(p.pod_cidr)]
        carved = ipam.carve_subnet(cfg.cidr(family), cfg.subnet_prefix(family), taken, cfg.state_dir)
        if carved.replaced is not None:
            log.warning("pod subnet %s now collides with another node's; moved to %s", carved.replaced, carved.subnet)
        found[family] = carved.subnet
    return tuple(found[f] for f in cfg.families)


class Agent:
    def __init__(self, cfg: Config, log_buffer: LogBuffer | None = None) -> None:
        self.cfg = cfg
        self.log_buffer = log_buffer or LogBuffer()
        self.source = peer_source(cfg)
        self.peers = self.source.nodes()
        self.pod_cidrs = node_pod_cidrs(cfg, self.source, self.peers)
        self.pod_cidr = self.pod_cidrs[0]
        self.store = ipam.Store(cfg.state_dir, self.pod_cidrs)
        self.datapath = choose(cfg)
        self.iptables = iptables.detect()  # once, as kube-proxy's wrapper does: a restart decides alike
        self.node: overlay.NodeOverlay | None = None
        self.net = pod.PodNetwork(cfg, self.store, self.datapath, lambda: self.node)
        policies = source_for(cfg, getattr(self.source, "api", None))
        self.policy = Enforcer(policies, self.datapath) if policies is not None else None
        self.metrics = Metrics(cfg.node_name, self.snapshot)
        self.sampler = Sampler()
        self.health = PeerHealth(cfg.node_name, lambda: self.peers, self.metrics.registry)
        self.flows: flowlog.FlowLog | None = None
        if hasattr(self.datapath, "watch_events") and cfg.flow_events:
            self.flows = flowlog.FlowLog(flowlog.Resolver(self.node_view), self.datapath.events_lost)
        self.stop = threading.Event()
        self.wakeup = Wakeup()
        self.serving = False
        self._servers: list = []

    # -- reconcile -----------------------------------------------------------------------------
    def reconcile(self) -> None:
        """Bring the node to the desired state; every step is idempotent, the first failure aborts the round."""
        self.recover_store()  # before anything reads leases
        if self.source.changed():
            self.peers = self.source.nodes()
        node = overlay.ensure_node(self.cfg, self.pod_cidrs)
        skipped = overlay.ensure_neighbour_tables(self.cfg, self.pod_cidr, len(self.peers))
        if skipped and self.node is None:
            log.info("%s", skipped)
        # iptables (its own processes, ~0.5 s for 5,000 peers) alongside the netlink work, not after it
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sknf-rules") as pool:
            rules = pool.submit(overlay.ensure_rules, self.cfg, node, self.peers, self.iptables)
            overlay.sync_peers(node, self.peers, self.cfg.node_name)
            overlay.sync_peer_routes(self.cfg, node, self.peers, self.cfg.node_name)
            rules.result()
        self.datapath.setup_node(NodeNet(bridge_ifindex=node.bridge_ifindex, vxlan_ifindex=node.vxlan_ifindex,
                                         gateway_ip=node.gateway_ip, gateway_mac=node.gateway_mac,
                                         cluster_cidrs=tuple(map(str, self.cfg.cluster_cidrs)),
                                         pod_cidrs=tuple(map(str, self.pod_cidrs))))
        if self.node is None or (self.node.underlay_ip, self.node.mtu) != (node.underlay_ip, node.mtu):
            # first round, DHCP moved the address, or the underlay MTU changed
            self.source.publish_self(Node(self.cfg.node_name, node.underlay_ip, join_subnets(self.pod_cidrs),
                                          mtu=node.mtu))
        self.node = node
        self.replay_pending_dels()  # DELs the plugin queued while this agent was down or too slow
        try:
            lost = pod.sync_pods(self.net, node)
        except ipam.CorruptStore as e:  # a lease damaged in place: only sync_pods' full read sees it
            self.rebuild_store(f"{e.msg} ({e.details})")
            lost = pod.sync_pods(self.net, node)
        if lost:
            self.rebuild_store(f"{len(lost)} live pods hold no lease")
        self.sync_policy()

    def sync_policy(self) -> None:
        """Enforce NetworkPolicy for the current leases now (each reconcile, after an ADD or DEL, on a source
        change). A failure never holds the node's network or a CNI answer hostage: logged, counted, retried."""
        if self.policy is None or self.node is None:
            return
        try:
            with self.net.datapath_lock:  # no attach_pod between the rules and the endpoints' flags
                self.policy.sync(self.store.current())
        except Exception as e:  # the next reconcile retries
            self.metrics.reconcile_error("policy")
            log.exception("network policy: applying failed: %s", e)

    def recover_store(self) -> None:
        """A lease store that no longer reads is rebuilt from the records on the pods' host veths.

        Never reset to empty: that would hand the addresses of running pods to new ones. The store is
        read again only if its directories changed (`Store.current`); sync_pods reads every lease.
        """
        try:
            self.store.current()
        except ipam.CorruptStore as e:
            self.rebuild_store(f"{e.msg} ({e.details})")

    def rebuild_store(self, why: str) -> None:
        added = pod.rebuild_from_host(self.net)
        if added:
            self.metrics.reconcile_error("lease store")
        log.warning("IPAM store: %s; rebuilt it from the host, %d leases restored%s", why, len(added),
                    "".join(f", {lease.ip} ({lease.namespace}/{lease.pod})" for lease in added))

    def _reconcile_logged(self) -> None:
        try:
            self.reconcile()
        except Exception as e:  # keep running: the next round may succeed (API back, link returned)
            self.metrics.reconcile_error(type(e).__name__)
            log.exception("reconcile failed: %s", e)

    # -- serving -------------------------------------------------------------------------------
    def handle_cni(self, req: cni.Request) -> dict | None:
        started = time.perf_counter()
        result = "error"
        try:
            out = pod.VERBS[req.command](self.net, req)
            result = "success"
            if req.command in ("ADD", "DEL"):
                self.sync_policy()
            return out
        finally:
            self.metrics.observe_cni(req.command, result, time.perf_counter() - started)

    def snapshot(self) -> Snapshot:
        return take_snapshot(self.cfg.node_name, self.store, self.datapath,
                             peers=sum(1 for p in self.peers if p.name != self.cfg.node_name),
                             policy_drops=self.policy.drops() if self.policy is not None else None)

    def health_report(self, req: dict) -> dict:
        """{"op": "health"}: what `sknf doctor` needs from the running agent (probe=true: peers probed now)."""
        node = self.node
        flow_table = getattr(self.datapath, "flow_table", None)  # only the BPF datapath learns flows
        return {"node": self.cfg.node_name, "datapath": {"mode": self.datapath.mode, "reason": self.datapath.reason},
                "iptables": self.iptables.mode,
                "pod_cidr": join_subnets(self.pod_cidrs), "mtu": node.mtu if node else None,
                "underlay_ip": node.underlay_ip if node else None,
                "peers": [{"name": p.name, "underlay_ip": p.underlay_ip, "pod_cidr": p.pod_cidr, "mtu": p.mtu}
                          for p in self.peers],
                "unaddressed": getattr(self.source, "unaddressed", list)(),  # Nodes that cannot be peers
                "ipam": {"allocated": self.store.allocated, "capacity": self.store.capacity},
                "flows": dataclasses.asdict(flow_table()) if flow_table is not None else None,
                "probes": self.health.report(fresh=bool(req.get("probe")))}

    def stats(self, _req: dict) -> dict:
        reply = {**handle_query(self.sampler, self.snapshot()), "iptables": self.iptables.mode}
        return self.policy.annotate(reply) if self.policy is not None else reply

    def node_view(self) -> flowlog.NodeView:
        """What flow events are resolved against: this node's leases and the peers."""
        return flowlog.NodeView(self.cfg.node_name, self.cfg.cluster_cidrs, self.store.current(), list(self.peers))

    def flows_handler(self) -> api.Handler:
        if self.flows is not None:
            return self.flows.query
        if self.datapath.mode == "bpf":
            return flowlog.unavailable("bpf", "flow events are off (flow_events: false in the agent's settings)")
        return flowlog.unavailable(self.datapath.mode, f"the {self.datapath.mode} datapath has no flow events "
                                   "(they come from the eBPF programs: datapath bpf)")

    def request_stop(self) -> None:
        self.stop.set()
        self.wakeup.poke()

    def ready(self) -> bool:
        return self.node is not None and self.serving

    def replay_pending_dels(self) -> None:
        for raw in cni.drain_pending_dels(self.cfg.state_dir):
            try:
                pod.delete(self.net, cni.parse_request(raw["env"], raw["config"]))
            except Exception as e:
                log.error("replaying a queued DEL failed: %s", e)

    def run(self) -> None:
        log.info("sknf agent on %s: cluster %s, pod subnet %s, datapath %s%s", self.cfg.node_name,
                 join_subnets(self.cfg.cluster_cidrs), join_subnets(self.pod_cidrs), self.datapath.mode,
                 f" ({self.datapath.reason})" if self.datapath.reason else "")
        log.info("iptables backend %s (%s)", self.iptables.mode, self.iptables.reason)
        self.reconcile()  # the first one must succeed: a node without its network must not serve
        if self.flows is not None:
            self.datapath.watch_events(self.flows.add)
        # Metrics before the CNI socket: once STATUS answers (what the lab and the plugin call ready),
        # everything the agent serves is up.
        self._servers.append(self.metrics.serve(self.cfg.metrics_host_port, self.ready))
        self._servers.append(api.serve(self.cfg.socket_path, {
            "cni": self.handle_cni,
            "stats": self.stats,
            "health": self.health_report,
            "logs": lambda _req: {"lines": self.log_buffer.tail()},
            "flows": self.flows_handler(),
        }))
        self.serving = True
        self.health.start()
        if self.cfg.install_cni:
            from sknf import install

            install.install(self.cfg)
        log.info("ready: serving CNI on %s, metrics on %s", self.cfg.socket_path, self.cfg.metrics_bind)
        self.source.watch(self.wakeup)
        next_full = time.monotonic() + self.cfg.reconcile_interval
        next_tick = time.monotonic() + SAMPLE_PERIOD
        while not self.stop.is_set():
            self.wakeup.sleep(next_tick - time.monotonic())  # early when the peers changed, or to stop
            if self.stop.is_set():
                break
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + SAMPLE_PERIOD
                try:
                    self.sampler.tick(self.snapshot())
                except ipam.CorruptStore:
                    next_full = 0.0  # reconcile now: it rebuilds the store
            if self.source.changed() or time.monotonic() >= next_full:
                self._reconcile_logged()
                next_full = time.monotonic() + self.cfg.reconcile_interval
            elif self.policy is not None and self.policy.source.changed():
                self.sync_policy()
        self.wakeup.close()
        self.health.close()
        if self.policy is not None:
            self.policy.close()
        for server in self._servers:
            server.shutdown()
        self.datapath.close()
        log.info("stopped; pod networking stays in place")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, help="YAML settings (environment variables override)")


def run(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    logging.basicConfig(level=cfg.log_level.upper(), format=FORMAT)
    buffer = LogBuffer()
    logging.getLogger().addHandler(buffer)
    agent = Agent(cfg, buffer)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.request_stop())
    agent.run()
    return 0
