"""The Kubernetes peer source: Node objects in, this node's VTEP facts out (Flannel's kube subnet manager).

Why it works this way:
- The overlay needs three facts per node: its underlay (VTEP) address, its pod subnet and, optionally,
  its VTEP MAC. Kubernetes already holds the pod subnet (spec.podCIDRs, allocated by the controller
  manager when the cluster was made with a pod network CIDR) and an InternalIP. What it cannot know --
  the address of HOST_PHYSICAL_IF, which may differ from the InternalIP, the VXLAN device's MAC, and a
  subnet the agent carved itself when the cluster allocates none -- each agent publishes as annotations
  on its own Node under one prefix, `sknf.io/`, as Flannel does with `flannel.alpha.coreos.com/`.
  Annotations written by other nodes are validated; a bad value is ignored (and logged once), falling
  back to the InternalIP for the address. Both are of the cluster's underlay family (`underlay_family`):
  over an IPv6 underlay the agent publishes its IPv6 address and reads the Nodes' IPv6 InternalIPs, and an
  annotation of the other family is ignored like any bad value.
- One background thread lists the Nodes, then watches from the list's resourceVersion, keeping only the
  projection the overlay needs (not whole Node objects: those carry image lists and conditions). The
  agent polls changed()/nodes() from its reconcile loop, so no callback crosses threads.
- A watch that ends (the server's timeout) resumes from the last resourceVersion seen; 410 Gone means
  that version was compacted away, so it relists. Any other failure backs off exponentially (capped,
  jittered so a restarted API server is not hit by every node at once) and resets on success. A relist
  every `resync` seconds repairs whatever a watch could miss; a node missing from a list is gone.
- Services need nothing from here: ClusterIP translation stays with kube-proxy in the node's stack, and
  the eBPF fast path keeps replies of translated flows on that stack (it remembers every flow that went
  through it), so no Service or Endpoints object is read and RBAC grants Nodes only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sknf.config import Config, Network, networks
from sknf.peers import Node, join_subnets, pod_subnets, underlay_address
from sknf.wakeup import Wakeup

log = logging.getLogger(__name__)

PREFIX = "sknf.io/"
UNDERLAY_IP = PREFIX + "underlay-ip"
VTEP_MAC = PREFIX + "vtep-mac"
POD_CIDR = PREFIX + "pod-cidr"  # set only when the agent carved its subnet (the Node has no spec.podCIDR)
MTU = PREFIX + "mtu"  # the node's pod/overlay MTU, for `sknf doctor`'s cross-node comparison
ANNOTATIONS = (UNDERLAY_IP, VTEP_MAC, POD_CIDR, MTU)

MERGE_PATCH = "application/merge-patch+json"  # names only our keys; null deletes one
REQUEST_TIMEOUT = (5.0, 30.0)  # connect, read: for everything but watches
WAIT_LOG_EVERY = 15.0  # while waiting for spec.podCIDR, say so this often
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class KubeError(RuntimeError):
    """The API server cannot be used (config, connection, permission); the message says what to check."""


def connect(cfg: Config) -> Any:
    """A CoreV1Api from cfg.kubeconfig, or from the pod's service account when it is unset."""
    from kubernetes import client, config  # imported here: it costs 0.3 s, and only this peer source needs it

    try:
        if cfg.kubeconfig is not None:
            return client.CoreV1Api(config.new_client_from_config(config_file=str(cfg.kubeconfig)))
        conf = client.Configuration()
        config.load_incluster_config(client_configuration=conf)
        return client.CoreV1Api(client.ApiClient(conf))
    except (config.ConfigException, OSError) as e:
        where = f"kubeconfig {cfg.kubeconfig}" if cfg.kubeconfig else "in-cluster service account"
        raise KubeError(f"{where}: {e} (set kubeconfig, or run in a pod with a service account)") from None


def _api_errors() -> tuple[type[BaseException], ...]:
    """What a failed API call raises: an HTTP status, a transport error, or a garbled body."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    return (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError)


def _describe(e: BaseException) -> str:
    status = getattr(e, "status", None)
    if status:
        return f"HTTP {status} {getattr(e, 'reason', '') or ''}".strip()
    return f"{type(e).__name__}: {e}"


class ListWatch:
    """One resource's list+watch thread, shared by the peer source and the policy source.

    It lists, then watches from the list's resourceVersion; a watch that ends resumes from the last
    version seen (a BOOKMARK only moves that version on); an ERROR event is raised as the ApiException
    it stands for, so 410 Gone relists like a 410 answer does. A relist every `resync` seconds repairs
    whatever a watch missed. Any other failure backs off exponentially (jittered, capped) and keeps the
    version, so the next watch resumes where the failed one was. The owner gets the list's raw items
    (on_list) and each ADDED/MODIFIED/DELETED event (on_event), on this thread, and keeps what it needs.
    """

    def __init__(self, what: str, list_fn: Callable[..., Any], on_list: Callable[[list[dict]], None],
                 on_event: Callable[[str, dict], None], *, stop: threading.Event, resync: float,
                 watch_timeout: float, backoff: tuple[float, float], thread: str,
                 logger: logging.Logger = log) -> None:
        self.what, self.list_fn, self.on_list, self.on_event = what, list_fn, on_list, on_event
        self.stop, self.resync, self.watch_timeout, self.backoff = stop, resync, watch_timeout, backoff
        self.log = logger
        self._resp: Any = None  # the open watch response, so cut() can end it
        self.thread = threading.Thread(target=self._run, name=thread, daemon=True)

    def cut(self) -> None:
        """End an open watch at once (set `stop` first, or the thread simply watches again)."""
        sock = getattr(getattr(self._resp, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        delay = self.backoff[0]
        version: str | None = None
        relist_at = 0.0
        while not self.stop.is_set():
            try:
                if version is None or time.monotonic() >= relist_at:
                    version = self._list()
                    relist_at = time.monotonic() + self.resync
                version = self._watch(version, relist_at)
                delay = self.backoff[0]
            except ApiException as e:
                if e.status == 410:
                    self.log.info("%s watch expired (410 Gone at resourceVersion %s); relisting", self.what, version)
                    version = None
                    continue
                delay = self._pause(e, delay)
            except _api_errors() as e:
                delay = self._pause(e, delay)
            except Exception as e:  # a garbled event must not end the thread: what it feeds would freeze
                self.log.exception("%s list/watch: unexpected error", self.what)
                delay = self._pause(e, delay)

    def _pause(self, e: BaseException, delay: float) -> float:
        if not self.stop.is_set():
            wait = random.uniform(delay / 2, delay)
            self.log.warning("%s list/watch failed (%s); retrying in %.1fs", self.what, _describe(e), wait)
            self.stop.wait(wait)
        return min(delay * 2, self.backoff[1])

    def _list(self) -> str | None:
        doc = json.loads(self.list_fn(_preload_content=False, _request_timeout=REQUEST_TIMEOUT).data)
        self.on_list(list(doc.get("items") or []))
        return (doc.get("metadata") or {}).get("resourceVersion")

    def _watch(self, version: str | None, relist_at: float) -> str | None:
        """Hand over watch events until the server ends the watch; returns the last resourceVersion seen."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import ReadTimeoutError

        timeout = max(1, int(min(self.watch_timeout, relist_at - time.monotonic())))
        self._resp = resp = self.list_fn(
            watch=True, resource_version=version, timeout_seconds=timeout, allow_watch_bookmarks=True,
            _preload_content=False, _request_timeout=(REQUEST_TIMEOUT[0], timeout + 15))
        try:
            for line in resp:
                if self.stop.is_set():
                    break
                if not line.strip():  # a keep-alive (and how a watch starts): not an event
                    continue
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                    self.on_event(event["type"], obj)  # a BOOKMARK: only its resourceVersion matters
        except ReadTimeoutError:
            self.log.debug("%s watch idle past its timeout; reconnecting", self.what)
        finally:
            self._resp = None
            resp.release_conn()
        return version


def spec_pod_cidr(obj: dict) -> str | None:
    """The Node's pod subnets from spec.podCIDRs (dual-stack lists one per family, in the cluster's order)
    or spec.podCIDR, as `pod_cidr` text: IPv4 first, whatever order the Node lists them in."""
    spec = obj.get("spec") or {}
    found: dict[int, Network] = {}
    for raw in [*(spec.get("podCIDRs") or []), spec.get("podCIDR")]:
        with contextlib.suppress(ValueError, TypeError):
            net = ipaddress.ip_network(raw)
            found.setdefault(net.version, net)
    return join_subnets(found.values())


def merge_subnets(first: str | None, then: str | None) -> str | None:
    """Pod subnets per family from `first`, the families it lacks from `then`."""
    found = {n.version: n for n in (*pod_subnets(then), *pod_subnets(first))}
    return join_subnets(found.values())


def internal_ip(obj: dict, family: int = 4) -> str | None:
    """The Node's InternalIP of the underlay family (a dual-stack Node lists one per family)."""
    for addr in (obj.get("status") or {}).get("addresses") or []:
        if addr.get("type") == "InternalIP":
            with contextlib.suppress(ValueError, TypeError):
                return underlay_address(addr.get("address"), family)
    return None


def our_annotations(obj: dict) -> dict[str, str]:
    meta = obj.get("metadata") or {}
    return {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith(PREFIX)}


def read_node(api: Any, name: str) -> dict:
    """One Node as raw JSON (the typed models are not needed, and would validate every field)."""
    try:
        return json.loads(api.read_node(name, _preload_content=False, _request_timeout=REQUEST_TIMEOUT).data)
    except _api_errors() as e:
        if getattr(e, "status", None) == 404:
            raise KubeError(f"node {name} is not registered (is NODE_NAME the Node name?)") from None
        raise KubeError(f"node {name} cannot be read ({_describe(e)})") from None


def patch_annotations(api: Any, name: str, annotations: dict[str, str | None]) -> None:
    """Set (or, for None, delete) exactly these annotations on a Node: a JSON merge patch names only them."""
    try:
        api.patch_node(name, {"metadata": {"annotations": annotations}}, _content_type=MERGE_PATCH,
                       _request_timeout=REQUEST_TIMEOUT, _preload_content=False)
    except _api_errors() as e:
        raise KubeError(f"node {name}: patching annotations failed ({_describe(e)}; "
                        "the ClusterRole must allow patch on nodes)") from None


def remove_annotations(cfg: Config) -> list[str]:
    """Delete every sknf.io/ annotation from this node's Node (uninstall); returns the keys removed."""
    api = connect(cfg)
    keys = sorted(our_annotations(read_node(api, cfg.node_name)))
    if keys:
        patch_annotations(api, cfg.node_name, dict.fromkeys(keys))
    return keys


def _mac(value: str) -> str:
    if not _MAC.match(value):
        raise ValueError(f"{value!r} is not a MAC address")
    return value


def _mtu(value: str) -> int:
    if not value.isdigit() or not 576 <= int(value) <= 9000:
        raise ValueError(f"{value!r} is not an MTU")
    return int(value)


_CHECKS = {  # sknf.io/underlay-ip is checked against the parser's family (underlay_address)
    POD_CIDR: lambda v: join_subnets(networks(v, POD_CIDR)),
    VTEP_MAC: _mac,
    MTU: _mtu,
}


@dataclass
class _Parser:
    """Turns Node objects into peers; remembers which bad annotations it already complained about."""

    family: int = 4  # the underlay's: an underlay-ip of the other family is not valid here
    warned: set[tuple[str, str, str]] = field(default_factory=set)

    def valid(self, name: str, annotations: dict[str, str], key: str) -> Any:
        raw = annotations.get(key)
        if raw is None:
            return None
        try:
            value = raw.strip().lower()
            return underlay_address(value, self.family) if key == UNDERLAY_IP else _CHECKS[key](value)
        except ValueError as e:
            if (name, key, raw) not in self.warned:
                self.warned.add((name, key, raw))
                log.warning("node %s: ignoring annotation %s=%r (not valid: %s)", name, key, raw, e)
            return None

    def node(self, obj: dict) -> Node | None:
        """The peer, or None when it has no usable underlay address yet."""
        name = (obj.get("metadata") or {}).get("name") or ""
        ours = our_annotations(obj)
        ip = self.valid(name, ours, UNDERLAY_IP) or internal_ip(obj, self.family)
        if not name or ip is None:
            return None
        cidr = merge_subnets(spec_pod_cidr(obj), self.valid(name, ours, POD_CIDR))  # a family the spec lacks: carved
        return Node(name=name, underlay_ip=ip, pod_cidr=cidr, vtep_mac=self.valid(name, ours, VTEP_MAC),
                    mtu=self.valid(name, ours, MTU))


def list_peers(cfg: Config) -> list[Node]:
    """The peers as one Node list shows them, without a watch (for `sknf doctor` while the agent is down)."""
    api = connect(cfg)
    try:
        doc = json.loads(api.list_node(_preload_content=False, _request_timeout=REQUEST_TIMEOUT).data)
    except _api_errors() as e:
        raise KubeError(f"nodes cannot be listed ({_describe(e)})") from None
    parser = _Parser(cfg.underlay_family)
    return [n for obj in doc.get("items") or [] if (n := parser.node(obj)) is not None]


class KubePeerSource:
    """PeerSource over the Node API; constructing it starts the list+watch thread, close() stops it."""

    def __init__(self, cfg: Config, *, resync: float = 300.0, watch_timeout: float = 240.0,
                 backoff: tuple[float, float] = (0.5, 30.0), poll: float = 2.0,
                 sync_wait: float = 10.0) -> None:
        self.cfg = cfg
        self.name = cfg.node_name
        self.backoff = backoff
        self.poll = poll
        self.sync_wait = sync_wait
        self.api = connect(cfg)
        self._parser = _Parser(cfg.underlay_family)
        self._lock = threading.Lock()
        self._peers: dict[str, Node] = {}
        self._own: dict | None = None  # this node's sknf.io/ annotations and spec pod subnet, once seen
        self._unaddressed: set[str] = set()  # Nodes without a usable address: not peers (`sknf doctor` says so)
        self._version = 0  # bumped whenever the peer set changes
        self._returned = 0  # the version nodes() last returned
        self._on_change: Callable[[], None] = lambda: None  # watch(): the agent's wake-up
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._nodes_lw = ListWatch("node", self.api.list_node, self._take_list, self._apply, stop=self._stop,
                                   resync=resync, watch_timeout=watch_timeout, backoff=backoff,
                                   thread="sknf-kube-watch")
        self._nodes_lw.thread.start()

    # -- PeerSource ------------------------------------------------------------------------------
    def nodes(self) -> list[Node]:
        if not self._synced.wait(self.sync_wait):
            raise KubeError(f"no Node list from the API server in {self.sync_wait:.0f}s (errors are logged)")
        with self._lock:
            self._returned = self._version
            return sorted(self._peers.values(), key=lambda n: n.name)

    def changed(self) -> bool:
        with self._lock:
            return self._version != self._returned

    def watch(self, wakeup: Wakeup) -> None:
        self._on_change = wakeup.poke

    def unaddressed(self) -> list[str]:
        """Nodes left out of the peers because they have neither an InternalIP nor a valid sknf.io/underlay-ip."""
        with self._lock:
            return sorted(self._unaddressed)

    def publish_self(self, node: Node) -> None:
        """Set this node's sknf.io/ annotations, patching only those keys and only when they differ."""
        if node.name != self.name:
            raise ValueError(f"publish_self: {node.name!r} is not this node ({self.name!r})")
        with self._lock:
            own = self._own
        if own is None:
            own = self._own_facts(read_node(self.api, self.name))
        carved = node.pod_cidr if node.pod_cidr != own["spec_cidr"] else None
        want = {UNDERLAY_IP: node.underlay_ip, VTEP_MAC: node.vtep_mac, POD_CIDR: carved,
                MTU: str(node.mtu) if node.mtu else None}
        diff = {k: v for k, v in want.items() if own["annotations"].get(k) != v}
        if not diff:
            return
        patch_annotations(self.api, self.name, diff)
        with self._lock:
            if self._own is not None:
                merged = {**self._own["annotations"], **diff}
                self._own["annotations"] = {k: v for k, v in merged.items() if v is not None}
        log.info("node %s: published %s", self.name, ", ".join(f"{k}={v}" for k, v in diff.items()))

    # -- this node ---------------------------------------------------------------------------------
    def own_pod_cidr(self, timeout: float | None = 60.0) -> str | None:
        """This Node's spec.podCIDR, waiting (and saying so) until it is set; None after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay, next_log = self.backoff[0], 0.0
        while True:
            wait = self.poll
            try:
                obj = read_node(self.api, self.name)
                cidr = spec_pod_cidr(obj)
            except KubeError as e:
                why, wait, delay = str(e), delay, min(delay * 2, self.backoff[1])
            else:
                if cidr is not None:
                    self._check_inside_cluster(cidr)
                    listed = (obj.get("spec") or {}).get("podCIDRs") or []
                    if len(listed) > 1 and ":" in str(listed[0]):
                        log.info("node %s: spec.podCIDRs %s lists IPv6 first (the cluster's primary family); "
                                 "sknf serves each family's subnet alike: %s", self.name, ",".join(map(str, listed)),
                                 cidr)
                    return cidr
                why = (f"node {self.name} has no spec.podCIDR yet: the controller manager assigns one when "
                       "the cluster has a pod network CIDR (kubeadm init --pod-network-cidr)")
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                log.warning("%s; gave up waiting after %.0fs", why, timeout)
                return None
            if now >= next_log:
                log.warning("%s; waiting", why)
                next_log = now + WAIT_LOG_EVERY
            if self._stop.wait(wait if deadline is None else min(wait, deadline - now)):
                return None

    def _check_inside_cluster(self, cidr: str) -> None:
        for net in pod_subnets(cidr):
            cluster = self.cfg.cidr(net.version)
            if cluster is not None and not net.subnet_of(cluster):
                raise KubeError(f"node {self.name}: spec.podCIDR {net} is outside cluster_cidr "
                                f"{cluster}: set CLUSTER_CIDR in the DaemonSet to the cluster's "
                                "pod network CIDR")

    @staticmethod
    def _own_facts(obj: dict) -> dict:
        return {"annotations": our_annotations(obj), "spec_cidr": spec_pod_cidr(obj)}

    # -- list + watch --------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the watch thread (cuts an open watch at once)."""
        self._stop.set()
        self._nodes_lw.cut()
        self._nodes_lw.thread.join(timeout=10)

    def __enter__(self) -> KubePeerSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_list(self, items: list[dict]) -> None:
        peers: dict[str, Node] = {}
        unaddressed = set()
        own = None
        for obj in items:
            if (node := self._parser.node(obj)) is not None:
                peers[node.name] = node
            elif name := (obj.get("metadata") or {}).get("name"):
                unaddressed.add(name)
            if (obj.get("metadata") or {}).get("name") == self.name:
                own = self._own_facts(obj)
        with self._lock:
            if peers != self._peers or not self._synced.is_set():
                self._version += 1
            self._peers = peers
            self._unaddressed = unaddressed
            self._own = own
        self._synced.set()
        log.debug("listed %d nodes", len(peers))

    def _apply(self, kind: str, obj: dict) -> None:
        name = (obj.get("metadata") or {}).get("name")
        if not name:
            return
        node = self._parser.node(obj) if kind != "DELETED" else None
        with self._lock:
            if kind == "DELETED" or node is not None:
                self._unaddressed.discard(name)
            else:
                self._unaddressed.add(name)
            if name == self.name:
                self._own = None if kind == "DELETED" else self._own_facts(obj)
            if self._peers.get(name) != node:
                if node is None:
                    del self._peers[name]
                else:
                    self._peers[name] = node
                self._version += 1
                self._on_change()
