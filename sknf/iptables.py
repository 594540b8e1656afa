"""sknf's iptables rules, kept in chains of its own so reconciling never touches anyone else's rules.

filter/SKNF-FORWARD (jumped to from FORWARD): accept pod traffic in both directions. The kernel
treats pod namespaces as external hosts, and many distributions default FORWARD to DROP: the seeds'
"known issue", handled here.

nat/SKNF-POSTROUTING (jumped to from POSTROUTING): masquerade only what leaves the cluster. Traffic
from a pod to another pod or to a cluster node keeps its source address (nodes reach pods and pods
reach nodes without NAT).

filter/SKNF-INPUT (jumped to from INPUT): the overlay trusts only its peers. VXLAN (the configured UDP
port) from any address but a known node's underlay address is dropped before the VXLAN device sees
it, so nobody else can put a frame into the cluster's L2 domain or steer its FDB learning. Peers are
RETURNed to INPUT, whose own policy still applies to them.

Each chain is rewritten whole and atomically with `iptables-restore --noflush` (declaring a chain
flushes it) only when its rules differ; the jumps are checked with -C and inserted once. Commands
are argv lists, never shell strings; -w waits for the xtables lock other agents (kube-proxy) hold.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable

FORWARD_CHAIN = "SKNF-FORWARD"
NAT_CHAIN = "SKNF-POSTROUTING"
INPUT_CHAIN = "SKNF-INPUT"
JUMPS = (("filter", "FORWARD", FORWARD_CHAIN), ("nat", "POSTROUTING", NAT_CHAIN), ("filter", "INPUT", INPUT_CHAIN))
COMMENT = ["-m", "comment", "--comment", "sknf"]


class IptablesError(RuntimeError):
    pass


def _run(args: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, input=stdin, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise IptablesError(f"{' '.join(args[:4])}...: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def desired_rules(cluster_cidr: str, node_ips: Iterable[str], masquerade: bool, peer_ips: Iterable[str] = (),
                  vxlan_port: int = 4789) -> dict[str, list[list[str]]]:
    """The rule specs (without -A CHAIN) of each sknf chain, keyed by chain; peer_ips are the other nodes'
    underlay addresses, the only sources VXLAN is accepted from."""
    forward = [
        ["-s", cluster_cidr, *COMMENT, "-j", "ACCEPT"],
        ["-d", cluster_cidr, *COMMENT, "-j", "ACCEPT"],
    ]
    nat: list[list[str]] = []
    if masquerade:
        nat.append(["-s", cluster_cidr, "-d", cluster_cidr, *COMMENT, "-j", "RETURN"])
        nat += [["-s", cluster_cidr, "-d", f"{ip}/32", *COMMENT, "-j", "RETURN"] for ip in sorted(set(node_ips))]
        nat.append(["-s", cluster_cidr, "!", "-d", "224.0.0.0/4", *COMMENT, "-j", "MASQUERADE", "--random-fully"])
    udp = ["-p", "udp", "-m", "udp", "--dport", str(vxlan_port), *COMMENT]
    overlay = [["-s", f"{ip}/32", *udp, "-j", "RETURN"] for ip in sorted(set(peer_ips))]
    overlay.append([*udp, "-j", "DROP"])
    return {FORWARD_CHAIN: forward, NAT_CHAIN: nat, INPUT_CHAIN: overlay}


def _current(table: str, chain: str) -> list[str] | None:
    """The chain's rules as `iptables -S` prints them, or None if the chain does not exist."""
    proc = _run(["iptables", "-w", "-t", table, "-S", chain], check=False)
    if proc.returncode != 0:
        return None
    return [line for line in proc.stdout.splitlines() if line.startswith("-A ")]


def _as_printed(chain: str, rules: list[list[str]]) -> list[str]:
    """How `iptables -S` prints these rules back, to compare without rewriting needlessly."""
    return [" ".join(["-A", chain, *r]) for r in rules]


def ensure(cluster_cidr: str, node_ips: Iterable[str], masquerade: bool = True, peer_ips: Iterable[str] = (),
           vxlan_port: int = 4789) -> bool:
    """Reconcile every chain and its jump; True if anything was changed."""
    changed = False
    wanted = desired_rules(cluster_cidr, node_ips, masquerade, peer_ips, vxlan_port)
    for table, parent, chain in JUMPS:
        rules = wanted[chain]
        if _current(table, chain) != _as_printed(chain, rules):
            body = "\n".join([f"*{table}", f":{chain} - [0:0]", *_as_printed(chain, rules), "COMMIT", ""])
            _run(["iptables-restore", "-w", "--noflush"], stdin=body)
            changed = True
        jump = [parent, *COMMENT, "-j", chain]
        if _run(["iptables", "-w", "-t", table, "-C", *jump], check=False).returncode != 0:
            _run(["iptables", "-w", "-t", table, "-I", parent, "1", *COMMENT, "-j", chain])
            changed = True
    return changed


def teardown() -> None:
    """Remove the jumps and the chains; missing ones are fine (uninstall, tests, mode switches)."""
    for table, parent, chain in JUMPS:
        while _run(["iptables", "-w", "-t", table, "-D", parent, *COMMENT, "-j", chain], check=False).returncode == 0:
            pass
        _run(["iptables", "-w", "-t", table, "-F", chain], check=False)
        _run(["iptables", "-w", "-t", table, "-X", chain], check=False)
