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

IPv6: the same FORWARD and POSTROUTING chains in ip6tables of the same backend, for the cluster's IPv6
network (masquerading what leaves it). The INPUT and raw chains (and the node addresses NAT exempts) go
in the tool of the underlay's family only: iptables over an IPv4 underlay, ip6tables over an IPv6 one.

raw/SKNF-RAW-PREROUTING and raw/SKNF-RAW-OUTPUT: the overlay's outer packets (UDP to the VXLAN port,
both directions) skip conntrack (`CT --notrack`): they are never NATed, and tracking them cost a
lookup and an entry update per packet on both nodes. SKNF-INPUT matches addresses and the port only,
never conntrack state, so it filters untracked packets alike; the inner (pod) packets are tracked as
before, on the bridge.

Each chain is rewritten whole and atomically with `iptables-restore --noflush` (declaring a chain
flushes it) only when its rules differ from one `iptables-save`; the jumps are looked up there too
and inserted once. Commands
are argv lists, never shell strings; -w waits for the xtables lock other agents (kube-proxy) hold.

The backend: a host's firewall lives in iptables-legacy (x_tables) or in nf_tables (iptables-nft);
both hook FORWARD, and a DROP policy in one is not undone by an ACCEPT in the other, so sknf's rules
must go where the host's are. `detect()` follows kube-proxy's iptables-wrapper: the backend holding
kubelet's/kube-proxy's chains (KUBE-IPTABLES-HINT, KUBE-KUBELET-CANARY, any KUBE-*; nft checked
first); when neither does, the one with more rules plus non-ACCEPT built-in policies (sknf's own
chains not counted, so a restart decides as the first start did); a tie (an empty host) is nft.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from sknf import nsutil

FORWARD_CHAIN = "SKNF-FORWARD"
NAT_CHAIN = "SKNF-POSTROUTING"
INPUT_CHAIN = "SKNF-INPUT"
RAW_PREROUTING_CHAIN = "SKNF-RAW-PREROUTING"
RAW_OUTPUT_CHAIN = "SKNF-RAW-OUTPUT"
JUMPS = (("filter", "FORWARD", FORWARD_CHAIN), ("nat", "POSTROUTING", NAT_CHAIN), ("filter", "INPUT", INPUT_CHAIN),
         ("raw", "PREROUTING", RAW_PREROUTING_CHAIN), ("raw", "OUTPUT", RAW_OUTPUT_CHAIN))
COMMENT = ["-m", "comment", "--comment", "sknf"]


class IptablesError(RuntimeError):
    pass


@dataclass(frozen=True)
class Backend:
    """One iptables binary family: `legacy` (x_tables) or `nft` (nf_tables), and why it was chosen."""

    mode: str
    reason: str = ""
    family: int = 4  # 6: the same backend's ip6tables

    @property
    def iptables(self) -> str:
        return f"{self._tool}-{self.mode}"

    @property
    def restore(self) -> str:
        return f"{self._tool}-{self.mode}-restore"

    @property
    def _tool(self) -> str:
        return "ip6tables" if self.family == 6 else "iptables"

    def v6(self) -> Backend:
        """The same backend's ip6tables (the host's IPv6 firewall lives where its IPv4 one does)."""
        return Backend(self.mode, self.reason, 6)

    @property
    def save(self) -> str:
        return f"{self._tool}-{self.mode}-save"


MODES = ("nft", "legacy")  # kube-proxy's wrapper looks at nft first
KUBE_HINTS = (":KUBE-IPTABLES-HINT", ":KUBE-KUBELET-CANARY", ":KUBE-")


def _weight(save_output: str) -> tuple[bool, int]:
    """(holds kube chains, rules + non-ACCEPT built-in policies) of one backend's iptables-save, sknf's excluded."""
    lines = save_output.splitlines()
    kube = any(line.startswith(KUBE_HINTS) for line in lines)
    rules = sum(1 for line in lines if line.startswith("-A ") and not line.startswith("-A SKNF-")
                and "--comment sknf" not in line)
    policies = sum(1 for line in lines if line.startswith(":") and line.split()[1] not in ("ACCEPT", "-"))
    return kube, rules + policies


def detect() -> Backend:
    """The backend the host's firewall lives in (see the module docstring for the rule)."""
    seen: dict[str, tuple[bool, int]] = {}
    for mode in MODES:
        binary = Backend(mode).save
        if shutil.which(binary) is None:
            continue
        proc = subprocess.run([binary], capture_output=True, text=True, timeout=10, check=False)
        seen[mode] = _weight(proc.stdout) if proc.returncode == 0 else (False, 0)
    if not seen:
        raise IptablesError("neither iptables-nft-save nor iptables-legacy-save is installed")
    counts = ", ".join(f"{m} {n} rules/policies{' + KUBE chains' * k}" for m, (k, n) in seen.items())
    for mode, (kube, _) in seen.items():
        if kube:
            return Backend(mode, f"kube-proxy's chains are there; {counts}")
    mode = max(seen, key=lambda m: (seen[m][1], m == "nft"))
    return Backend(mode, f"no KUBE-* chains; {counts}" + ("; empty host: nft" if not seen[mode][1] else ""))


def run(args: list[str], stdin: str | None = None, check: bool = True,
        netns: str | None = None) -> subprocess.CompletedProcess:
    """One iptables command (argv), in the named network namespace if given; IptablesError if it fails
    and `check`. Also the lab's kube-proxy's runner (sknf.lab.kubeproxy)."""
    proc = subprocess.run(args, input=stdin, capture_output=True, text=True,
                          preexec_fn=nsutil.preexec_enter(netns) if netns else None)
    if check and proc.returncode != 0:
        where = f" in {netns}" if netns else ""
        raise IptablesError(f"{' '.join(args[:4])}...{where}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def host(ip: str) -> str:
    """One address as a single-host network, as iptables and ip6tables print it."""
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def desired_rules(cluster_cidr: str | None, node_ips: Iterable[str], masquerade: bool,
                  peer_ips: Iterable[str] | None = (), vxlan_port: int = 4789) -> dict[str, list[list[str]]]:
    """The rule specs (without -A CHAIN) of each sknf chain this family needs, keyed by chain.

    cluster_cidr: the cluster's network of this family (None: it has none, so no FORWARD or NAT chain);
    peer_ips: the other nodes' underlay addresses, the only sources VXLAN is accepted from, or None when
    the underlay is of the other family (no INPUT or raw chains here)."""
    out: dict[str, list[list[str]]] = {}
    if cluster_cidr is not None:
        out[FORWARD_CHAIN] = [
            ["-s", cluster_cidr, *COMMENT, "-j", "ACCEPT"],
            ["-d", cluster_cidr, *COMMENT, "-j", "ACCEPT"],
        ]
        nat: list[list[str]] = []
        if masquerade:
            nat.append(["-s", cluster_cidr, "-d", cluster_cidr, *COMMENT, "-j", "RETURN"])
            nat += [["-s", cluster_cidr, "-d", host(ip), *COMMENT, "-j", "RETURN"] for ip in sorted(set(node_ips))]
            multicast = "ff00::/8" if ":" in cluster_cidr else "224.0.0.0/4"
            nat.append(["-s", cluster_cidr, "!", "-d", multicast, *COMMENT, "-j", "MASQUERADE", "--random-fully"])
        out[NAT_CHAIN] = nat
    if peer_ips is not None:
        udp = ["-p", "udp", "-m", "udp", "--dport", str(vxlan_port), *COMMENT]
        overlay = [["-s", host(ip), *udp, "-j", "RETURN"] for ip in sorted(set(peer_ips))]
        overlay.append([*udp, "-j", "DROP"])
        notrack = [[*udp, "-j", "CT", "--notrack"]]
        out |= {INPUT_CHAIN: overlay, RAW_PREROUTING_CHAIN: notrack, RAW_OUTPUT_CHAIN: notrack}
    return out


def _saved(backend: Backend) -> dict[tuple[str, str], list[str]]:
    """{(table, chain): its rules as `iptables -S` prints them} of every table, from one iptables-save
    (ten `iptables -S`/`-C` execs per reconcile cost more than the rest of an idle node's reconcile)."""
    out: dict[tuple[str, str], list[str]] = {}
    table = ""
    for line in run([backend.save]).stdout.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            out[(table, line[1:].split()[0])] = []
        elif line.startswith("-A "):
            out.setdefault((table, line.split(maxsplit=2)[1]), []).append(line)
    return out


def _as_printed(chain: str, rules: list[list[str]]) -> list[str]:
    """How `iptables -S` prints these rules back, to compare without rewriting needlessly."""
    return [" ".join(["-A", chain, *r]) for r in rules]


def ensure(backend: Backend, cluster_cidr: str | None, node_ips: Iterable[str], masquerade: bool = True,
           peer_ips: Iterable[str] | None = (), vxlan_port: int = 4789) -> bool:
    """Reconcile every chain and its jump in the host's backend (a chain this family no longer needs goes,
    with its jump: the underlay moved to the other family, say); True if anything was changed."""
    wanted = desired_rules(cluster_cidr, node_ips, masquerade, peer_ips, vxlan_port)
    have = _saved(backend)
    stale: dict[str, list[str]] = {}  # table -> restore lines of its chains that differ
    for table, _parent, chain in JUMPS:
        if chain in wanted and have.get((table, chain)) != _as_printed(chain, wanted[chain]):
            stale.setdefault(table, []).extend([f":{chain} - [0:0]", *_as_printed(chain, wanted[chain])])
    if stale:  # one restore for every table: one exec, one commit per table
        run([backend.restore, "-w", "--noflush"],
             stdin="".join(f"*{table}\n" + "\n".join(lines) + "\nCOMMIT\n" for table, lines in stale.items()))
    changed = bool(stale)
    for table, parent, chain in JUMPS:
        jump = " ".join(["-A", parent, *COMMENT, "-j", chain])
        if chain not in wanted:
            if (table, chain) in have:
                if jump in have.get((table, parent), []):
                    run([backend.iptables, "-w", "-t", table, "-D", parent, *COMMENT, "-j", chain])
                run([backend.iptables, "-w", "-t", table, "-F", chain])
                run([backend.iptables, "-w", "-t", table, "-X", chain])
                changed = True
            continue
        if jump not in have.get((table, parent), []):
            run([backend.iptables, "-w", "-t", table, "-I", parent, "1", *COMMENT, "-j", chain])
            changed = True
    return changed


def teardown(backend: Backend | None = None) -> None:
    """Remove the jumps and the chains from one backend, or from every installed one (uninstall: the
    backend the agent chose is not recorded, and sknf's chains are its own in either); missing ones are
    fine (uninstall, tests, mode switches)."""
    backends = [backend] if backend else [Backend(m) for m in MODES]
    for b in [x for base in backends for x in (base, base.v6()) if shutil.which(x.iptables)]:
        for table, parent, chain in JUMPS:
            while run([b.iptables, "-w", "-t", table, "-D", parent, *COMMENT, "-j", chain],
                       check=False).returncode == 0:
                pass
            run([b.iptables, "-w", "-t", table, "-F", chain], check=False)
            run([b.iptables, "-w", "-t", table, "-X", chain], check=False)
