"""Pod source validation in the kernel datapath: a bridge-family nftables table, `bridge sknf`.

Every pod shares one L2 domain, so a pod that sends with another's MAC, IPv4 address or ARP sender
would be believed cluster-wide. Each frame a pod sends enters `brsknf` through its host veth, and
the table's prerouting chain (before the bridge forwards or delivers it, and before br_netfilter
hands it to iptables) checks it against what the pod was given:

- the Ethernet source is the attachment's MAC (set `macs`: host veth . MAC);
- IPv4 sources and ARP sender addresses are one of the addresses leased to the same container, any of
  its attachments (set `ips`: host veth . address); ARP probes (sender 0.0.0.0) pass; the ARP sender
  MAC is the attachment's MAC too;
- IPv6 is dropped (pods get no IPv6 until dual-stack: no RA, NDP or spoofed IPv6 source ever leaves
  a pod), and so is every other EtherType (VLAN tags, raw protocols).

The rules are fixed; pods are set elements (added on ADD, removed on DEL, reconciled with the rest),
so the ruleset is the same size for any number of pods. Drops are counted per pod and reason by the
elements of one counter-carrying set per reason (`drop_<reason>`): a frame from a host veth with no
element there (not attached yet, or already detached) is dropped by a rule of its own.
This kernel has no ebtables-legacy, and the bridge family has no `meta ibrname` or `reject`: rules
match `iifname` (sknf's host veths) and drop.

Everything goes through libnftables' JSON API (python3-nftables), one atomic transaction per change.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from typing import Any

from sknf.config import HOST_VETH_PREFIX
from sknf.datapath import REFUSED_REASONS

log = logging.getLogger(__name__)

FAMILY = "bridge"
TABLE = "sknf"
CHAIN = "from_pod"
REASONS = REFUSED_REASONS  # drop reasons, in the order the chain checks them (as the BPF program does)
PRIORITY = -300  # before br_netfilter (0) and anything else on the bridge's prerouting hook


class GuardError(RuntimeError):
    pass


def _nft(commands: list[dict], check: bool = True) -> list[dict]:
    """Run one JSON batch (atomic); the output's objects, GuardError with nft's message on failure."""
    try:
        import nftables  # python3-nftables (Debian): imported only where nftables is used
    except ImportError as e:
        raise GuardError(f"no libnftables Python module ({e}); install python3-nftables") from None
    nft = nftables.Nftables()
    nft.set_json_output(True)
    nft.set_handle_output(False)
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


def _drop(reason: str, *matches: dict) -> list[dict]:
    """Drop what matches, counted against the pod's element of drop_<reason>."""
    return [*matches, _match(_iif(), f"@drop_{reason}"), {"drop": None}]


def _rules() -> list[list[dict]]:
    """The expressions of from_pod's rules, in order."""
    not_own_mac = lambda field: _match({"concat": [_iif(), field]}, "@macs", "!=")  # noqa: E731
    not_leased = lambda field: _match({"concat": [_iif(), field]}, "@ips", "!=")  # noqa: E731
    return [
        # A host veth sknf holds no entry for: nothing it sends is trusted (counted per rule only).
        [_match(_iif(), f"@drop_{REASONS[0]}", "!="), {"counter": None}, {"drop": None}],
        _drop("spoofed_mac", not_own_mac(_payload("ether", "saddr"))),
        _drop("spoofed_arp", _ether_type("arp"), not_own_mac(_payload("arp", "saddr ether"))),
        _drop("spoofed_arp", _ether_type("arp"), _match(_payload("arp", "saddr ip"), "0.0.0.0", "!="),
              not_leased(_payload("arp", "saddr ip"))),
        [_ether_type("arp"), {"accept": None}],
        _drop("spoofed_ip", _ether_type("ip"), not_leased(_payload("ip", "saddr"))),
        [_ether_type("ip"), {"accept": None}],
        _drop("ipv6", _ether_type("ip6")),
        _drop("protocol"),
    ]


def _digest() -> str:
    return hashlib.sha256(json.dumps([PRIORITY, REASONS, _rules()], sort_keys=True).encode()).hexdigest()[:12]


def _comments() -> list[str]:
    """Each rule's comment: the ruleset's digest and its position (what `ensure` compares)."""
    return [f"sknf {_digest()} {i}" for i in range(len(_rules()) + 1)]


def _definition() -> list[dict]:
    """Commands that create the whole table, sets empty."""
    t = {"family": FAMILY, "table": TABLE}
    comments = _comments()
    cmds: list[dict] = [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": {"set": {**t, "name": "macs", "type": ["ifname", "ether_addr"]}}},
        {"add": {"set": {**t, "name": "ips", "type": ["ifname", "ipv4_addr"]}}},
        *({"add": {"set": {**t, "name": f"drop_{r}", "type": "ifname", "stmt": [{"counter": None}]}}}
          for r in REASONS),
        {"add": {"chain": {**t, "name": "prerouting", "type": "filter", "hook": "prerouting", "prio": PRIORITY,
                           "policy": "accept"}}},
        {"add": {"chain": {**t, "name": CHAIN}}},
        {"add": {"rule": {**t, "chain": "prerouting", "comment": comments[0],
                          "expr": [_match(_iif(), f"{HOST_VETH_PREFIX}*"), {"jump": {"target": CHAIN}}]}}},
    ]
    cmds += [{"add": {"rule": {**t, "chain": CHAIN, "comment": c, "expr": e}}}
             for c, e in zip(comments[1:], _rules(), strict=True)]
    return cmds


def _listed() -> list[dict] | None:
    """The table's objects as nft lists them, None when it does not exist."""
    out = _nft([{"list": {"table": {"family": FAMILY, "name": TABLE}}}], check=False)
    return out or None


def _elements(listed: list[dict]) -> dict[str, list]:
    """{set name: element values} of a listed table (values without their counters)."""
    out: dict[str, list] = {}
    for obj in listed:
        if "set" in obj:
            out[obj["set"]["name"]] = [e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
                                       for e in obj["set"].get("elem", [])]
    return out


def ensure() -> bool:
    """Create the table, or rebuild it when its rules are not exactly sknf's (changed by hand, older
    sknf); pod elements are kept, in the same transaction. True if anything changed."""
    listed = _listed()
    if listed is not None:
        comments = [o["rule"].get("comment") for o in listed if "rule" in o]
        if comments == _comments():
            return False
        log.warning("nftables table %s %s differs from sknf's; rebuilding it", FAMILY, TABLE)
    keep = _elements(listed or [])
    cmds = [{"add": {"table": {"family": FAMILY, "name": TABLE}}},
            {"delete": {"table": {"family": FAMILY, "name": TABLE}}}, *_definition()]
    cmds += [{"add": {"element": {"family": FAMILY, "table": TABLE, "name": name, "elem": elems}}}
             for name, elems in keep.items() if elems and name in _set_names()]
    _nft(cmds)
    return True


def _set_names() -> tuple[str, ...]:
    return ("macs", "ips", *(f"drop_{r}" for r in REASONS))


def remove() -> bool:
    """Delete the table (mode switch to BPF, uninstall); True if it existed."""
    if _listed() is None:
        return False
    _nft([{"delete": {"table": {"family": FAMILY, "name": TABLE}}}])
    return True


def _pod_elements(host_ifname: str, mac: str, sources: Iterable[str]) -> dict[str, list]:
    """The elements one attachment contributes to each set."""
    return {"macs": [{"concat": [host_ifname, mac]}],
            "ips": [{"concat": [host_ifname, ip]} for ip in sorted(set(sources))],
            **{f"drop_{r}": [host_ifname] for r in REASONS}}


def _element_commands(verb: str, elements: dict[str, list]) -> list[dict]:
    return [{verb: {"element": {"family": FAMILY, "table": TABLE, "name": name, "elem": elems}}}
            for name, elems in elements.items() if elems]


def add_pod(host_ifname: str, mac: str, sources: Iterable[str]) -> None:
    """One attachment's elements (ADD): `add` is idempotent, and nothing is listed, so an ADD costs the
    same with 10 pods or 10,000. Sources that must go are removed by remove_pod (or the next sync)."""
    _nft(_element_commands("add", _pod_elements(host_ifname, mac, sources)))


def remove_pod(host_ifname: str, mac: str, sources: Iterable[str], address: str | None = None) -> None:
    """One attachment's elements (DEL), and their counters. Each is added, then deleted, in one transaction:
    nft's delete fails on a missing element, and a DEL must succeed whatever is left. With `address`
    (the attachment had siblings), that address also stops being allowed on every other host veth."""
    elements = _pod_elements(host_ifname, mac, sources)
    cmds = _element_commands("add", elements) + _element_commands("delete", elements)
    if address is not None:
        listed = _nft([{"list": {"set": {"family": FAMILY, "table": TABLE, "name": "ips"}}}])
        shared = [e for e in _elements(listed).get("ips", []) if _key(e)[1:] == (address,)]
        cmds += _element_commands("delete", {"ips": [e for e in shared if _key(e)[0] != host_ifname]})
    _nft(cmds)


def _key(value: Any) -> tuple:
    """A set element as a hashable value, for comparing listed and wanted elements."""
    if isinstance(value, dict) and "concat" in value:
        return tuple(str(v).lower() for v in value["concat"])
    return (str(value),)


def sync(pods: Iterable[tuple[str, str, Iterable[str]]]) -> None:
    """Make the sets hold exactly these pods, (host veth, MAC, allowed sources) each (the periodic
    reconcile); counters of elements that stay are kept."""
    wanted: dict[str, dict[tuple, Any]] = {name: {} for name in _set_names()}
    for host_ifname, mac, sources in pods:
        for name, elems in _pod_elements(host_ifname, mac, sources).items():
            wanted[name].update((_key(e), e) for e in elems)
    listed = _listed()
    if listed is None:
        raise GuardError(f"nftables table {FAMILY} {TABLE} is missing (the node's reconcile creates it)")
    have = {name: {_key(e): e for e in elems} for name, elems in _elements(listed).items()}
    cmds = []
    for name in _set_names():
        current = have.get(name, {})
        stale = [e for k, e in current.items() if k not in wanted[name]]
        missing = [e for k, e in wanted[name].items() if k not in current]
        cmds += _element_commands("delete", {name: stale}) + _element_commands("add", {name: missing})
    if cmds:
        _nft(cmds)


def drops() -> dict[str, dict[str, int]]:
    """{host veth: {reason: packets dropped}} from the per-reason sets' element counters."""
    listed = _listed() or []
    out: dict[str, dict[str, int]] = {}
    for obj in listed:
        s = obj.get("set")
        if not s or not s["name"].startswith("drop_"):
            continue
        reason = s["name"][len("drop_"):]
        for e in s.get("elem", []):
            if isinstance(e, dict) and "elem" in e:
                out.setdefault(str(e["elem"]["val"]), {})[reason] = e["elem"].get("counter", {}).get("packets", 0)
    return out
