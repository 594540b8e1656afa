"""Pod source validation in the kernel datapath: a bridge-family nftables table, `bridge sknf`.

Every pod shares one L2 domain, so a pod that sends with another's MAC, IPv4 address or ARP sender
would be believed cluster-wide. Each frame a pod sends enters `brsknf` through its host veth, and
the table's prerouting chain (before the bridge forwards or delivers it, and before br_netfilter
hands it to iptables) checks it against what the pod was given:

- the Ethernet source is the attachment's MAC (set `macs`: host veth . MAC); a host veth with no
  element (not attached yet, or detached) sends nothing;
- IPv4 sources and ARP sender addresses are one of the addresses leased to the same container, any of
  its attachments (set `ips`: host veth . address); ARP probes (sender 0.0.0.0) pass; the ARP sender
  MAC is the attachment's MAC too;
- IPv6 only from pods that have an IPv6 lease (set `v6pods`; the others' IPv6 is dropped as `ipv6`:
  in an IPv4-only cluster no RA, NDP or spoofed IPv6 source ever leaves a pod). Their IPv6 sources
  are their container's IPv6 leases or the pod's link-local address, which the kernel derives from
  its MAC (set `ips6`), or :: for ICMPv6 only (duplicate address detection, MLD); a neighbour
  advertisement's target is one of those addresses (set `nd6`: else `spoofed_arp`, NDP being IPv6's
  ARP); the link-layer address option of a router or neighbour solicitation or a neighbour
  advertisement is the attachment's MAC (set `lla`: else `spoofed_arp`, as an ARP sender MAC). nft
  cannot walk options, so such NDP must have the layout Linux sends: no extension header, and no
  option or exactly one 8-byte option directly after the fixed body (a receiver takes a link-layer
  option wherever it is, so any other layout is refused as `spoofed_arp`); router advertisements and
  redirects are dropped (`ipv6`): a pod is never a router;
- every other EtherType (VLAN tags, raw protocols) is dropped.

The rules are fixed; pods are set elements (added on ADD, removed on DEL, reconciled with the rest),
so the ruleset is the same size for any number of pods. Each reason's drop goes through a chain of its
own that counts it per host veth in a dynamic set (`refused_<reason>`, elements only for pods that
were refused something, so reading the counters stays cheap) and then drops; the drop is a rule of
its own, so a full counter set never lets a frame through.
This kernel has no ebtables-legacy, and the bridge family has no `meta ibrname` or `reject`: rules
match `iifname` (sknf's host veths) and drop.

Everything goes through libnftables' JSON API (python3-nftables), one atomic transaction per change,
but for two statements: `nd6` matches the NA target as a raw payload (`@th,64,128`: nft 1.0.6 has no
`icmpv6 taddr`), `lla` the option's MAC (`@th,208,48`, or `@th,80,48` in a router solicitation), and a
set keyed by a raw payload can only be declared with `typeof`, which its JSON does not express. So
`ensure` creates the table with the NDP checks failing closed (chains `nd_target` and `nd_options`
refuse every NDP frame they see), declares both sets in nft's own syntax, then swaps in the real checks
in one transaction.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterable
from typing import Any

from sknf.config import HOST_VETH_PREFIX
from sknf.datapath import REFUSED_REASONS

log = logging.getLogger(__name__)

FAMILY = "bridge"
TABLE = "sknf"
CHAIN = "from_pod"
REASONS = REFUSED_REASONS  # drop reasons (the BPF program's enum refused_reason)
PRIORITY = -300  # before br_netfilter (0) and anything else on the bridge's prerouting hook
POD_SETS = ("macs", "ips", "ips6", "nd6", "lla", "v6pods")
TYPEOF_SETS = ("nd6", "lla")  # keyed by raw payloads: declared in nft's syntax (see the module docstring)
ND_TARGET = {"payload": {"base": "th", "offset": 64, "len": 128}}  # a neighbour advertisement's target address
ND_SETS = (f"add set {FAMILY} {TABLE} nd6 {{ typeof iifname . @th,64,128 ; }}",
           f"add set {FAMILY} {TABLE} lla {{ typeof iifname . @th,208,48 ; }}")
ND_CHAINS = ("nd_target", "nd_options")  # the chains that use them, closed until they exist
# NDP that carries a link-layer address option: the types, and the length of their fixed body (bytes)
ND_BODIES = ((["nd-router-solicit"], 8), (["nd-neighbor-solicit", "nd-neighbor-advert"], 24))
COUNTED_MAX = 65535  # pods that can be counted per reason at once (a dynamic set's size)


class GuardError(RuntimeError):
    pass


class _Context:
    """One libnftables context, reused: making and freeing one costs ~7 ms (most of it nft_ctx_free),
    twice per pod DEL. Its netlink socket belongs to the namespace it was opened in, so it is kept for
    one namespace at a time (the agent's; a caller in another gets a fresh one, and the old one goes, so
    no namespace is kept alive by it). Calls are serialized: a context is not thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.netns: int | None = None
        self.nft: Any = None

    def get(self) -> Any:
        netns = os.stat("/proc/thread-self/ns/net").st_ino
        if self.nft is None or self.netns != netns:
            try:
                import nftables  # python3-nftables (Debian): imported only where nftables is used
            except ImportError as e:
                raise GuardError(f"no libnftables Python module ({e}); install python3-nftables") from None
            self.nft = None  # the old one's socket closes before a new one opens
            self.nft = nftables.Nftables()
            self.nft.set_json_output(True)
            self.nft.set_handle_output(False)
            self.netns = netns
        return self.nft


_CONTEXT = _Context()


def _nft(commands: list[dict], check: bool = True, terse: bool = False) -> list[dict]:
    """Run one JSON batch (atomic); the output's objects, GuardError with nft's message on failure.
    terse: list sets without their elements."""
    with _CONTEXT.lock:
        nft = _CONTEXT.get()
        nft.set_terse_output(terse)
        rc, out, err = nft.json_cmd({"nftables": commands})
    if rc != 0:
        if check:
            raise GuardError(f"nftables: {(err or '').strip() or 'failed'}")
        return []
    return (out or {}).get("nftables", [])


def _iif() -> dict:
    return {"meta": {"key": "iifname"}}


def _match(left: Any, right: Any, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def _ether_type(kind: str) -> dict:
    return _match(_payload("ether", "type"), kind)


def _refuse(reason: str, *matches: dict) -> list[dict]:
    return [*matches, {"jump": {"target": f"refuse_{reason}"}}]


def _icmpv6(kind: str | dict) -> list[dict]:
    return [_match({"meta": {"key": "l4proto"}}, "ipv6-icmp"), _match(_payload("icmpv6", "type"), kind)]


def _rules() -> list[list[dict]]:
    """The expressions of from_pod's rules, in order."""
    not_own_mac = lambda field: _match({"concat": [_iif(), field]}, "@macs", "!=")  # noqa: E731
    not_leased = lambda field: _match({"concat": [_iif(), field]}, "@ips", "!=")  # noqa: E731
    ip6 = _ether_type("ip6")
    saddr6 = _payload("ip6", "saddr")
    return [  # IPv4 first, as the BPF program does: a frame with a source not leased is spoofed_ip, whatever its MAC
        _refuse("spoofed_ip", _ether_type("ip"), not_leased(_payload("ip", "saddr"))),
        _refuse("spoofed_mac", not_own_mac(_payload("ether", "saddr"))),
        _refuse("spoofed_arp", _ether_type("arp"), not_own_mac(_payload("arp", "saddr ether"))),
        _refuse("spoofed_arp", _ether_type("arp"), _match(_payload("arp", "saddr ip"), "0.0.0.0", "!="),
                not_leased(_payload("arp", "saddr ip"))),
        [_ether_type("arp"), {"accept": None}],
        [_ether_type("ip"), {"accept": None}],
        _refuse("ipv6", ip6, _match(_iif(), "@v6pods", "!=")),
        _refuse("spoofed_ip", ip6, _match(saddr6, "::", "!="), _match({"concat": [_iif(), saddr6]}, "@ips6", "!=")),
        _refuse("spoofed_ip", ip6, _match(saddr6, "::"), _match({"meta": {"key": "l4proto"}}, "ipv6-icmp", "!=")),
        _refuse("ipv6", ip6, *_icmpv6({"set": ["nd-router-advert", "nd-redirect"]})),
        [ip6, *_icmpv6({"set": [t for types, _ in ND_BODIES for t in types]}), {"jump": {"target": "nd_options"}}],
        [ip6, *_icmpv6("nd-neighbor-advert"), {"jump": {"target": "nd_target"}}],
        [ip6, {"accept": None}],
        _refuse("protocol"),
    ]


def _th(offset: int, length: int) -> dict:
    """A raw payload of the transport header, offset and length in bits."""
    return {"payload": {"base": "th", "offset": offset, "len": length}}


def _nd_rules(chain: str, closed: bool) -> list[list[dict]]:
    """Rules of an NDP chain; closed (while its set does not exist yet) it refuses every frame.
    nd_target: a neighbour advertisement for one of the pod's own addresses returns, any other is refused.
    nd_options: no option, or one 8-byte option right after the body whose MAC, if it is a source or
    target link-layer address, is the pod's; any other layout is refused."""
    if closed:
        return [_refuse("spoofed_arp")]
    if chain == "nd_target":
        return [[_match({"concat": [_iif(), ND_TARGET]}, "@nd6"), {"return": None}], _refuse("spoofed_arp")]
    length = _payload("ip6", "length")  # the ICMPv6 message's, with no extension header
    rules = [_refuse("spoofed_arp", _match(_payload("ip6", "nexthdr"), "ipv6-icmp", "!="))]
    for types, body in ND_BODIES:
        kind = _match(_payload("icmpv6", "type"), {"set": types})
        bits = body * 8
        rules += [[kind, _match(length, body), {"return": None}],
                  _refuse("spoofed_arp", kind, _match(length, body + 8, "!=")),
                  _refuse("spoofed_arp", kind, _match(_th(bits + 8, 8), 1, "!=")),  # the option's length: 8 bytes
                  _refuse("spoofed_arp", kind, _match(_th(bits, 8), {"set": [1, 2]}),  # source/target LL address
                          _match({"concat": [_iif(), _th(bits + 16, 48)]}, "@lla", "!="))]
    return rules


def _counting(reason: str) -> list[list[dict]]:
    """refuse_<reason>'s rules: count the frame against its host veth, then drop it."""
    return [[{"set": {"op": "update", "elem": _iif(), "set": f"@refused_{reason}"}}], [{"drop": None}]]


def _all_rules() -> list[tuple[str, list[dict]]]:
    """(chain, expressions) of every rule of the table, in listing order."""
    out = [("prerouting", [_match(_iif(), f"{HOST_VETH_PREFIX}*"), {"jump": {"target": CHAIN}}])]
    out += [(CHAIN, r) for r in _rules()]
    out += [(chain, r) for chain in ND_CHAINS for r in _nd_rules(chain, closed=False)]
    for reason in REASONS:
        out += [(f"refuse_{reason}", r) for r in _counting(reason)]
    return out


def _comments() -> list[str]:
    """Each rule's comment: the ruleset's digest and its position (what `ensure` compares)."""
    rules = _all_rules()
    digest = hashlib.sha256(json.dumps([PRIORITY, COUNTED_MAX, rules], sort_keys=True).encode()).hexdigest()[:12]
    return [f"sknf {digest} {i}" for i in range(len(rules))]


def _definition() -> list[dict]:
    """Commands that create the whole table, sets empty."""
    t = {"family": FAMILY, "table": TABLE}
    cmds: list[dict] = [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": {"set": {**t, "name": "macs", "type": ["ifname", "ether_addr"]}}},
        {"add": {"set": {**t, "name": "ips", "type": ["ifname", "ipv4_addr"]}}},
        {"add": {"set": {**t, "name": "ips6", "type": ["ifname", "ipv6_addr"]}}},
        {"add": {"set": {**t, "name": "v6pods", "type": "ifname"}}},
        {"add": {"chain": {**t, "name": "prerouting", "type": "filter", "hook": "prerouting", "prio": PRIORITY,
                           "policy": "accept"}}},
        {"add": {"chain": {**t, "name": CHAIN}}},
        *({"add": {"chain": {**t, "name": chain}}} for chain in ND_CHAINS),
    ]
    for reason in REASONS:
        cmds += [{"add": {"set": {**t, "name": f"refused_{reason}", "type": "ifname",
                                  "size": COUNTED_MAX, "stmt": [{"counter": None}]}}},
                 {"add": {"chain": {**t, "name": f"refuse_{reason}"}}}]
    cmds += [_rule(chain, comment, expr) for comment, (chain, expr) in zip(_comments(), _all_rules(), strict=True)
             if chain not in ND_CHAINS]
    return cmds


def _rule(chain: str, comment: str, expr: list[dict]) -> dict:
    return {"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": chain, "comment": comment, "expr": expr}}}


def _nd_commands(closed: bool) -> list[dict]:
    """Commands that make the NDP chains' rules (after a flush: one transaction swaps them). Closed, a
    chain's one rule carries the comment of its last real one (the refusal)."""
    cmds: list[dict] = []
    for name in ND_CHAINS:
        comments = [c for c, (chain, _) in zip(_comments(), _all_rules(), strict=True) if chain == name]
        rules = _nd_rules(name, closed)
        cmds += [{"flush": {"chain": {"family": FAMILY, "table": TABLE, "name": name}}},
                 *(_rule(name, c, expr) for c, expr in zip(comments[-len(rules):], rules, strict=True))]
    return cmds


def _listed(terse: bool) -> list[dict] | None:
    """The table's objects as nft lists them, None when it does not exist."""
    return _nft([{"list": {"table": {"family": FAMILY, "name": TABLE}}}], check=False, terse=terse) or None


def _elements(listed: list[dict]) -> dict[str, list]:
    """{set name: element values} of listed objects (values without their counters)."""
    out: dict[str, list] = {}
    for obj in listed:
        if "set" in obj:
            out[obj["set"]["name"]] = [e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
                                       for e in obj["set"].get("elem", [])]
    return out


def ensure() -> bool:
    """Create the table, or rebuild it when its rules are not exactly sknf's (changed by hand, older
    sknf); pods' elements are kept, in the same transaction. True if anything changed."""
    listed = _listed(terse=True)
    if listed is not None:
        if [o["rule"].get("comment") for o in listed if "rule" in o] == _comments():
            return False
        log.warning("nftables table %s %s differs from sknf's; rebuilding it", FAMILY, TABLE)
        listed = _listed(terse=False) or []
    keep = _elements(listed or [])
    cmds = [{"add": {"table": {"family": FAMILY, "name": TABLE}}},
            {"delete": {"table": {"family": FAMILY, "name": TABLE}}}, *_definition(), *_nd_commands(closed=True)]
    cmds += _element_commands("add", {name: keep.get(name, []) for name in POD_SETS if name not in TYPEOF_SETS})
    _nft(cmds)
    for statement in ND_SETS:
        _nft_text(statement)
    _nft([*_nd_commands(closed=False), *_element_commands("add", {n: keep.get(n, []) for n in TYPEOF_SETS})])
    return True


def _nft_text(command: str) -> None:
    """One statement in nft's own syntax (see the module docstring for the one that needs it)."""
    with _CONTEXT.lock:
        rc, _, err = _CONTEXT.get().cmd(command)
    if rc != 0:
        raise GuardError(f"nftables: {(err or '').strip() or 'failed'}")


def remove() -> bool:
    """Delete the table (mode switch to BPF, uninstall); True if it existed. Without libnftables there is
    nothing to do: no sknf that could have made the table runs without it."""
    try:
        if _listed(terse=True) is None:
            return False
    except GuardError:
        return False
    _nft([{"delete": {"table": {"family": FAMILY, "name": TABLE}}}])
    return True


def _pod_elements(host_ifname: str, mac: str, sources: Iterable[str]) -> dict[str, list]:
    """The elements one attachment puts in the pod sets (sources of both families)."""
    v4 = sorted({ip for ip in sources if ":" not in ip})
    v6 = sorted({ipaddress.IPv6Address(ip) for ip in sources if ":" in ip})
    return {"macs": [{"concat": [host_ifname, mac]}],
            "ips": [{"concat": [host_ifname, ip]} for ip in v4],
            "ips6": [{"concat": [host_ifname, str(ip)]} for ip in v6],
            "nd6": [{"concat": [host_ifname, f"0x{int(ip):032x}"]} for ip in v6],  # as nft lists a raw payload
            "lla": [{"concat": [host_ifname, int(mac.replace(":", ""), 16)]}] if v6 else [],  # (48 bits: a number)
            "v6pods": [host_ifname] if v6 else []}


def _element_commands(verb: str, elements: dict[str, list]) -> list[dict]:
    return [{verb: {"element": {"family": FAMILY, "table": TABLE, "name": name, "elem": elems}}}
            for name, elems in elements.items() if elems]


def _key(value: Any) -> tuple:
    """A set element as a hashable value, for comparing listed and wanted elements."""
    if isinstance(value, dict) and "concat" in value:
        return tuple(str(v).lower() for v in value["concat"])
    return (str(value),)


def add_pod(host_ifname: str, mac: str, sources: Iterable[str]) -> None:
    """One attachment's elements (ADD): `add` is idempotent, and nothing is listed, so an ADD costs the
    same with 10 pods or 10,000. Sources that must go are removed by remove_pod (or the next sync)."""
    _nft(_element_commands("add", _pod_elements(host_ifname, mac, sources)))


def remove_pod(host_ifname: str, mac: str, sources: Iterable[str], address: str | None = None) -> None:
    """One attachment's elements and drop counters (DEL). Each is added, then deleted, in one transaction:
    nft's delete fails on a missing element, and a DEL must succeed whatever is left. With `address`
    (the attachment had siblings), that address also stops being allowed on every other host veth."""
    elements = {**_pod_elements(host_ifname, mac, sources), **{f"refused_{r}": [host_ifname] for r in REASONS}}
    cmds = _element_commands("add", elements) + _element_commands("delete", elements)
    if address is not None:
        listed = _nft([{"list": {"set": {"family": FAMILY, "table": TABLE, "name": "ips"}}}], check=False)
        shared = [e for e in _elements(listed).get("ips", []) if _key(e)[1:] == (address,)]
        cmds += _element_commands("delete", {"ips": [e for e in shared if _key(e)[0] != host_ifname]})
    try:
        _nft(cmds)
    except GuardError:
        if _listed(terse=True) is not None:
            raise
        # No table (never set up here, or removed): nothing of the pod is left to remove.


def _list_sets(names: Iterable[str]) -> list[dict]:
    """The named sets with their elements; one command each (libnftables 1.0.6 answers only the first
    list command of a batch)."""
    return [obj for n in names for obj in _nft([{"list": {"set": {"family": FAMILY, "table": TABLE, "name": n}}}])]


def generation() -> int | None:
    """nf_tables' ruleset generation in this namespace (NFT_MSG_GETGEN), or None when it cannot be read.

    The kernel bumps it with every committed change to any table (sknf's, by hand, another tool's;
    not the packet path's own set updates), so an unchanged generation means an unchanged table: the
    reconcile then skips listing it (~70 ms of libnftables JSON at 1,000 pods)."""
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER) as sock:
            sock.bind((0, 0))
            sock.send(_NLMSG.pack(_NLMSG.size + 4, _NFT_GETGEN, 1, 1, 0) + struct.pack("=BBH", socket.AF_UNSPEC, 0, 0))
            data = sock.recv(4096)
    except OSError:
        return None
    length, kind = struct.unpack_from("=IH", data)
    offset = _NLMSG.size + 4  # the reply's nfgenmsg
    while kind == _NFT_NEWGEN and offset + 4 <= length:
        alen, akind = struct.unpack_from("=HH", data, offset)
        if akind == _NFTA_GEN_ID and alen == 8:
            return struct.unpack_from("!I", data, offset + 4)[0]
        offset += max(4, (alen + 3) & ~3)
    return None


_NETLINK_NETFILTER = 12
_NFT_GETGEN, _NFT_NEWGEN = (10 << 8) | 16, (10 << 8) | 15  # NFNL_SUBSYS_NFTABLES, NFT_MSG_GETGEN / NEWGEN
_NFTA_GEN_ID = 1
_NLMSG = struct.Struct("=IHHII")


def sync(pods: Iterable[tuple[str, str, Iterable[str]]]) -> bool:
    """Make the sets hold exactly these pods, (host veth, MAC, allowed sources) each (the periodic
    reconcile); counters of pods that are gone go too. True if anything changed."""
    pods = list(pods)
    wanted: dict[str, dict[tuple, Any]] = {name: {} for name in POD_SETS}
    for host_ifname, mac, sources in pods:
        for name, elems in _pod_elements(host_ifname, mac, sources).items():
            wanted[name].update((_key(e), e) for e in elems)
    live = {host_ifname for host_ifname, _, _ in pods}
    try:
        have = _elements(_list_sets([*POD_SETS, *(f"refused_{r}" for r in REASONS)]))
    except GuardError:
        raise GuardError(f"nftables table {FAMILY} {TABLE} is missing or incomplete (the node's reconcile "
                         "creates it)") from None
    cmds = []
    for name in POD_SETS:
        current = {_key(e): e for e in have.get(name, [])}
        cmds += _element_commands("delete", {name: [e for k, e in current.items() if k not in wanted[name]]})
        cmds += _element_commands("add", {name: [e for k, e in wanted[name].items() if k not in current]})
    for reason in REASONS:
        name = f"refused_{reason}"
        cmds += _element_commands("delete", {name: [e for e in have.get(name, []) if str(e) not in live]})
    if cmds:
        _nft(cmds)
    return bool(cmds)


def drops() -> dict[str, dict[str, int]]:
    """{host veth: {reason: frames dropped}} for the pods that were refused anything (the others: none)."""
    try:
        listed = _list_sets(f"refused_{r}" for r in REASONS)
    except GuardError:  # no table (yet, or not root): nothing was counted
        return {}
    out: dict[str, dict[str, int]] = {}
    for obj in listed:
        s = obj.get("set")
        if not s:
            continue
        reason = s["name"].removeprefix("refused_")
        for e in s.get("elem", []):
            if isinstance(e, dict) and "elem" in e:
                out.setdefault(str(e["elem"]["val"]), dict.fromkeys(REASONS, 0))[reason] = \
                    e["elem"].get("counter", {}).get("packets", 0)
    return out
