"""NetworkPolicy compiler: networking.k8s.io/v1 objects in, per-local-endpoint allow lists out.

Why it works this way:
- Enforcement (sknf.policy.nft) needs, for each local pod and direction, only "which peer addresses
  on which ports": so the whole API (selectors, namespaces, ipBlock, named ports, endPort, policy
  types and their defaults) is resolved here, once per change, into address intervals and port ranges,
  and the kernel never sees a label. A pure function of its inputs: the unit case table runs it
  without a kernel, and `allows` evaluates its output the way the rules do.
- Named ports resolve on the pod that owns them: an ingress rule's on the selected (local) pod, an
  egress rule's on each destination pod, so one egress rule can become one allow per port number.
- Nothing fails open. A Pod or Namespace that cannot be read is skipped (logged by name); a policy that
  cannot be compiled still selects its pods, in its directions, with no allow from it (default deny):
  with a podSelector that cannot be read either, it selects every pod of its namespace. Problems are
  returned, not logged, so the caller can say each one once.
- Both families: a pod is every address it has (status.podIPs; a local pod's lease, ip and ip6), and an
  allow keeps IPv4 and IPv6 intervals apart, so an IPv4 peer never admits IPv6 and the reverse. A local
  pod's IPv6 address gets the same rules as its IPv4 one (fail closed over both).
- Traffic from the pod's own node is not a peer here: the node's own packets never cross the hooks
  the rules sit on (see docs/network-policy.md).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

PROTOCOLS = ("TCP", "UDP", "SCTP")
DIRECTIONS = ("ingress", "egress")
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every Namespace by the API server (1.21+)


class PolicyError(ValueError):
    """An object cannot be compiled; the message says which field and why."""


@dataclass(frozen=True)
class PortRange:
    protocol: str  # TCP, UDP or SCTP
    first: int
    last: int


Intervals = tuple[tuple[int, int], ...]  # sorted, merged address intervals of one family


@dataclass(frozen=True)
class Allow:
    """Peers (IPv4 intervals, IPv6 intervals in peers6; peers None: any address of either family) on ports
    (None: any protocol and port)."""

    peers: Intervals | None
    ports: tuple[PortRange, ...] | None
    peers6: Intervals = ()


@dataclass(frozen=True)
class Rules:
    """One direction of one selected endpoint: the union of its policies' allows (empty: deny all)."""

    allows: tuple[Allow, ...]
    policies: tuple[str, ...]  # namespace/name of every policy selecting it in this direction


@dataclass(frozen=True)
class LocalEndpoint:
    """A pod attachment on this node (from its lease): the address the rules are keyed by."""

    ip: str
    namespace: str
    pod: str
    ip6: str = ""  # dual-stack: its IPv6 address, held to the same rules (the leases' ip6)


@dataclass
class Compiled:
    ingress: dict[str, Rules] = field(default_factory=dict)  # local endpoint address -> rules
    egress: dict[str, Rules] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # each names its object

    def selected(self) -> set[str]:
        """Local addresses some policy selects, in either direction."""
        return set(self.ingress) | set(self.egress)

    def policies_of(self, ip: str) -> dict[str, list[str]]:
        return {d: list(getattr(self, d)[ip].policies) for d in DIRECTIONS if ip in getattr(self, d)}


@dataclass(frozen=True)
class _Pod:
    namespace: str
    name: str
    labels: Mapping[str, str]
    ips: tuple[str, ...]
    ports: Mapping[tuple[str, str], int]  # (name, protocol) -> container port


# -- reading objects ----------------------------------------------------------------------------------

def _name(obj: Any) -> str:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise PolicyError("metadata.name is missing")
    return meta["name"]


def _labels(raw: Any, where: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise PolicyError(f"{where}: must map strings to strings")
    return dict(raw)


def _address(raw: Any) -> str | None:
    try:
        return str(ipaddress.ip_address(raw))
    except (ValueError, TypeError):
        return None


def _pod(obj: dict) -> _Pod | None:
    """A Pod as a peer; None for those that are no peer (hostNetwork, finished)."""
    name = _name(obj)
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    namespace = meta.get("namespace") or "default"
    labels = _labels(meta.get("labels"), "metadata.labels")
    if spec.get("hostNetwork") or status.get("phase") in ("Succeeded", "Failed"):
        return None
    raw_ips = [p.get("ip") for p in status.get("podIPs") or [] if isinstance(p, dict)] + [status.get("podIP")]
    ips = tuple(dict.fromkeys(ip for ip in map(_address, raw_ips) if ip))  # both families (status.podIPs)
    ports: dict[tuple[str, str], int] = {}
    for container in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        for port in (container or {}).get("ports") or []:
            if isinstance(port, dict) and isinstance(port.get("name"), str) \
                    and isinstance(port.get("containerPort"), int):
                ports.setdefault((port["name"], str(port.get("protocol") or "TCP")), port["containerPort"])
    return _Pod(namespace, name, labels, ips, ports)


# -- selectors ------------------------------------------------------------------------------------------

def _selector(raw: Any, where: str) -> Any:
    """A label selector as a predicate over labels; PolicyError when it cannot be read."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: not a label selector")
    unknown = set(raw) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise PolicyError(f"{where}: unknown field {sorted(unknown)[0]}")
    want = _labels(raw.get("matchLabels"), f"{where}.matchLabels")
    exprs = []
    for i, e in enumerate(raw.get("matchExpressions") or []):
        at = f"{where}.matchExpressions[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("key"), str):
            raise PolicyError(f"{at}: needs a key")
        op, values = e.get("operator"), e.get("values") or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise PolicyError(f"{at}: values must be a list of strings")
        if op in ("In", "NotIn") and not values:
            raise PolicyError(f"{at}: {op} needs values")
        if op in ("Exists", "DoesNotExist") and values:
            raise PolicyError(f"{at}: {op} takes no values")
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise PolicyError(f"{at}: unknown operator {op!r}")
        exprs.append((e["key"], op, frozenset(values)))

    def matches(labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in want.items()):
            return False
        for key, op, values in exprs:
            has = key in labels
            value = labels.get(key)
            if (op == "In" and value not in values) or (op == "NotIn" and has and value in values) \
                    or (op == "Exists" and not has) or (op == "DoesNotExist" and has):
                return False
        return True

    return matches


# -- address sets --------------------------------------------------------------------------------------

def _merge(intervals: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _net(raw: Any, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(str(raw), strict=False)
    except ValueError:
        raise PolicyError(f"{where}: {raw!r} is not a CIDR") from None


def _ip_block(raw: Any, where: str) -> tuple[int, Intervals]:
    """(IP version, cidr minus every except as intervals)."""
    if not isinstance(raw, dict) or "cidr" not in raw:
        raise PolicyError(f"{where}: needs a cidr")
    cidr = _net(raw["cidr"], f"{where}.cidr")
    excepts = [_net(e, f"{where}.except[{i}]") for i, e in enumerate(raw.get("except") or [])]
    for e in excepts:
        if e.version != cidr.version or not e.subnet_of(cidr):  # type: ignore[arg-type]
            raise PolicyError(f"{where}.except: {e} is not inside {cidr}")
    kept = [(int(cidr.network_address), int(cidr.broadcast_address))]
    for e in _merge((int(x.network_address), int(x.broadcast_address)) for x in excepts):
        kept = [piece for lo, hi in kept for piece in ((lo, min(hi, e[0] - 1)), (max(lo, e[1] + 1), hi))
                if piece[0] <= piece[1]]
    return cidr.version, _merge(kept)


Addresses = tuple[Intervals, Intervals]  # (IPv4, IPv6)


def _addresses(ips: Iterable[str], blocks: Mapping[int, Iterable[tuple[int, int]]] | None = None) -> Addresses:
    """Pod addresses (each parsed once) and ipBlock intervals, per family."""
    found: dict[int, list[tuple[int, int]]] = {v: list((blocks or {}).get(v, ())) for v in (4, 6)}
    for a in map(ipaddress.ip_address, ips):
        found[a.version].append((int(a), int(a)))
    return _merge(found[4]), _merge(found[6])


def _allow(addresses: Addresses | None, ports: tuple[PortRange, ...] | None) -> Allow:
    return Allow(None, ports) if addresses is None else Allow(addresses[0], ports, addresses[1])


# -- ports ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Port:
    protocol: str
    number: int | None  # None: every port of the protocol (or `name` is set)
    end: int | None = None
    name: str | None = None


def _ports(raw: Any, where: str) -> list[_Port] | None:
    """A rule's ports; None when it has none (every port)."""
    if not raw:
        return None
    if not isinstance(raw, list):
        raise PolicyError(f"{where}: must be a list")
    out = []
    for i, p in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(p, dict):
            raise PolicyError(f"{at}: not a port")
        proto = p.get("protocol") or "TCP"
        if proto not in PROTOCOLS:
            raise PolicyError(f"{at}.protocol: {proto!r} is not one of {', '.join(PROTOCOLS)}")
        port, end = p.get("port"), p.get("endPort")
        if isinstance(port, str) and not port.isdigit():
            if end is not None:
                raise PolicyError(f"{at}.endPort: needs a numeric port")
            out.append(_Port(proto, None, name=port))
            continue
        if port is None:
            if end is not None:
                raise PolicyError(f"{at}.endPort: needs a port")
            out.append(_Port(proto, None))
            continue
        if isinstance(port, bool) or not 1 <= int(port) <= 65535:
            raise PolicyError(f"{at}.port: {port!r} is not a port number")
        if end is not None and (isinstance(end, bool) or not isinstance(end, int) or not int(port) <= end <= 65535):
            raise PolicyError(f"{at}.endPort: {end!r} must be a port number >= port")
        out.append(_Port(proto, int(port), end))
    return out


def _numeric(ports: list[_Port]) -> tuple[PortRange, ...]:
    """The numeric ports of a rule as ranges; a port-less entry is every port of its protocol."""
    ranges = {PortRange(p.protocol, 0, 65535) if p.number is None else
              PortRange(p.protocol, p.number, p.end or p.number) for p in ports if p.name is None}
    return tuple(sorted(ranges, key=lambda r: (r.protocol, r.first, r.last)))


# -- the compiler ----------------------------------------------------------------------------------------

class _World:
    """Pods and namespaces, indexed once per compile."""

    def __init__(self, pods: Iterable[dict], namespaces: Iterable[dict], local: Iterable[LocalEndpoint],
                 problems: list[str]) -> None:
        self.ns_labels: dict[str, dict[str, str]] = {}
        for obj in namespaces:
            try:
                name = _name(obj)
                self.ns_labels[name] = {**_labels(obj["metadata"].get("labels"), "metadata.labels"),
                                        NAMESPACE_NAME_LABEL: name}
            except PolicyError as e:
                problems.append(f"Namespace {_describe(obj)}: {e}; skipped")
        self.pods: dict[tuple[str, str], _Pod] = {}
        for obj in pods:
            try:
                pod = _pod(obj)
            except PolicyError as e:
                problems.append(f"Pod {_describe(obj)}: {e}; skipped")
                continue
            if pod is not None:
                self.pods[(pod.namespace, pod.name)] = pod
        # Local attachments: their lease is the truth for their address; labels come from the Pod.
        self.local: dict[str, _Pod] = {}
        self.endpoints = list(local)
        for ep in self.endpoints:
            known = self.pods.get((ep.namespace, ep.pod))
            pod = _Pod(ep.namespace, ep.pod, known.labels if known else {}, (ep.ip,), known.ports if known else {})
            self.local[ep.ip] = pod
            self.pods[(ep.namespace, ep.pod)] = _Pod(pod.namespace, pod.name, pod.labels,
                                                     tuple(dict.fromkeys((*(known.ips if known else ()), ep.ip,
                                                                         *filter(None, [ep.ip6])))),
                                                     pod.ports)

    def namespace_labels(self, name: str) -> dict[str, str]:
        return self.ns_labels.get(name, {NAMESPACE_NAME_LABEL: name})

    def namespaces(self) -> set[str]:
        return set(self.ns_labels) | {p.namespace for p in self.pods.values()}


def _describe(obj: Any) -> str:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    name = meta.get("name") or "(no name)"
    return f"{meta['namespace']}/{name}" if meta.get("namespace") else str(name)


def _peer_pods(world: _World, namespace: str, peers: Any,
               where: str) -> tuple[list[_Pod], dict[int, list[tuple[int, int]]]] | None:
    """(pods, {IP version: ipBlock intervals}) a rule's from/to names; None: every address (no peers listed)."""
    if not peers:
        return None
    if not isinstance(peers, list):
        raise PolicyError(f"{where}: must be a list")
    pods: dict[tuple[str, str], _Pod] = {}
    blocks: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    for i, peer in enumerate(peers):
        at = f"{where}[{i}]"
        if not isinstance(peer, dict) or not peer.keys() & {"podSelector", "namespaceSelector", "ipBlock"}:
            raise PolicyError(f"{at}: needs podSelector, namespaceSelector or ipBlock")
        if "ipBlock" in peer:
            if peer.keys() & {"podSelector", "namespaceSelector"}:
                raise PolicyError(f"{at}: ipBlock cannot be combined with a selector")
            version, intervals = _ip_block(peer["ipBlock"], f"{at}.ipBlock")
            blocks[version] += intervals
            continue
        pod_sel = _selector(peer.get("podSelector"), f"{at}.podSelector")
        if "namespaceSelector" in peer:
            ns_sel = _selector(peer["namespaceSelector"], f"{at}.namespaceSelector")
            spaces = {ns for ns in world.namespaces() if ns_sel(world.namespace_labels(ns))}
        else:
            spaces = {namespace}
        pods.update(((p.namespace, p.name), p) for p in world.pods.values()
                    if p.namespace in spaces and pod_sel(p.labels))
    return list(pods.values()), blocks


def _allows(world: _World, direction: str, namespace: str, rule: Any, where: str,
            local: list[_Pod]) -> dict[str, list[Allow]]:
    """{local address: allows} of one ingress/egress rule for the pods the policy selects."""
    if not isinstance(rule, dict):
        raise PolicyError(f"{where}: not a rule")
    peers = _peer_pods(world, namespace, rule.get("from" if direction == "ingress" else "to"),
                       f"{where}.{'from' if direction == 'ingress' else 'to'}")
    ports = _ports(rule.get("ports"), f"{where}.ports")
    numeric = _numeric(ports) if ports is not None else None
    named = [p for p in ports or [] if p.name is not None]
    if peers is None:
        addresses: Addresses | None = None
        peer_pods = list(world.pods.values())
    else:
        peer_pods, blocks = peers
        addresses = _addresses((ip for p in peer_pods for ip in p.ips), blocks)
    some = addresses is None or any(addresses)
    common = []
    if (ports is None or numeric) and some:
        common.append(_allow(addresses, numeric if ports is not None else None))
    if direction == "egress":  # each destination pod's own port of that name
        for p in named:
            by_number: dict[int, list[str]] = {}
            for peer in peer_pods:
                if (number := peer.ports.get((p.name, p.protocol))) is not None:
                    by_number.setdefault(number, []).extend(peer.ips)
            common += [_allow(_addresses(ips), (PortRange(p.protocol, n, n),))
                       for n, ips in sorted(by_number.items()) if ips]
        return {pod.ips[0]: list(common) for pod in local}
    out: dict[str, list[Allow]] = {}
    for pod in local:  # ingress: the selected pod's own port of that name
        out[pod.ips[0]] = common + [_allow(addresses, (PortRange(p.protocol, n, n),)) for p in named
                                    if (n := pod.ports.get((p.name, p.protocol))) is not None and some]
    return out


def _types(spec: dict, where: str) -> tuple[str, ...]:
    raw = spec.get("policyTypes")
    if not raw:
        return ("ingress", "egress") if spec.get("egress") else ("ingress",)
    if not isinstance(raw, list) or any(t not in ("Ingress", "Egress") for t in raw):
        raise PolicyError(f"{where}.policyTypes: {raw!r} must list Ingress and/or Egress")
    return tuple(d for d in DIRECTIONS if d.capitalize() in raw)


def _policy(world: _World, obj: dict, compiled: Compiled) -> None:
    name = _name(obj)
    namespace = obj["metadata"].get("namespace") or "default"
    label = f"{namespace}/{name}"
    spec = obj.get("spec")
    in_ns = [p for p in world.local.values() if p.namespace == namespace]
    try:
        if not isinstance(spec, dict):
            raise PolicyError("spec is missing")
        selector = _selector(spec.get("podSelector"), "spec.podSelector")
    except PolicyError as e:
        compiled.problems.append(f"NetworkPolicy {label}: {e}; denying every pod of {namespace} both ways")
        _select(compiled, DIRECTIONS, {p.ips[0]: [] for p in in_ns}, label)
        return
    selected = [p for p in in_ns if selector(p.labels)]
    try:
        types = _types(spec, "spec")
    except PolicyError as e:
        compiled.problems.append(f"NetworkPolicy {label}: {e}; denying its pods both ways")
        _select(compiled, DIRECTIONS, {p.ips[0]: [] for p in selected}, label)
        return
    for direction in types:
        rules = spec.get(direction) or []
        per_pod: dict[str, list[Allow]] = {p.ips[0]: [] for p in selected}
        try:
            if not isinstance(rules, list):
                raise PolicyError(f"spec.{direction}: must be a list")
            for i, rule in enumerate(rules):
                at = f"spec.{direction}[{i}]"
                for ip, found in _allows(world, direction, namespace, rule, at, selected).items():
                    per_pod[ip] += found
        except (PolicyError, ValueError, TypeError) as e:
            compiled.problems.append(f"NetworkPolicy {label}: {e}; denying its pods' {direction}")
            per_pod = {p.ips[0]: [] for p in selected}
        _select(compiled, (direction,), per_pod, label)


def _select(compiled: Compiled, directions: Iterable[str], per_pod: dict[str, list[Allow]], label: str) -> None:
    for direction in directions:
        table = getattr(compiled, direction)
        for ip, allows in per_pod.items():
            have = table.get(ip, Rules((), ()))
            merged = tuple(dict.fromkeys((*have.allows, *allows)))
            table[ip] = Rules(merged, tuple(sorted({*have.policies, label})))


def compile_policies(policies: Iterable[dict], pods: Iterable[dict], namespaces: Iterable[dict],
                     local: Iterable[LocalEndpoint]) -> Compiled:
    """The rules of every local endpoint some policy selects; endpoints no policy selects are absent
    (everything allowed), as are directions no policy of theirs covers."""
    compiled = Compiled()
    world = _World(pods, namespaces, local, compiled.problems)
    for obj in policies:
        try:
            _policy(world, obj, compiled)
        except PolicyError as e:  # no name: nothing can tell which pods it meant
            compiled.problems.append(f"NetworkPolicy {_describe(obj)}: {e}; skipped")
    for direction in DIRECTIONS:
        table = getattr(compiled, direction)
        for ip, rules in table.items():
            table[ip] = Rules(_simplify(rules.allows), rules.policies)
        for ep in world.endpoints:  # a selected pod's IPv6 address: the same direction, the same rules
            if ep.ip6 and ep.ip in table:
                table[ep.ip6] = table[ep.ip]
    return compiled


def _simplify(allows: tuple[Allow, ...]) -> tuple[Allow, ...]:
    """An allow-everything makes the rest redundant; otherwise keep them in order."""
    if Allow(None, None) in allows:
        return (Allow(None, None),)
    return allows


# -- evaluation: what the rules do, as the case table checks it -----------------------------------------

def allows(rules: Rules | None, peer: str, protocol: str, port: int) -> bool:
    """Would this direction's rules let a new flow with this peer address, protocol and port through?"""
    if rules is None:
        return True
    address = ipaddress.ip_address(peer)
    addr = int(address)
    for a in rules.allows:
        if a.peers is not None and not any(lo <= addr <= hi for lo, hi in (a.peers if address.version == 4
                                                                            else a.peers6)):
            continue
        if a.ports is None or any(r.protocol == protocol and r.first <= port <= r.last for r in a.ports):
            return True
    return False


def flow_allowed(compiled: Compiled, src: str, dst: str, protocol: str, port: int) -> bool:
    """A new flow src -> dst:port: the source's egress (if local) and the destination's ingress (if local)."""
    return allows(compiled.egress.get(src), dst, protocol, port) and \
        allows(compiled.ingress.get(dst), src, protocol, port)

