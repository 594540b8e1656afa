"""`sknf doctor`: what is wrong on this node, where, and how to fix it; one line per check.

Runs on a node (the agent's image or a checkout), as root, with or without the agent: what only the
agent knows (its datapath, peer health) comes over its socket ({"op": "health"}), everything else is
read from the kernel and the files the agent reads. When the configuration cannot be loaded, that is
the first finding, and the checks that need no configuration still run.

Exit status (documented in docs/troubleshooting.md): 0 every check OK, 3 at least one WARN and no
FAIL, 4 at least one FAIL. (2 stays what every sknf command returns for a bad configuration given on
the command line; doctor reports a configuration it cannot load as a FAIL instead.)
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sknf import api, guard
from sknf.config import BRIDGE, HOST_VETH_PREFIX, VXLAN, Config, ConfigError, load
from sknf.policy import nft as policy_nft

OK, WARN, FAIL = "OK", "WARN", "FAIL"
RANK = {OK: 0, WARN: 1, FAIL: 2}
EXIT = {OK: 0, WARN: 3, FAIL: 4}
FILL_WARN, FILL_FAIL = 0.80, 0.95  # fill levels against a limit
LEFTOVER_DEVICES = ("cni0", "flannel.*", "flannel-wg*", "cilium_*", "cali*", "vxlan.calico", "weave",
                    "kube-bridge")
IPTABLES_OWN_TABLES = {"filter", "nat", "mangle", "raw", "security"}  # iptables-nft's, in family ip
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING}


@dataclass
class Finding:
    check: str
    status: str
    message: str
    fix: str = ""


_UNREAD = object()  # Context._peers before the first read


@dataclass
class Context:
    """What the checks read; gathered once."""

    cfg: Config | None
    config_error: str | None = None
    agent: dict[str, Any] | None = None  # the agent's {"op": "health"} reply
    agent_error: str | None = None
    nft: list[dict] | None = None  # the ruleset as libnftables JSON items
    nft_error: str | None = None
    links: dict[str, Any] = field(default_factory=dict)
    _peers: Any = field(default=_UNREAD, init=False, repr=False)

    def setting(self, name: str) -> Any:
        return getattr(self.cfg, name) if self.cfg is not None else DEFAULTS[name]

    @property
    def socket_path(self) -> Path:
        return Path(self.setting("run_dir")) / "sknf.sock"

    def peers(self) -> list[dict[str, Any]] | None:
        """The peer list as the agent has it, else the Node objects or the static peers file; None when unknown.
        Read once: the checks ask many times, and with Node objects each read is an API list."""
        if self._peers is _UNREAD:
            self._peers = self._read_peers()
        return self._peers

    def _read_peers(self) -> list[dict[str, Any]] | None:
        if self.agent is not None:
            return self.agent["peers"]
        cfg = self.cfg
        if cfg is not None and cfg.peer_source == "kubernetes":
            from sknf import kube

            try:
                return [dataclasses.asdict(n) for n in kube.list_peers(cfg)]
            except kube.KubeError:
                return None
        if cfg is None or cfg.peers_file is None:
            return None
        from sknf.peers import PeersFileError, StaticPeerSource

        try:
            return [dataclasses.asdict(n) for n in StaticPeerSource(cfg.peers_file, cfg.underlay_family).nodes()]
        except PeersFileError:
            return None

    def others(self) -> list[dict[str, Any]]:
        return [p for p in self.peers() or [] if p["name"] != self.node_name]

    @property
    def node_name(self) -> str | None:
        if self.cfg is not None:
            return self.cfg.node_name
        return self.agent["node"] if self.agent else None


# -- gathering -----------------------------------------------------------------------------------

def gather(config_path: Path | None, probe: bool = True) -> Context:
    try:
        ctx = Context(cfg=load(config_path))
    except ConfigError as e:
        ctx = Context(cfg=None, config_error=str(e))
    try:
        reply = api.request(ctx.socket_path, {"op": "health", "probe": probe}, timeout=30)
        if reply["ok"]:
            ctx.agent = reply["result"]
        else:
            ctx.agent_error = f"the agent refused the health query: {(reply['error'] or {}).get('msg')}"
    except (OSError, ValueError) as e:
        from sknf.stats import _agent_problem

        ctx.agent_error = _agent_problem(ctx.socket_path, e) if isinstance(e, OSError) else str(e)
    try:
        import nftables

        nft = nftables.Nftables()
        nft.set_json_output(True)
        rc, out, err = nft.cmd("list ruleset")
        if rc != 0:
            raise OSError(err.strip())
        ctx.nft = json.loads(out).get("nftables", []) if out.strip() else []
    except (ImportError, OSError, ValueError) as e:
        ctx.nft_error = str(e)
    from sknf import netlink

    with netlink.route() as ipr:
        ctx.links = {link.get("IFLA_IFNAME"): link for link in ipr.get_links()}
    return ctx


def _sysctl(key: str) -> str | None:
    try:
        return Path("/proc/sys/" + key.replace(".", "/")).read_text().strip()
    except OSError:
        return None


def _run(argv: list[str]) -> subprocess.CompletedProcess | None:
    if shutil.which(argv[0]) is None:
        return None
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def _worst(parts: Iterable[tuple[str, str]]) -> str:
    return max((s for s, _ in parts), key=RANK.__getitem__, default=OK)


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _fill(name: str, used: int, limit: int) -> tuple[str, str]:
    share = used / limit if limit else 0.0
    status = FAIL if share >= FILL_FAIL else WARN if share >= FILL_WARN else OK
    return status, f"{name} {used}/{limit} ({share:.0%})"


# -- the checks ---------------------------------------------------------------------------------------

def check_agent(ctx: Context) -> Finding:
    if ctx.agent is None:
        return Finding("agent", FAIL, f"not answering: {ctx.agent_error}; new pods get no network (running pods "
                       "keep forwarding)", "start the agent (the sknf DaemonSet pod on this node) and read its log")
    mode, reason = ctx.agent["datapath"]["mode"], ctx.agent["datapath"]["reason"]
    configured = ctx.cfg.datapath if ctx.cfg is not None else None
    if mode == "kernel" and reason and configured != "kernel":
        return Finding("agent", WARN, f"running, datapath kernel: the eBPF datapath is unavailable ({reason})",
                       "install BCC and the kernel headers (see docs/install.md), or set datapath: kernel")
    return Finding("agent", OK, f"running, datapath {mode}" + (f" ({reason})" if reason else ""))


def check_bpffs(ctx: Context) -> Finding:
    from sknf.datapath import bpfload, pins
    from sknf.datapath.bpf import MAP_LAYOUTS

    pin_dir = Path(ctx.setting("bpf_pin_dir"))
    mode = ctx.agent["datapath"]["mode"] if ctx.agent else None
    if mode == "kernel" or (mode is None and ctx.setting("datapath") == "kernel"):
        return Finding("bpffs", OK, "not used (kernel datapath)")
    if pins.fs_type(pins.BPFFS) != "bpf":
        return Finding("bpffs", FAIL, f"no bpf filesystem mounted at {pins.BPFFS}: the eBPF datapath cannot pin its "
                       "maps and programs, so a restarted agent cannot find them", f"mount -t bpf bpf {pins.BPFFS} "
                       "(in the DaemonSet: a hostPath volume for /sys/fs/bpf with mountPropagation: Bidirectional)")
    if pins.fs_type(pin_dir) != "bpf":
        return Finding("bpffs", FAIL, f"bpf_pin_dir {pin_dir} is not on a bpf filesystem",
                       f"point bpf_pin_dir under {pins.BPFFS}")
    wanted = [f"prog_{p}" for p in bpfload.PROGRAMS] + list(MAP_LAYOUTS)
    missing = [name for name in wanted if not (pin_dir / name).exists()]
    if missing and mode == "bpf":
        return Finding("bpffs", FAIL, f"pins missing under {pin_dir}: {', '.join(missing)}",
                       "restart the agent (it compiles and pins them again)")
    if missing:
        return Finding("bpffs", OK, f"mounted; nothing pinned under {pin_dir} (no eBPF datapath has run)")
    return Finding("bpffs", OK, f"mounted, {len(wanted)} pins under {pin_dir}")


def iptables_backend(ctx: Context) -> str:
    """The backend sknf's rules are in ("nft" or "legacy"): the running agent's choice, else what an agent
    starting now would detect."""
    if ctx.agent is not None and ctx.agent.get("iptables"):
        return ctx.agent["iptables"]
    from sknf import iptables

    return iptables.detect().mode


def _tool(backend: str, family: int = 4) -> str:
    """The iptables (family 4) or ip6tables (6) binary of a backend."""
    return f"{'ip6tables' if family == 6 else 'iptables'}-{backend}"


def _backend_has_tables(backend: str, ctx: Context, family: int = 4) -> bool:
    """Whether the backend holds any table of the family, read without creating one (listing with
    iptables-legacy would load ip_tables and make a filter table)."""
    if backend == "legacy":
        try:
            return bool(Path(f"/proc/net/ip{'6' if family == 6 else ''}_tables_names").read_text().split())
        except OSError:
            return False
    nft_family = "ip6" if family == 6 else "ip"
    return any("table" in item and item["table"]["family"] == nft_family
               and item["table"]["name"] in IPTABLES_OWN_TABLES for item in ctx.nft or [])


def _tool(backend: str, family: int = 4) -> str:
    """The iptables (family 4) or ip6tables (6) binary of a backend."""
    return f"{'ip6tables' if family == 6 else 'iptables'}-{backend}"


def chain_rules(backend: str, table: str, chain: str, family: int = 4) -> tuple[str | None, list[str]] | None:
    """(policy, rules as -S prints them) of a chain in one backend (and family); None when it cannot be read."""
    proc = _run([_tool(backend, family), "-w", "-t", table, "-S", chain])
    if proc is None or proc.returncode != 0:
        return None
    policy = None
    rules = []
    for line in proc.stdout.splitlines():
        if line.startswith(f"-P {chain} "):
            policy = line.split()[2]
        elif line.startswith("-A "):
            rules.append(line)
    return policy, rules


def _drops(rule: str) -> bool:
    words = rule.split()
    return any(words[i] == "-j" and words[i + 1] in ("DROP", "REJECT") for i in range(len(words) - 1))


POD_DEVICES = (BRIDGE, VXLAN, "+", f"{HOST_VETH_PREFIX}+")


def drops_pod_traffic(rule: str, cluster: ipaddress.IPv4Network | ipaddress.IPv6Network | None) -> bool:
    """A DROP/REJECT rule whose every condition can match pod traffic (-s/-d overlapping the cluster CIDR
    of the rule's family,
    -i/-o a device pod traffic crosses, a protocol, a comment). Anything else (conntrack INVALID, another
    CNI's device, a negation) is taken as not about pods: doctor flags what certainly drops, not what might."""
    try:
        words = shlex.split(rule)[2:]  # after "-A CHAIN"
    except ValueError:
        return False
    if not _drops(rule):
        return False
    i = 0
    while i < len(words):
        word, arg = words[i], words[i + 1] if i + 1 < len(words) else ""
        if word in ("-s", "-d"):
            net = ipaddress.ip_network(arg, strict=False)
            if cluster is not None and (net.version != cluster.version or not net.overlaps(cluster)):
                return False
        elif word in ("-i", "-o"):
            if arg not in POD_DEVICES:
                return False
        elif not ((word == "-m" and arg in ("comment", "tcp", "udp"))
                  or word in ("-p", "--comment", "--dport", "--sport", "-j", "--reject-with")):
            return False
        i += 2
    return True


def _builtin_chains(ctx: Context, chain: str, family: int = 4) -> Iterator[tuple[str, str, list[str]]]:
    """(backend, policy, rules) of a built-in filter chain in each iptables (or ip6tables) backend the node uses."""
    for backend in ("nft", "legacy"):
        if _backend_has_tables(backend, ctx, family) and (got := chain_rules(backend, "filter", chain, family)):
            yield backend, *got


def _families(ctx: Context) -> list[tuple[int, Any]]:
    """(IP version, cluster network) of each family the cluster has; IPv4 with no network when unconfigured."""
    return [(net.version, net) for net in ctx.cfg.cluster_cidrs] if ctx.cfg is not None else [(4, None)]


def check_forward(ctx: Context) -> Finding:
    from sknf.iptables import FORWARD_CHAIN

    ours = iptables_backend(ctx)
    problems: list[tuple[str, str]] = []
    for family, cluster in _families(ctx):
        mine = _tool(ours, family)
        for backend, policy, rules in _builtin_chains(ctx, "FORWARD", family):
            tool = _tool(backend, family)
            if backend == ours:
                jump = next((i for i, r in enumerate(rules) if f"-j {FORWARD_CHAIN}" in r), None)
                ahead = [r for r in rules[:jump] if drops_pod_traffic(r, cluster)]
                problems += [(FAIL, f"`{r}` comes before sknf's jump and drops forwarded traffic") for r in ahead]
                if jump is None and policy == "DROP":
                    problems.append((FAIL, f"FORWARD policy DROP in {tool} and no jump to {FORWARD_CHAIN}"))
            else:
                if policy == "DROP":
                    problems.append((FAIL, f"FORWARD policy DROP in {tool}, where sknf's rules are not "
                                           f"(sknf uses {mine}): every forwarded pod packet is dropped"))
                problems += [(FAIL, f"`{r}` in {tool} (not sknf's backend) drops forwarded traffic")
                             for r in rules if drops_pod_traffic(r, cluster)]
    clusters = [net for _, net in _families(ctx) if net is not None]
    for chain in _nft_base_chains(ctx, "forward"):
        about_pods = bool(clusters) and any(_chain_mentions(ctx, chain, str(net.network_address)) for net in clusters)
        if _nft_drops_by_default(ctx, chain) and not about_pods:
            problems.append((FAIL, f"nft chain {chain['family']} {chain['table']} {chain['name']} (hook forward) "
                                   "drops by default and no rule is about the cluster CIDR: forwarded pod traffic "
                                   "is dropped"))
    if not problems:
        return Finding("forward", OK, f"nothing drops forwarded pod traffic ahead of sknf (iptables-{ours})")
    return Finding("forward", _worst(problems), "; ".join(m for _, m in problems),
                   "the node mixes firewall backends or has a firewall of its own: set the FORWARD policy to "
                   "ACCEPT in the other backend (e.g. iptables-legacy -P FORWARD ACCEPT, ip6tables-legacy for "
                   "IPv6) or accept the cluster CIDR there, and remove DROP/REJECT rules ahead of sknf's")


def _nft_base_chains(ctx: Context, hook: str) -> list[dict]:
    out = []
    for item in ctx.nft or []:
        chain = item.get("chain")
        if not chain or chain.get("hook") != hook:
            continue
        if chain["family"] == "ip" and chain["table"] in IPTABLES_OWN_TABLES:
            continue  # iptables-nft's own tables: read through iptables, as rules sknf can compare with
        if (chain["family"], chain["table"]) in ((guard.FAMILY, guard.TABLE), (policy_nft.FAMILY, policy_nft.TABLE)):
            continue  # sknf's own: pod source validation (`sknf-rules` checks it is there), NetworkPolicy
        out.append(chain)
    return out


def _chain_rules(ctx: Context, chain: dict) -> list[dict]:
    return [item["rule"] for item in ctx.nft or [] if "rule" in item and item["rule"]["family"] == chain["family"]
            and item["rule"]["table"] == chain["table"] and item["rule"]["chain"] == chain["name"]]


TERMINAL_ONLY = {"counter", "log", "limit", "drop", "reject"}


def _nft_drops_by_default(ctx: Context, chain: dict) -> bool:
    """Policy drop, or a last rule that drops or rejects whatever reaches it (firewalld's style)."""
    if chain.get("policy") == "drop":
        return True
    rules = _chain_rules(ctx, chain)
    last = rules[-1]["expr"] if rules else []
    return bool(last) and all(set(e) <= TERMINAL_ONLY for e in last) and any("drop" in e or "reject" in e
                                                                            for e in last)


def _chain_mentions(ctx: Context, chain: dict, needle: Any) -> bool:
    text = json.dumps(needle)
    return any(text in json.dumps(rule["expr"]) for rule in _chain_rules(ctx, chain))


def _matches_port(expr: list[dict], port: int) -> bool:
    for e in expr:
        match = e.get("match")
        left = (match or {}).get("left", {}).get("payload", {})
        if left.get("field") != "dport" or left.get("protocol") not in ("udp", "th"):
            continue
        right = match.get("right")
        if right == port or (isinstance(right, dict) and port in right.get("set", [])):
            return True
        if isinstance(right, dict) and "range" in right and right["range"][0] <= port <= right["range"][1]:
            return True
    return False


def check_vxlan_port(ctx: Context) -> Finding:
    from sknf import netlink

    port = ctx.setting("vxlan_port")
    vni = ctx.setting("vxlan_vni")
    problems: list[tuple[str, str]] = []
    for name, link in ctx.links.items():
        data = (link.get("IFLA_LINKINFO") or {}).get("IFLA_INFO_DATA") or {}
        if name != VXLAN and netlink.link_kind(link) == "vxlan" and data.get("IFLA_VXLAN_PORT") == port:
            same = data.get("IFLA_VXLAN_ID") == vni
            problems.append((FAIL if same else WARN, f"device {name} also uses UDP {port}"
                             + (f" with VNI {vni}: vxsknf cannot take it" if same else
                                f" (VNI {data.get('IFLA_VXLAN_ID')}): it shares sknf's socket")))
    for chain in _nft_base_chains(ctx, "input") + _nft_base_chains(ctx, "prerouting"):
        where = f"nft chain {chain['family']} {chain['table']} {chain['name']}"
        for rule in _chain_rules(ctx, chain):
            if _matches_port(rule["expr"], port) and any("drop" in e or "reject" in e for e in rule["expr"]):
                problems.append((FAIL, f"{where} drops UDP {port} (handle {rule.get('handle')}): VXLAN from the "
                                       "other nodes never reaches vxsknf"))
        if chain.get("hook") == "input" and _nft_drops_by_default(ctx, chain) and not _chain_mentions(ctx, chain, port):
            problems.append((WARN, f"{where} drops by default and has no rule for UDP {port}"))
    family = ctx.cfg.underlay_family if ctx.cfg is not None else 4  # VXLAN arrives in the underlay's family
    for backend, policy, rules in _builtin_chains(ctx, "INPUT", family):
        for r in rules:
            if f"--dport {port}" in r and _drops(r) and "--comment sknf" not in r:
                problems.append((FAIL, f"`{r}` ({_tool(backend, family)}) drops VXLAN from the other nodes"))
        if policy == "DROP" and not any(f"--dport {port}" in r for r in rules):
            problems.append((WARN, f"INPUT policy DROP in {_tool(backend, family)} and no rule for UDP {port}"))
    if ctx.nft_error is not None:
        problems.append((WARN, f"the nftables ruleset was not read ({ctx.nft_error}): native nft rules unchecked"))
    if not problems:
        return Finding("vxlan-port", OK, f"UDP {port} is sknf's and nothing here drops it")
    return Finding("vxlan-port", _worst(problems), "; ".join(m for _, m in problems),
                   f"accept UDP {port} from the other nodes' addresses (delete the rule shown, e.g. nft delete rule "
                   "FAMILY TABLE CHAIN handle N), and delete other VXLAN devices on that port")


def check_sknf_rules(ctx: Context) -> Finding:
    from sknf.iptables import COMMENT, FORWARD_CHAIN, INPUT_CHAIN, JUMPS, NAT_CHAIN, host

    assert ctx.cfg is not None
    ours = iptables_backend(ctx)
    missing = []
    underlay = ctx.cfg.underlay_family
    for family in (4, 6):  # where overlay.ensure_rules puts them: the cluster's families, and the underlay's
        net = ctx.cfg.cidr(family)
        cidr, tool = str(net), _tool(ours, family)
        v6 = "ip6tables " if family == 6 else ""  # what is missing where, when both families have rules
        for table, parent, chain in JUMPS:
            if (chain in (FORWARD_CHAIN, NAT_CHAIN) and net is None) or (
                    chain not in (FORWARD_CHAIN, NAT_CHAIN) and family != underlay):
                continue
            got = chain_rules(ours, table, chain, family)
            if got is None:
                missing.append(f"{v6}{table}/{chain} (chain)")
                continue
            rules = got[1]
            if chain == FORWARD_CHAIN and not any(f"-s {cidr}" in r and "ACCEPT" in r for r in rules):
                missing.append(f"{v6}{table}/{chain}: accept of {cidr}")
            if chain == NAT_CHAIN and ctx.cfg.masquerade and not any("MASQUERADE" in r for r in rules):
                missing.append(f"{v6}{table}/{chain}: masquerade of {cidr}")
            if chain == INPUT_CHAIN:
                missing += [f"{v6}{table}/{chain}: VXLAN from {p['name']} ({p['underlay_ip']}) is dropped"
                            for p in ctx.others()
                            if not any(f"-s {host(p['underlay_ip'])}" in r and "RETURN" in r for r in rules)]
            check = _run([tool, "-w", "-t", table, "-C", parent, *COMMENT, "-j", chain])
            if check is not None and check.returncode != 0:
                missing.append(f"{v6}{table}/{parent}: jump to {chain}")
    mode = ctx.agent["datapath"]["mode"] if ctx.agent else None
    if mode == "kernel" and ctx.nft is not None and not any(
            item.get("table", {}).get("family") == guard.FAMILY and item["table"].get("name") == guard.TABLE
            for item in ctx.nft):
        missing.append(f"nft table {guard.FAMILY} {guard.TABLE} (pod source validation)")
    if missing:
        return Finding("sknf-rules", FAIL, f"missing in iptables-{ours}: {', '.join(missing)}: pods lose "
                       "forwarding, Internet access, overlay peers or source validation",
                       "the agent restores them within reconcile_interval; if it runs and they stay missing, "
                       "something removes them (read the agent's log)")
    return Finding("sknf-rules", OK, f"forward, {'masquerade' if ctx.cfg.masquerade else 'no-masquerade'}, "
                   f"VXLAN-from-peers{' and source validation' if mode == 'kernel' else ''} rules in place "
                   f"({', '.join(_tool(ours, f) for f in sorted({*ctx.cfg.families, underlay}))})")


def check_sysctls(ctx: Context) -> Finding:
    problems: list[tuple[str, str]] = []
    if _sysctl("net.ipv4.ip_forward") != "1":
        problems.append((FAIL, "net.ipv4.ip_forward is not 1: the node forwards nothing"))
    bridged = _sysctl("net.bridge.bridge-nf-call-iptables")
    if bridged is None:
        problems.append((FAIL, "br_netfilter is not loaded (no net.bridge.bridge-nf-call-iptables): Service NAT "
                               "misses bridged pod traffic"))
    elif bridged != "1":
        problems.append((FAIL, "net.bridge.bridge-nf-call-iptables is not 1: replies from a same-node Service "
                               "backend reach the client un-NATed"))
    all_rp = int(_sysctl("net.ipv4.conf.all.rp_filter") or 0)
    for dev in (BRIDGE, VXLAN):
        value = _sysctl(f"net.ipv4.conf.{dev}.rp_filter")
        if value is not None and max(all_rp, int(value)) == 1:
            problems.append((FAIL, f"strict rp_filter on {dev} (all={all_rp}, {dev}={value}): replies that come "
                                   "back over another interface are dropped"))
    for dev in (BRIDGE, VXLAN):  # set in every cluster (overlay.IPV6_SYSCTLS); absent where IPv6 is off
        if (value := _sysctl(f"net.ipv6.conf.{dev}.accept_ra")) not in (None, "0"):
            problems.append((FAIL, f"{dev} accepts router advertisements (accept_ra={value}): a pod's RA could "
                                   "give the node a route"))
    dual = ctx.cfg is not None and 6 in ctx.cfg.families
    if dual:
        if _sysctl("net.ipv6.conf.all.forwarding") != "1":
            problems.append((FAIL, "net.ipv6.conf.all.forwarding is not 1: the node forwards no pod IPv6"))
        if _sysctl("net.bridge.bridge-nf-call-ip6tables") not in (None, "1"):  # no br_netfilter: said above
            problems.append((FAIL, "net.bridge.bridge-nf-call-ip6tables is not 1: replies from a same-node IPv6 "
                                   "Service backend reach the client un-NATed"))
    if not problems:
        return Finding("sysctls", OK, "ip_forward, bridge-nf-call-iptables, loose rp_filter, no RAs on the overlay"
                       + (", IPv6 forwarding, bridge-nf-call-ip6tables" if dual else ""))
    return Finding("sysctls", _worst(problems), "; ".join(m for _, m in problems),
                   "the agent sets these every reconcile; `modprobe br_netfilter` (and list it in "
                   "/etc/modules-load.d/), and make sure no other tool (sysctl.d, a hardening profile) resets them")


def check_mtu(ctx: Context) -> Finding:
    from sknf import netlink, overlay

    assert ctx.cfg is not None
    try:
        _, _, underlay_mtu = overlay.underlay(ctx.cfg)
    except overlay.OverlayError as e:
        return Finding("mtu", FAIL, str(e), "set host_physical_if to the interface between the nodes")
    overhead = ctx.cfg.vxlan_overhead  # 50 over IPv4, 70 over IPv6
    want = ctx.cfg.mtu or underlay_mtu - overhead
    problems: list[tuple[str, str]] = []
    if want > underlay_mtu - overhead:
        problems.append((FAIL, f"mtu {want} needs an underlay MTU of {want + overhead} (VXLAN over "
                               f"IPv{ctx.cfg.underlay_family}), it is {underlay_mtu}: full-size pod packets are "
                               "dropped"))
    wrong = {name: link.get("IFLA_MTU") for name, link in ctx.links.items()
             if (name in (BRIDGE, VXLAN) or (name.startswith(HOST_VETH_PREFIX) and netlink.link_kind(link) == "veth"))
             and link.get("IFLA_MTU") != want}
    if wrong:
        problems.append((FAIL, "MTU differs from the overlay's " + str(want) + ": "
                         + ", ".join(f"{n} {m}" for n, m in sorted(wrong.items()))))
    published = [p for p in ctx.others() if p.get("mtu")]
    differ = [p for p in published if p["mtu"] != want]
    if differ:
        problems.append((FAIL, f"this node uses MTU {want}; " + ", ".join(f"{p['name']} publishes {p['mtu']}"
                                                                           for p in differ)
                         + ": packets larger than the smaller one are dropped between their pods"))
    if problems:
        return Finding("mtu", _worst(problems), "; ".join(m for _, m in problems),
                       "give every node the same underlay MTU (or the same `mtu` setting), then restart the agents")
    unknown = len(ctx.others()) - len(published)
    return Finding("mtu", OK, f"pods, {VXLAN} and {BRIDGE} at {want} (underlay {underlay_mtu}, IPv"
                   f"{ctx.cfg.underlay_family}); "
                   f"{_n(len(published), 'peer')} publish the same" + (f", {unknown} publish none" if unknown else ""))


def _conf_type(path: Path) -> str:
    try:
        doc = json.loads(path.read_text())
        return (doc.get("plugins") or [doc])[0].get("type", "?")
    except (OSError, ValueError, AttributeError, IndexError):
        return "unreadable"


def check_cni_config(ctx: Context) -> Finding:
    conf_dir = Path(ctx.setting("cni_conf_dir"))
    ours = ctx.setting("cni_conf_name")
    try:
        files = sorted(p.name for p in conf_dir.iterdir() if p.suffix in (".conf", ".conflist", ".json"))
    except OSError as e:
        return Finding("cni-config", FAIL, f"{conf_dir}: {e.strerror}", "create the directory, or fix cni_conf_dir")
    if ours not in files:
        status = FAIL if ctx.setting("install_cni") else WARN
        return Finding("cni-config", status, f"no {ours} in {conf_dir}: kubelet keeps the node NotReady",
                       "the agent writes it once it is ready (install_cni: true), or run `sknf install-cni`")
    if files[0] != ours:
        first = conf_dir / files[0]
        return Finding("cni-config", FAIL, f"{first} (type {_conf_type(first)}) sorts before {ours}: the runtime uses "
                       "the first file, so new pods get that network instead of sknf's",
                       f"remove {first} (a previous CNI's leftover) or rename sknf's conflist to sort first")
    return Finding("cni-config", OK, f"{ours} is the first of {len(files)} in {conf_dir}")


def _addresses_and_routes(index: int) -> tuple[int, int]:
    from sknf import netlink

    with netlink.route() as ipr:
        return len(ipr.get_addr(family=2, index=index)), len(ipr.get_routes(family=2, oif=index, table=254))


def check_leftovers(ctx: Context) -> Finding:
    found = []
    for name, link in sorted(ctx.links.items()):
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in LEFTOVER_DEVICES):
            found.append(name)
        elif name == "tunl0":
            addrs, routes = _addresses_and_routes(link["index"])
            if addrs or routes:
                found.append(f"tunl0 ({addrs} addresses, {routes} routes)")
    if found:
        return Finding("leftovers", WARN, f"devices of another CNI: {', '.join(found)}",
                       "once that CNI is uninstalled, delete them (ip link del NAME) and their routes")
    return Finding("leftovers", OK, "no other CNI's devices")


def check_routes(ctx: Context) -> Finding:
    from sknf import netlink, overlay

    assert ctx.cfg is not None
    clusters = ",".join(map(str, ctx.cfg.cluster_cidrs))
    bridge = ctx.links.get(BRIDGE)
    names = {link["index"]: name for name, link in ctx.links.items()}
    shadows = []
    with netlink.route() as ipr:
        for cluster in ctx.cfg.cluster_cidrs:
            for r in ipr.route("dump", family=netlink.AF[cluster.version]):  # every table (table=0 matches none)
                table = r.get("RTA_TABLE")
                if table in (255, overlay.PEER_ROUTE_TABLE) or r.get("RTA_DST") is None:
                    continue
                dst = ipaddress.ip_network(f"{r.get('RTA_DST')}/{r['dst_len']}")
                oif = r.get("RTA_OIF")
                if dst.subnet_of(cluster) and (bridge is None or oif != bridge["index"]):
                    dev = names.get(oif, "no device")
                    shadows.append(f"{dst} dev {dev} (table {'main' if table == 254 else table})")
    if shadows:
        return Finding("routes", FAIL, f"routes inside the cluster CIDR {clusters} that shadow {BRIDGE}: "
                       f"{', '.join(shadows)}; traffic for those pods goes there",
                       "delete them (ip route del DESTINATION), and the device of the CNI that made them")
    return Finding("routes", OK, f"nothing inside {clusters} is routed past {BRIDGE}")


def check_overlay(ctx: Context) -> Finding:
    from sknf import netlink

    assert ctx.cfg is not None
    problems = []
    bridge, vx = ctx.links.get(BRIDGE), ctx.links.get(VXLAN)
    for name, link in ((BRIDGE, bridge), (VXLAN, vx)):
        if link is None:
            problems.append(f"{name} is missing")
        elif link.get("state") != "up":
            problems.append(f"{name} is down")
    if vx is not None and bridge is not None:
        data = (vx.get("IFLA_LINKINFO") or {}).get("IFLA_INFO_DATA") or {}
        if vx.get("IFLA_MASTER") != bridge["index"]:
            problems.append(f"{VXLAN} is not a port of {BRIDGE}")
        if (data.get("IFLA_VXLAN_ID"), data.get("IFLA_VXLAN_PORT")) != (ctx.cfg.vxlan_vni, ctx.cfg.vxlan_port):
            problems.append(f"{VXLAN} has VNI {data.get('IFLA_VXLAN_ID')} port {data.get('IFLA_VXLAN_PORT')}, "
                            f"configured {ctx.cfg.vxlan_vni}/{ctx.cfg.vxlan_port}")
        local = data.get("IFLA_VXLAN_LOCAL6") or data.get("IFLA_VXLAN_LOCAL")
        family = ctx.cfg.underlay_family
        if local is None or ipaddress.ip_address(local).version != family:
            problems.append(f"{VXLAN} runs over {local or 'no local address'}, not the IPv{family} underlay "
                            f"(underlay_family {family})")
        with netlink.route() as ipr:
            flood = {str(ipaddress.ip_address(ip)) for ip in netlink.flood_entries(ipr, vx["index"])}
        wanted = {str(ipaddress.ip_address(p["underlay_ip"])) for p in ctx.others()}
        if ctx.peers() is not None and flood != wanted:
            problems.append(f"flood list differs from the peers: missing {sorted(wanted - flood) or 'none'}, "
                            f"extra {sorted(flood - wanted) or 'none'}")
    if problems:
        return Finding("overlay", FAIL, "; ".join(problems) + ": pods cannot reach other nodes' pods",
                       "the agent rebuilds the overlay every reconcile_interval: start it or read its log")
    return Finding("overlay", OK, f"{BRIDGE} and {VXLAN} up (VXLAN over IPv{ctx.cfg.underlay_family}), "
                   f"{_n(len(ctx.others()), 'peer')} in the flood list")


def _pinned_flow_table(ctx: Context) -> dict[str, Any] | None:
    """With the agent down: the learned-flow map as its pins hold it (None without BPF pins)."""
    from sknf.datapath import bpfmaps
    from sknf.datapath.bpf import read_pinned_flow_table

    try:
        return dataclasses.asdict(read_pinned_flow_table(ctx.setting("bpf_pin_dir")))
    except (OSError, bpfmaps.LayoutMismatch):
        return None


def check_capacity(ctx: Context) -> Finding:
    from sknf import netlink

    parts: list[tuple[str, str]] = []
    ipam = ctx.agent["ipam"] if ctx.agent else None
    if ipam is None and ctx.cfg is not None:
        from sknf.ipam import CorruptStore, Store

        try:
            store = Store.open_existing(ctx.cfg.state_dir)
            ipam = {"allocated": store.allocated, "capacity": store.capacity}
        except (OSError, ValueError, CorruptStore):
            ipam = None
    if ipam is not None:
        parts.append(_fill("IPAM", ipam["allocated"], ipam["capacity"]))
    if (ft := ctx.agent.get("flows") if ctx.agent else _pinned_flow_table(ctx)) is not None:
        parts.append(_fill("flow map", ft["entries"], ft["capacity"]))
        if ft["full"]:
            parts.append((WARN, f"the learned-flow map is full ({ft['failed_learns']} learns refused): pod traffic "
                                "takes the kernel path until the agent's sweep makes room"))
    count, limit = _sysctl("net.netfilter.nf_conntrack_count"), _sysctl("net.netfilter.nf_conntrack_max")
    if count is not None and limit is not None:
        parts.append(_fill("conntrack", int(count), int(limit)))
    thresh = _sysctl("net.ipv4.neigh.default.gc_thresh3")
    with netlink.route() as ipr:
        neighbours = len(ipr.get_neighbours(family=2))
    if thresh is not None:
        parts.append(_fill("neighbours", neighbours, int(thresh)))
    else:
        parts.append((OK, f"neighbours {neighbours} (limit machine-wide, not visible in this namespace)"))
    status = _worst(parts)
    return Finding("capacity", status, ", ".join(m for _, m in parts),
                   "" if status == OK else "IPAM: a larger node subnet or fewer pods; conntrack: raise "
                   "net.netfilter.nf_conntrack_max; neighbours: raise net.ipv4.neigh.default.gc_thresh1/2/3; "
                   "flow map: raise flow_map_capacity (or nf_conntrack_max, its default)")


def check_peers(ctx: Context) -> Finding:
    from sknf import netlink

    peers = ctx.peers()
    if peers is None:
        return Finding("peers", WARN, "peer list unknown: the agent is down and no peers file is configured",
                       "start the agent")
    own = ctx.agent.get("underlay_ip") if ctx.agent else None
    problems: list[tuple[str, str]] = []
    cidrs: dict[str, str] = {}
    for p in peers:
        if p.get("pod_cidr"):
            if p["pod_cidr"] in cidrs:
                problems.append((FAIL, f"{cidrs[p['pod_cidr']]} and {p['name']} both have pod subnet {p['pod_cidr']}"))
            cidrs[p["pod_cidr"]] = p["name"]
    for name in ctx.agent.get("unaddressed", []) if ctx.agent else []:
        problems.append((FAIL, f"{name}: its Node has no InternalIP and no valid sknf.io/underlay-ip, so it is not "
                               "a peer: its pods are unreachable from here"))
    clusters = ctx.cfg.cluster_cidrs if ctx.cfg is not None else ()
    with netlink.route() as ipr:
        for p in ctx.others():
            ip = ipaddress.ip_address(p["underlay_ip"])
            family = ctx.cfg.underlay_family if ctx.cfg is not None else ip.version
            if ip.version != family:
                problems.append((FAIL, f"{p['name']}: underlay address {ip} is not IPv{family} (underlay_family)"))
            elif ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local:
                problems.append((FAIL, f"{p['name']}: underlay address {ip} is not usable"))
            elif p["underlay_ip"] == own:
                problems.append((FAIL, f"{p['name']}: has this node's own underlay address {ip}"))
            elif any(ip.version == net.version and ip in net for net in clusters):
                problems.append((FAIL, f"{p['name']}: underlay address {ip} lies inside the cluster CIDR"))
            else:
                try:
                    ipr.route("get", dst=str(ip))
                except Exception:  # NetlinkError ENETUNREACH: no route at all
                    problems.append((FAIL, f"{p['name']}: no route to its underlay address {ip}"))
            if not p.get("pod_cidr"):
                problems.append((WARN, f"{p['name']}: no pod subnet known (its node address is not reached "
                                       "through the overlay yet)"))
    if problems:
        return Finding("peers", _worst(problems), "; ".join(m for _, m in problems),
                       "fix the peers file entry, or the Node's InternalIP / sknf.io/underlay-ip annotation")
    return Finding("peers", OK, f"{_n(len(ctx.others()), 'peer')}, each with a usable underlay address")


def check_pod_subnet(ctx: Context) -> Finding:
    name = ctx.node_name
    used = ctx.agent["pod_cidr"] if ctx.agent else None
    if used is None and ctx.cfg is not None:
        from sknf.ipam import CorruptStore, Store

        try:
            used = ",".join(map(str, Store.open_existing(ctx.cfg.state_dir).pod_cidrs))
        except (OSError, ValueError, CorruptStore):
            used = None
    peers = ctx.peers()
    source = "its Node object" if ctx.setting("peer_source") == "kubernetes" else "the peers file"
    if used is None or peers is None:
        return Finding("pod-subnet", WARN, "cannot compare: the agent is down and the subnet in use is unknown",
                       "start the agent")
    own = next((p for p in peers if p["name"] == name), None)
    if own is None:
        return Finding("pod-subnet", WARN, f"{name} is not in {source}: other nodes do not know its pods",
                       f"add it to {source} (name = this node's node_name)")
    if own.get("pod_cidr") and own["pod_cidr"] != used:
        return Finding("pod-subnet", FAIL, f"this node uses {used}, {source} says {own['pod_cidr']}: other nodes "
                       "send this node's pods' traffic to the wrong place", "make them agree (the agent takes the "
                       "Node's spec.podCIDR at start: restart it after the pods on the old subnet are gone)")
    gateways = [str(ipaddress.ip_network(net).network_address + 1) for net in used.split(",")]  # each family's
    bridge = ctx.links.get(BRIDGE)
    if bridge is not None:
        from sknf import netlink

        with netlink.route() as ipr:
            addrs = {a.get("IFA_ADDRESS") for a in ipr.get_addr(index=bridge["index"])}
        if missing := [gw for gw in gateways if gw not in addrs]:
            return Finding("pod-subnet", FAIL, f"{BRIDGE} lacks the gateway {', '.join(missing)} of {used}",
                           "the agent sets it every reconcile: start it")
    return Finding("pod-subnet", OK, f"{used}, as in {source}")


def check_peer_health(ctx: Context) -> Finding:
    assert ctx.agent is not None
    probes = ctx.agent["probes"]
    port = ctx.setting("vxlan_port")
    problems: list[tuple[str, str]] = []
    pending = filtered = reachable = 0
    for p in probes["peers"]:
        state = p["state"]
        if state == "underlay":
            problems.append((FAIL, f"{p['name']} ({p['underlay']['address']}) answers on neither path: the node is "
                                   "down or the network between the nodes drops it"))
        elif state == "overlay":
            problems.append((FAIL, f"{p['name']}: its underlay {p['underlay']['address']} answers but its overlay "
                                   f"gateway {p['overlay']['address']} does not: UDP {port} is blocked between the "
                                   f"nodes, or {p['name']}'s {VXLAN} is down"))
        elif state == "pending":
            pending += 1
        elif state == "icmp-filtered":
            filtered += 1
        else:
            reachable += 1
    when = "probed now" if probes["fresh"] else f"last cycle (every {probes['cycle_seconds']:.0f} s)"
    if problems:
        return Finding("peer-health", FAIL, f"{len(problems)} of {len(probes['peers'])} peers unreachable ({when}): "
                       + "; ".join(m for _, m in problems),
                       f"overlay at fault: allow UDP {port} between the nodes' underlay addresses (security groups, "
                       "host firewalls) and check the peer's vxsknf with its own `sknf doctor`; underlay at fault: "
                       "check that node and the network")
    rtts = sorted(p["overlay"]["rtt"] for p in probes["peers"] if p.get("overlay") and p["overlay"]["ok"])
    notes = [f"{reachable + filtered}/{len(probes['peers'])} peers reachable ({when})"]
    if rtts:
        notes.append(f"overlay RTT median {rtts[len(rtts) // 2] * 1000:.2f} ms, max {rtts[-1] * 1000:.2f} ms")
    if filtered:
        notes.append(f"{filtered} ignore pings on the underlay but their overlay works")
    if pending:
        notes.append(f"{pending} not probed yet")
    return Finding("peer-health", OK, ", ".join(notes))


Check = Callable[[Context], Finding]
# (name, function, what it needs beyond the kernel: "config", "agent" or nothing)
CHECKS: list[tuple[str, Check, str | None]] = [
    ("agent", check_agent, None),
    ("bpffs", check_bpffs, None),
    ("forward", check_forward, None),
    ("sknf-rules", check_sknf_rules, "config"),
    ("vxlan-port", check_vxlan_port, None),
    ("sysctls", check_sysctls, None),
    ("mtu", check_mtu, "config"),
    ("cni-config", check_cni_config, None),
    ("leftovers", check_leftovers, None),
    ("routes", check_routes, "config"),
    ("overlay", check_overlay, "config"),
    ("capacity", check_capacity, None),
    ("peers", check_peers, None),
    ("pod-subnet", check_pod_subnet, None),
    ("peer-health", check_peer_health, "agent"),
]


def diagnose(ctx: Context) -> list[Finding]:
    findings = []
    skipped = {"config": [n for n, _, need in CHECKS if need == "config" and ctx.cfg is None],
               "agent": [n for n, _, need in CHECKS if need == "agent" and ctx.agent is None]}
    if ctx.cfg is None:
        findings.append(Finding("config", FAIL, f"cannot load the agent's configuration: {ctx.config_error}; "
                                f"skipped: {', '.join(skipped['config'])}",
                                "pass the agent's config file (-c FILE) or its environment "
                                "(SKNF_NODE_NAME, SKNF_CLUSTER_CIDR)"))
    else:
        findings.append(Finding("config", OK, f"node {ctx.cfg.node_name}, cluster {ctx.cfg.cluster_cidr}, peers from "
                                f"{ctx.cfg.peer_source}"))
    for name, check, need in CHECKS:
        if (need == "config" and ctx.cfg is None) or (need == "agent" and ctx.agent is None):
            continue
        try:
            finding = check(ctx)
        except Exception as e:  # one broken probe must not hide the other checks
            finding = Finding(name, FAIL, f"the check itself failed: {type(e).__name__}: {e}")
        if name == "agent" and skipped["agent"]:
            finding.message += f"; skipped: {', '.join(skipped['agent'])}"
        findings.append(finding)
    return findings


def overall(findings: list[Finding]) -> str:
    return _worst((f.status, "") for f in findings)


def render(findings: list[Finding], out=sys.stdout) -> None:
    width = max(len(f.check) for f in findings)
    for f in findings:
        print(f"{f.status:<4}  {f.check:<{width}}  {f.message}", file=out)
        if f.fix and f.status != OK:
            print(f"{'':<4}  {'':<{width}}  fix: {f.fix}", file=out)
    status = overall(findings)
    counts = {s: sum(f.status == s for f in findings) for s in (OK, WARN, FAIL)}
    print(f"{status}: {counts[OK]} ok, {counts[WARN]} warnings, {counts[FAIL]} failures", file=out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, help="the agent's YAML settings (environment variables override)")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table")
    parser.add_argument("--no-probe", action="store_true",
                        help="use the agent's last probe cycle instead of probing the peers now")


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("sknf doctor: needs root (it reads iptables, nftables and the agent's socket)", file=sys.stderr)
        return 1
    findings = diagnose(gather(args.config, probe=not args.no_probe))
    status = overall(findings)
    if args.output == "json":
        json.dump({"version": 1, "status": status, "exit_code": EXIT[status],
                   "checks": [dataclasses.asdict(f) for f in findings]}, sys.stdout, indent=1)
        print()
    else:
        render(findings)
    return EXIT[status]
