"""kube-proxy's part of the lab: Service NAT on each node, in either of kube-proxy's two modes.

Real clusters run kube-proxy in iptables mode (chains KUBE-SERVICES, KUBE-SVC-*, KUBE-SEP-*) or in
nftables mode (one `table ip kube-proxy`). Both DNAT in the node's stack, which is exactly what sknf's
datapaths must keep working, so the lab reproduces the shapes that matter of each:

- ClusterIPs: DNAT to the endpoint (a pod, or a node address for hostNetwork endpoints such as the
  `kubernetes` Service's API server); an endpoint reaching itself through its Service is masqueraded
  (hairpin).
- NodePorts on every node address (`--dst-type LOCAL` / `fib daddr type local`): with the Cluster
  traffic policy to any endpoint and masqueraded (the client is replaced by the node); with the Local
  policy only to the node's own endpoints and the client address kept.
- MASQUERADE of marked packets in POSTROUTING (mark 0x4000), as kube-proxy does.

iptables rules go in through `iptables-restore` (argv, rules on stdin), nftables through libnftables'
JSON API. `install` replaces whatever mode was there before, so one lab can be checked in both.
IPv6 Services (dual-stack labs) get the same rules in ip6tables of the same backend, or in
`table ip6 kube-proxy`, as kube-proxy programs each family apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import nftables

from sknf import iptables, nsutil

MODES = ("iptables", "nftables")
MASQ_MARK = 0x4000
NFT_TABLE = "kube-proxy"
IPT_CHAINS = ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-MARK-MASQ", "KUBE-POSTROUTING")
IPT_JUMPS = (("PREROUTING", "KUBE-SERVICES"), ("OUTPUT", "KUBE-SERVICES"), ("POSTROUTING", "KUBE-POSTROUTING"))


@dataclass(frozen=True)
class Service:
    """One Service port, as kube-proxy programs it: a ClusterIP port or a NodePort, and its endpoints.

    endpoints are (address, port, node name); a Local-policy NodePort uses only the endpoints on the
    node it is programmed on.
    """

    name: str
    proto: str  # "tcp" or "udp"
    port: int  # the ClusterIP's port, or the NodePort
    endpoints: tuple[tuple[str, int, str], ...]
    cluster_ip: str | None = None  # None: a NodePort
    local: bool = False  # externalTrafficPolicy: Local (NodePorts only)

    def endpoints_on(self, node: str) -> list[tuple[str, int]]:
        return [(ip, port) for ip, port, where in self.endpoints if not self.local or where == node]

    @property
    def family(self) -> int:
        return 6 if ":" in self.endpoints[0][0] else 4


def _host(ip: str) -> str:
    """An address as iptables writes it in a DNAT target: IPv6 in brackets."""
    return f"[{ip}]" if ":" in ip else ip


def _single(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def _chain_id(n: int, svc: Service) -> str:
    return f"{n:04d}{svc.proto.upper()}"


def iptables_rules(services: list[Service], node: str) -> str:
    """iptables-restore input shaped like kube-proxy's iptables mode, for one node."""
    lines = ["*nat", *(f":{c} - [0:0]" for c in IPT_CHAINS),
             f"-A KUBE-MARK-MASQ -j MARK --set-xmark {MASQ_MARK:#x}/{MASQ_MARK:#x}",
             f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK:#x}/{MASQ_MARK:#x} -j RETURN",
             f"-A KUBE-POSTROUTING -j MARK --set-xmark 0x0/{MASQ_MARK:#x}",
             "-A KUBE-POSTROUTING -j MASQUERADE --random-fully"]
    for n, svc in enumerate(services):
        svc_chain = f"KUBE-SVC-{_chain_id(n, svc)}"
        lines.append(f":{svc_chain} - [0:0]")
        if svc.cluster_ip:
            lines.append(f"-A KUBE-SERVICES -d {_single(svc.cluster_ip)} -p {svc.proto} --dport {svc.port} "
                         f"-j {svc_chain}")
        else:
            lines.append(f"-A KUBE-NODEPORTS -p {svc.proto} --dport {svc.port} -j {svc_chain}")
            if not svc.local:
                lines.append(f"-A {svc_chain} -j KUBE-MARK-MASQ")
        eps = svc.endpoints_on(node)
        for k, (ip, port) in enumerate(eps):
            sep = f"KUBE-SEP-{_chain_id(n, svc)}{k:02d}"
            lines += [f":{sep} - [0:0]", f"-A {sep} -s {_single(ip)} -j KUBE-MARK-MASQ",
                      f"-A {sep} -p {svc.proto} -j DNAT --to-destination {_host(ip)}:{port}"]
            left = len(eps) - k
            pick = [] if left == 1 else ["-m", "statistic", "--mode", "random", "--probability", f"{1 / left:.5f}"]
            lines.append(" ".join([f"-A {svc_chain}", *pick, f"-j {sep}"]))
    lines.append("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
    return "\n".join([*lines, "COMMIT", ""])


def _match(left: dict, right, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _l4(proto: str, port: int) -> list[dict]:
    return [_match({"meta": {"key": "l4proto"}}, proto), _match({"payload": {"protocol": "th", "field": "dport"}},
                                                                 port)]


def nftables_ruleset(services: list[Service], node: str, family: str = "ip") -> dict:
    """libnftables JSON for kube-proxy's nftables mode (`table ip kube-proxy`, or `ip6` for IPv6
    Services), for one node."""
    table = {"family": family, "table": NFT_TABLE}
    mark = {"meta": {"key": "mark"}}
    cmds: list[dict] = [{"add": {"table": {"family": family, "name": NFT_TABLE}}}]

    def chain(name: str, **hook) -> None:
        cmds.append({"add": {"chain": {"family": family, "table": NFT_TABLE, "name": name, **hook}}})

    def rule(chain_name: str, *expr: dict) -> None:
        cmds.append({"add": {"rule": {**table, "chain": chain_name, "expr": list(expr)}}})

    chain("nat-prerouting", type="nat", hook="prerouting", prio=-100, policy="accept")
    chain("nat-output", type="nat", hook="output", prio=-100, policy="accept")
    chain("nat-postrouting", type="nat", hook="postrouting", prio=100, policy="accept")
    for name in ("services", "nodeports", "masquerading", "mark-for-masquerade"):
        chain(name)
    rule("nat-prerouting", {"jump": {"target": "services"}})
    rule("nat-output", {"jump": {"target": "services"}})
    rule("nat-postrouting", {"jump": {"target": "masquerading"}})
    rule("mark-for-masquerade", {"mangle": {"key": mark, "value": {"|": [mark, MASQ_MARK]}}})
    rule("masquerading", _match({"&": [mark, MASQ_MARK]}, 0), {"return": None})
    rule("masquerading", {"mangle": {"key": mark, "value": {"^": [mark, MASQ_MARK]}}})
    rule("masquerading", {"masquerade": {"flags": ["fully-random"]}})
    for n, svc in enumerate(services):
        svc_chain = f"service-{_chain_id(n, svc)}"
        chain(svc_chain)
        if svc.cluster_ip:
            rule("services", _match({"payload": {"protocol": family, "field": "daddr"}}, svc.cluster_ip),
                 *_l4(svc.proto, svc.port), {"goto": {"target": svc_chain}})
        else:
            rule("nodeports", *_l4(svc.proto, svc.port), {"goto": {"target": svc_chain}})
            if not svc.local:
                rule(svc_chain, {"jump": {"target": "mark-for-masquerade"}})
        eps = svc.endpoints_on(node)
        for k, (ip, port) in enumerate(eps):
            ep_chain = f"endpoint-{_chain_id(n, svc)}{k:02d}"
            chain(ep_chain)
            rule(ep_chain, _match({"payload": {"protocol": family, "field": "saddr"}}, ip),
                 {"jump": {"target": "mark-for-masquerade"}})
            rule(ep_chain, _match({"meta": {"key": "l4proto"}}, svc.proto), {"dnat": {"addr": ip, "port": port}})
        if eps:
            rule(svc_chain, {"vmap": {"key": {"numgen": {"mode": "random", "mod": len(eps)}},
                                      "data": {"set": [[k, {"goto": {"target": f"endpoint-{_chain_id(n, svc)}{k:02d}"}}]
                                                       for k in range(len(eps))]}}})
    rule("services", _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local"),
         {"jump": {"target": "nodeports"}})
    return {"nftables": [{"metainfo": {"json_schema_version": 1}}, *cmds]}


def install(netns: str, mode: str, services: list[Service], node: str) -> None:
    """Program the node's Service NAT in this mode, removing the other mode's rules first."""
    if mode not in MODES:
        raise ValueError(f"kube-proxy mode must be one of {', '.join(MODES)}, not {mode!r}")
    remove(netns)
    if mode == "iptables":
        with nsutil.entered(netns):
            backend = iptables.detect()  # the host's backend, as kube-proxy's iptables-wrapper picks it
    for family in (4, 6):
        ours = [svc for svc in services if svc.family == family]
        if family == 6 and not ours:
            continue
        if mode == "iptables":
            tool = backend if family == 4 else backend.v6()
            iptables.run([tool.restore, "-w", "--noflush"], iptables_rules(ours, node), netns=netns)
            for parent, chain in IPT_JUMPS:
                iptables.run([tool.iptables, "-w", "-t", "nat", "-A", parent, "-j", chain], netns=netns)
        else:
            run_nft(netns, nftables_ruleset(ours, node, "ip" if family == 4 else "ip6"))


def remove(netns: str) -> None:
    """Both modes' rules gone from the node, from either iptables backend (missing ones are fine)."""
    backends = [iptables.Backend(mode) for mode in iptables.MODES]
    for binary in (tool.iptables for b in backends for tool in (b, b.v6())):
        for parent, chain in IPT_JUMPS:
            while iptables.run([binary, "-w", "-t", "nat", "-D", parent, "-j", chain], check=False,
                               netns=netns).returncode == 0:
                pass
        listed = iptables.run([binary, "-w", "-t", "nat", "-S"], check=False, netns=netns).stdout.splitlines()
        ours = [line.split()[1] for line in listed if line.startswith("-N KUBE-")]
        for flag in ("-F", "-X"):
            for chain in ours:
                iptables.run([binary, "-w", "-t", "nat", flag, chain], check=False, netns=netns)
    for family in ("ip", "ip6"):
        tables = run_nft(netns, {"nftables": [{"list": {"tables": {"family": family}}}]})
        if any(t.get("table", {}).get("name") == NFT_TABLE for t in tables):
            run_nft(netns, {"nftables": [{"delete": {"table": {"family": family, "name": NFT_TABLE}}}]})


def run_nft(netns: str, commands: dict) -> list[dict]:
    """Run libnftables JSON commands inside the namespace; what they list (empty for changes)."""
    with nsutil.entered(netns):
        nft = nftables.Nftables()
        nft.set_json_output(True)
        rc, out, err = nft.json_cmd(commands)
    if rc != 0:
        raise RuntimeError(f"nft in {netns}: {err.strip() or json.dumps(commands)[:200]}")
    return out.get("nftables", []) if isinstance(out, dict) else []
