"""NetworkPolicy enforcement in nftables: `table inet sknf-policy`, the same on both datapaths.

Why it works this way:
- The hooks are the inet forward and input hooks, not the bridge family: with bridge-nf-call-iptables=1
  (which Service NAT needs; bridge-nf-call-ip6tables=1 in dual-stack) every bridged pod frame also
  crosses them, after conntrack and after kube-proxy's DNAT, so one set of rules sees pod -> pod on a
  node, pod <-> vxsknf across nodes and pod -> ClusterIP (already translated to the backend's address)
  alike. The input hook sees what local pods send to this node itself (egress). What the node itself
  sends to its pods (kubelet probes, from brsknf's gateway address) goes out through the output hook,
  which has no rule: it is always allowed, as Kubernetes expects.
- Rules are keyed by endpoint address in verdict maps (`ingress`, `egress`: local pod IPv4 address ->
  jump to its chain; `ingress6`, `egress6`: its IPv6 address -> the same chain), so the base chains are
  fixed and a pod joins or leaves with one element per address. A chain is named after a digest of its
  rules: pods with the same rules share one, and a change adds only chains that did not exist. Every
  change is one transaction: new chains, the maps' new elements, the old chains' removal, together.
- Established and related flows are accepted first: replies of an allowed flow, and ICMP errors about
  it. A policy change therefore applies to new flows; conntrack keeps established ones going. So are
  frames marked MARK_POLICY: the BPF datapath decided their flow itself (bpf/lib/policy.h) and sends
  one of its frames here only when it must (an ICMP error about it, the fast path held off), frames of a
  flow conntrack never saw begin. Only the programs set the bit (and clear it where a frame enters).
- A per-endpoint chain returns when some allow matches (the forward chain then checks the other end's
  ingress), else counts the frame against the local endpoint's address in a dynamic set with counters
  (`dropped`, `dropped6`; reason `policy` in the stats) and drops it, the drop a rule of its own as in
  sknf.guard.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
from typing import Any

from sknf.guard import GuardError, _nft
from sknf.policy import Compiled, Rules

log = logging.getLogger(__name__)

FAMILY = "inet"
TABLE = "sknf-policy"
PRIORITY = 0  # filter; a drop here is final whatever other tables (iptables' FORWARD ACCEPT) decide
COUNTED_MAX = 65535
CHAIN_PREFIX = "ep_"
BODY_VERSION = 2  # bump when chain_rules renders the same allows differently: chains get new names
L4 = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
MARK_POLICY = 0x00400000  # SKNF_MARK_POLICY (bpf/lib/common.h): a flow the BPF programs allowed, netfilter never saw
FAMILIES = (("", "ipv4_addr"), ("6", "ipv6_addr"))  # (suffix of the maps' and counters' names, key type)


def _t() -> dict:
    return {"family": FAMILY, "table": TABLE}


def _match(left: Any, right: Any, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _ip(field: str, proto: str = "ip") -> dict:
    return {"payload": {"protocol": proto, "field": field}}


def map_name(direction: str, address: str) -> str:
    """The verdict map an endpoint address is keyed in: `ingress`/`egress` (IPv4), `ingress6`/`egress6`."""
    return direction + "6" if ":" in address else direction


def _addr(n: int, version: int) -> str:
    return str(ipaddress.IPv4Address(n) if version == 4 else ipaddress.IPv6Address(n))


def _interval(lo: int, hi: int, version: int) -> Any:
    return _addr(lo, version) if lo == hi else {"range": [_addr(lo, version), _addr(hi, version)]}


def _port(lo: int, hi: int) -> Any:
    return lo if lo == hi else {"range": [lo, hi]}


def _base() -> list[tuple[str, list[dict]]]:
    """(chain, expressions) of the fixed rules: each family's address looked up in its own maps."""
    established = _match({"ct": {"key": "state"}}, ["established", "related"], "in")
    allowed = _match({"&": [{"meta": {"key": "mark"}}, MARK_POLICY]}, MARK_POLICY)
    vmap = lambda proto, field, name: {"vmap": {"key": _ip(field, proto), "data": f"@{name}"}}  # noqa: E731
    return [("forward", [established, {"accept": None}]),
            ("forward", [allowed, {"accept": None}]),
            ("forward", [vmap("ip", "saddr", "egress")]),
            ("forward", [vmap("ip6", "saddr", "egress6")]),
            ("forward", [vmap("ip", "daddr", "ingress")]),
            ("forward", [vmap("ip6", "daddr", "ingress6")]),
            ("input", [established, {"accept": None}]),
            ("input", [allowed, {"accept": None}]),
            ("input", [vmap("ip", "saddr", "egress")]),
            ("input", [vmap("ip6", "saddr", "egress6")])]


def _base_comments() -> list[str]:
    digest = hashlib.sha256(json.dumps([PRIORITY, COUNTED_MAX, _base()], sort_keys=True).encode()).hexdigest()[:12]
    return [f"sknf {digest} {i}" for i in range(len(_base()))]


def _definition() -> list[dict]:
    t = _t()
    cmds: list[dict] = [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        *({"add": {"map": {**t, "name": d + suffix, "type": kind, "map": "verdict"}}}
          for suffix, kind in FAMILIES for d in ("ingress", "egress")),
        *({"add": {"set": {**t, "name": "dropped" + suffix, "type": kind, "size": COUNTED_MAX,
                           "stmt": [{"counter": None}]}}} for suffix, kind in FAMILIES),
        *({"add": {"chain": {**t, "name": hook, "type": "filter", "hook": hook, "prio": PRIORITY,
                             "policy": "accept"}}} for hook in ("forward", "input")),
        {"add": {"chain": {**t, "name": _base_marker()}}},
    ]
    cmds += [{"add": {"rule": {**t, "chain": chain, "comment": comment, "expr": expr}}}
             for comment, (chain, expr) in zip(_base_comments(), _base(), strict=True)]
    return cmds


def chain_rules(direction: str, rules: Rules) -> list[list[dict]]:
    """One endpoint direction's chain: a rule per allow (and protocol), returning; then count and drop."""
    peer = _ip("saddr" if direction == "ingress" else "daddr")
    local = _ip("daddr" if direction == "ingress" else "saddr")
    local6 = _ip("daddr" if direction == "ingress" else "saddr", "ip6")
    peer6 = _ip("saddr" if direction == "ingress" else "daddr", "ip6")
    out = []
    for allow in rules.allows:  # each family's peers a rule of their own (IPv4 first, as before dual-stack)
        whos = [[]] if allow.peers is None else \
            [[_match(field, {"set": [_interval(lo, hi, version) for lo, hi in peers]})]
             for field, peers, version in ((peer, allow.peers, 4), (peer6, allow.peers6, 6)) if peers]
        for who in whos:
            if allow.ports is None:
                out.append([*who, {"return": None}])
                continue
            for proto in sorted({r.protocol for r in allow.ports}):
                ports = [_port(r.first, r.last) for r in allow.ports if r.protocol == proto]
                full = ports == [{"range": [0, 65535]}]
                dport = {"payload": {"protocol": "th", "field": "dport"}}
                out.append([*who, _match({"meta": {"key": "l4proto"}}, L4[proto]),
                            *([] if full else [_match(dport, {"set": ports})]), {"return": None}])
    out.append([_match({"meta": {"key": "nfproto"}}, "ipv4"),
                {"set": {"op": "update", "elem": local, "set": "@dropped"}}])
    out.append([_match({"meta": {"key": "nfproto"}}, "ipv6"),
                {"set": {"op": "update", "elem": local6, "set": "@dropped6"}}])
    out.append([{"drop": None}])
    return out


def _chain_name(direction: str, rules: Rules) -> str:
    """Named after what it enforces (the allows' repr is stable: frozen dataclasses of ints and strings)."""
    digest = hashlib.sha256(repr((BODY_VERSION, direction, rules.allows)).encode()).hexdigest()[:16]
    return CHAIN_PREFIX + digest


def desired(compiled: Compiled) -> tuple[dict[str, tuple[str, Rules]], dict[str, dict[str, str]]]:
    """({chain: (direction, rules)}, {map: {endpoint address: chain}}); bodies are built only for chains
    that must be added (chain_rules). A pod's IPv4 and IPv6 addresses share its chain."""
    chains: dict[str, tuple[str, Rules]] = {}
    maps: dict[str, dict[str, str]] = {d + suffix: {} for suffix, _ in FAMILIES for d in ("ingress", "egress")}
    for direction in ("ingress", "egress"):
        by_rules: dict[tuple[Any, ...], str] = {}
        for ip, rules in getattr(compiled, direction).items():
            if (name := by_rules.get(rules.allows)) is None:
                name = by_rules[rules.allows] = _chain_name(direction, rules)
                chains[name] = (direction, rules)
            maps[map_name(direction, ip)][ip] = name
    return chains, maps


def _base_marker() -> str:
    """An empty chain whose name carries the digest of the fixed part (sets, base chains, their rules):
    `list chains` shows it, far cheaper than listing the rules of a table holding every endpoint's."""
    return "base_" + _base_comments()[0].split()[1]


def _chains() -> set[str] | None:
    """Names of the table's chains; None when the table does not exist."""
    listed = _nft([{"list": {"chains": {"family": FAMILY}}}], check=False)
    names = {o["chain"]["name"] for o in listed if "chain" in o and o["chain"]["table"] == TABLE}
    return names or None


def _list_set(name: str, kind: str = "set") -> list:
    out = _nft([{"list": {kind: {**_t(), "name": name}}}], check=False)
    for obj in out:
        if kind in obj:
            return obj[kind].get("elem", [])
    return []


def apply(compiled: Compiled) -> bool:
    """Make the table enforce exactly this; one transaction. True if anything changed."""
    chains, maps = desired(compiled)
    listed = _chains()
    if listed is None and not chains:
        return False  # no policy selects anything here, and none ever did: no table, no cost
    base_ok = listed is not None and {"forward", "input", _base_marker()} <= listed
    have_chains = {c for c in listed or () if c.startswith(CHAIN_PREFIX)}
    have_maps = {d: _map_elements(d) for d in maps} if base_ok else {}
    t = _t()
    cmds: list[dict] = []
    if not base_ok:  # missing, changed by hand or by another sknf: rebuilt whole (drop counters restart)
        if listed is not None:
            log.warning("nftables table %s %s differs from sknf's; rebuilding it", FAMILY, TABLE)
        cmds += [{"add": {"table": {"family": FAMILY, "name": TABLE}}},
                 {"delete": {"table": {"family": FAMILY, "name": TABLE}}}, *_definition()]
        have_chains = set()
    elif have_chains == set(chains) and have_maps == maps:
        return False
    for name in sorted(set(chains) - have_chains):
        cmds.append({"add": {"chain": {**t, "name": name}}})
        cmds += [{"add": {"rule": {**t, "chain": name, "expr": expr}}} for expr in chain_rules(*chains[name])]
    for d, elems in maps.items():
        if base_ok:
            cmds.append({"flush": {"map": {**t, "name": d}}})
        if elems:
            cmds.append({"add": {"element": {**t, "name": d, "elem": [[ip, {"jump": {"target": chain}}]
                                                                       for ip, chain in sorted(elems.items())]}}})
    cmds += [{"delete": {"chain": {**t, "name": name}}} for name in sorted(have_chains - set(chains))]
    _nft(cmds)
    return True


def _map_elements(name: str) -> dict[str, str]:
    out = {}
    for e in _list_set(name, "map"):
        if isinstance(e, list) and len(e) == 2:
            verdict = e[1].get("jump", {}) if isinstance(e[1], dict) else {}
            out[str(e[0])] = verdict.get("target", "")
    return out


def forget_drops(live: set[str]) -> None:
    """Counters of addresses that are no endpoint here any more go (a new pod reusing one starts at 0)."""
    for suffix, _ in FAMILIES:
        gone = [v for e in _list_set("dropped" + suffix) if str(v := e["elem"]["val"] if isinstance(e, dict) else e)
                not in live]
        if gone:
            _nft([{"delete": {"element": {**_t(), "name": "dropped" + suffix, "elem": gone}}}], check=False)


def drops() -> dict[str, int]:
    """{local endpoint address (either family): packets dropped by policy}; nothing when there is no table
    (or no nft)."""
    out = {}
    try:
        for suffix, _ in FAMILIES:
            for e in _list_set("dropped" + suffix):
                if isinstance(e, dict) and "elem" in e:
                    out[str(e["elem"]["val"])] = e["elem"].get("counter", {}).get("packets", 0)
    except GuardError:  # no libnftables: no table either
        return {}
    return out


def remove() -> bool:
    """Delete the table (uninstall); True if it existed."""
    try:
        if _chains() is None:
            return False
        _nft([{"delete": {"table": {"family": FAMILY, "name": TABLE}}}])
    except GuardError:
        return False
    return True
