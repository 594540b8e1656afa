"""`sknf stats`: per-pod traffic on this node, as a table (or JSON/YAML), once or refreshed in place.

Where the figures come from, in order:
1. the running agent, over its unix socket ({"op": "stats"}): the agent ticks a `Sampler` every second
   or two, so even a one-shot call shows current rates;
2. the agent is down: the kernel still counts, so read the BPF datapath's pinned maps in place (no
   compiling, see sknf.datapath.bpfmaps) or, on a kernel-datapath node, the host veths' link
   statistics, and take pod identities from the IPAM store on disk; rates then need two samples
   (`--watch`);
3. neither works: say what is wrong (no socket, not root, no state) and exit 1.

The agent-up path imports no pyroute2, bcc or kubernetes (each costs ~0.3 s): `kubectl exec ... sknf
stats` and `--watch` stay fast with thousands of pods.

Reply of {"op": "stats"} (also what `-o json` prints, after filtering and sorting):
    {"version": 2, "node": str, "source": "agent" | "bpf-pins" | "kernel-links",
     "datapath": {"mode": "bpf" | "kernel", "reason": str},
     "time": unix seconds, "rate_interval": seconds the rates span, or null,
     "ipam": {"allocated": int, "capacity": int or null}, "overlay_peers": int or null,
     "pods": [{"namespace", "pod", "container_id", "ip" (the first), "ips" (every family's: IPv4 first),
               "host_ifname",
               "rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "drops",
               "fast_packets", "kernel_packets" (null in kernel mode),
               "refused" ({reason: frames source validation dropped}, see sknf.datapath.REFUSED_REASONS, and
                           "policy": frames NetworkPolicy dropped, when any),
               "policies" ({"ingress"/"egress": [namespace/name of each NetworkPolicy selecting the pod]};
                           only from a running agent that enforces NetworkPolicy),
               "rx_bytes_rate", "tx_bytes_rate", "rx_packets_rate", "tx_packets_rate" (per second, or null)}]}
rx is what the pod received, tx what it sent (the pod's view, as in PodCounters). Version 2 added "ips"
(dual-stack); version 1 replies (an older agent) have "ip" only.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fnmatch
import json
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from ipaddress import ip_address
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sknf import api
from sknf.config import Config, ConfigError, Network, load
from sknf.datapath import PodCounters
from sknf.ipam import Store
from sknf.peers import PeersFileError, StaticPeerSource, pod_subnets

if TYPE_CHECKING:
    from sknf.metrics import Snapshot  # imports prometheus_client: only the agent needs it

log = logging.getLogger(__name__)

REPLY_VERSION = 2
RATED = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")
MIN_RATE_SPAN = 1.0  # seconds: a shorter span gives jumpy rates
SORTS = ("rate", "rx", "tx", "rx-rate", "tx-rate", "packets", "drops", "fast", "name", "namespace", "ip")
OUTPUTS = ("table", "wide", "json", "yaml")


def pod_rows(snap: Snapshot, refused_only: bool = False) -> list[dict[str, Any]]:
    """One reply row per pod, rates not yet filled in; refused_only: just the pods refused anything
    (all the refusal log needs: the sampler's tick then builds a handful of rows, not one per pod)."""
    rows = []
    for ident, counted in snap.pods:
        if refused_only and not (counted and any(counted.refused.values())):
            continue
        c = counted or PodCounters()
        rows.append({
            "namespace": ident.namespace, "pod": ident.pod, "container_id": ident.container_id,
            "ip": str(ident.ip), "ips": [str(ip) for ip in ident.ips], "host_ifname": ident.host_ifname,
            "rx_bytes": c.rx_bytes, "tx_bytes": c.tx_bytes, "rx_packets": c.rx_packets,
            "tx_packets": c.tx_packets, "drops": c.drops,
            "fast_packets": c.fast_packets, "kernel_packets": c.kernel_packets,
            "refused": dict(c.refused),
        })
    return rows


def _key(row: dict[str, Any]) -> tuple[str, str]:
    return row["container_id"], row["host_ifname"]


def add_rates(rows: list[dict[str, Any]], base: list[dict[str, Any]] | None, seconds: float | None) -> None:
    """Fill the *_rate fields from an earlier sample; null where unknown (new pod, counter went back)."""
    before = {_key(r): r for r in base or ()}
    for row in rows:
        old = before.get(_key(row)) if seconds else None
        for name in RATED:
            delta = row[name] - old[name] if old else -1
            row[f"{name}_rate"] = delta / seconds if old and seconds and delta >= 0 else None


def make_reply(snap: Snapshot, rows: list[dict[str, Any]], rate_interval: float | None,
               source: str) -> dict[str, Any]:
    return {
        "version": REPLY_VERSION, "node": snap.node, "source": source,
        "datapath": {"mode": snap.datapath_mode, "reason": snap.datapath_reason},
        "time": snap.taken, "rate_interval": rate_interval,
        "ipam": {"allocated": snap.ipam_allocated, "capacity": snap.ipam_capacity},
        "overlay_peers": snap.peers, "pods": rows,
        "flows": dataclasses.asdict(snap.flows) if snap.flows is not None else None,
    }


class RefusalLog:
    """The agent's log line for refused frames (spoofing attempts), from the counters' deltas.

    At most one line per pod and reason each `interval` seconds, however fast a pod spoofs; a line
    sums everything refused since the last one. The first sample after start is the baseline (a
    restarted agent does not re-report old drops); a pod that is gone (or, fed only the refused pods,
    refused nothing: its counters were reset) is forgotten.
    """

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._seen: dict[tuple[tuple[str, str], str], int] = {}
        self._pending: dict[tuple[tuple[str, str], str], int] = {}
        self._logged: dict[tuple[tuple[str, str], str], float] = {}
        self._started = False

    def observe(self, rows: list[dict[str, Any]], now: float) -> list[str]:
        """Feed one sample; returns (and logs) the lines due."""
        seen: dict[tuple[tuple[str, str], str], int] = {}
        lines = []
        for row in rows:
            for reason, count in row.get("refused", {}).items():
                k = (_key(row), reason)
                seen[k] = count
                before = self._seen.get(k, None if self._started else count)
                delta = count if before is None else count - before if count >= before else count
                if delta:
                    self._pending[k] = self._pending.get(k, 0) + delta
                if self._pending.get(k) and now - self._logged.get(k, -math.inf) >= self.interval:
                    lines.append(f"pod {row['namespace'] or '-'}/{row['pod'] or row['container_id'][:12]} "
                                 f"({row['ip']}, {row['host_ifname']}): {self._pending.pop(k)} frames dropped as "
                                 f"{reason} since the last report")
                    self._logged[k] = now
        self._seen, self._started = seen, True
        self._pending = {k: v for k, v in self._pending.items() if k in seen}
        self._logged = {k: v for k, v in self._logged.items() if k in seen}
        for line in lines:
            log.warning("refused: %s", line)
        return lines


class Sampler:
    """Keeps the agent's last two samples so a one-shot `sknf stats` has current rates, and reports
    refused frames from them (RefusalLog).

    The agent ticks it every second or two; `handle_query` measures rates against the newest sample
    at least MIN_RATE_SPAN old.
    """

    def __init__(self, refusals: RefusalLog | None = None) -> None:
        self._samples: deque[Snapshot] = deque(maxlen=2)
        self._lock = threading.Lock()
        self.refusals = refusals or RefusalLog()

    def tick(self, snap: Snapshot) -> None:
        """Keep the snapshot as it is (rows are made only when a query needs them)."""
        with self._lock:
            self._samples.append(snap)
        self.refusals.observe(pod_rows(snap, refused_only=True), time.monotonic())

    def base(self, now: float) -> tuple[float, list[dict[str, Any]]] | None:
        """The sample to measure rates against at `now`: the newest one old enough, else the oldest."""
        with self._lock:
            samples = [s for s in self._samples if s.taken < now]
        older = [s for s in samples if now - s.taken >= MIN_RATE_SPAN] or samples[:1]
        return (older[-1].taken, pod_rows(older[-1])) if older else None


def handle_query(sampler: Sampler, snap: Snapshot) -> dict[str, Any]:
    """The agent's answer to {"op": "stats"}."""
    rows = pod_rows(snap)
    base = sampler.base(snap.taken)
    span = snap.taken - base[0] if base else None
    add_rates(rows, base[1] if base else None, span)
    return make_reply(snap, rows, span, "agent")


# ---- getting a reply -------------------------------------------------------------------------------

class SourceError(Exception):
    """No source could give figures; the message says what each one lacked."""


def query_agent(socket_path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the agent over its socket; raises OSError when nobody answers there."""
    reply = api.request(socket_path, {"op": "stats"}, timeout)
    if not reply.get("ok"):
        err = reply.get("error") or {}
        raise SourceError(f"agent at {socket_path} refused the stats query: {err.get('msg', err)}")
    return reply["result"]


def _agent_problem(socket_path: Path, e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        return f"no agent socket at {socket_path} (is the agent running on this node?)"
    if isinstance(e, PermissionError):
        return f"permission denied on {socket_path} (the socket is root-only: run as root)"
    if isinstance(e, ConnectionRefusedError):
        return f"nothing listens on {socket_path} (the agent stopped)"
    return f"agent at {socket_path}: {e.strerror or e}"


def _local_pod_cidrs(cfg: Config) -> tuple[Network, ...]:
    """This node's pod subnets without asking anyone: configured, or its entry in a static peers file."""
    if cfg.pod_cidrs:
        return cfg.pod_cidrs
    if cfg.peer_source == "static" and cfg.peers_file is not None:
        try:
            own = [n for n in StaticPeerSource(cfg.peers_file, cfg.underlay_family).nodes() if n.name == cfg.node_name]
        except PeersFileError:
            return ()
        if own and own[0].pod_cidr:
            return tuple(n for n in pod_subnets(own[0].pod_cidr) if n.version in cfg.families)
    return ()


def read_local(cfg: Config) -> dict[str, Any]:
    """Figures without the agent, from this node's kernel: the BPF datapath's pinned counters (or the
    host veths' link statistics when nothing is pinned), pod identities from the IPAM store on disk.
    Raises OSError or SourceError saying what is missing."""
    from sknf.metrics import Snapshot, join

    pod_cidrs = _local_pod_cidrs(cfg)
    # Reading leases needs only networks that hold them: the cluster's do when the node's are unknown.
    store = Store(cfg.state_dir, pod_cidrs or cfg.cluster_cidrs)
    if not store.path.exists():
        raise FileNotFoundError(errno.ENOENT, "no IPAM state (is this a sknf node?)", str(store.path))
    # pyroute2 (0.3 s) comes with either datapath module: imported only on this path.
    if (cfg.bpf_pin_dir / "pod_counters").exists():  # raises PermissionError when not root
        from sknf.datapath.bpf import read_pinned_counters

        mode, source, counters = "bpf", "bpf-pins", read_pinned_counters(cfg.bpf_pin_dir)
    else:
        from sknf.datapath.kernel import KernelDatapath

        mode, source, counters = "kernel", "kernel-links", KernelDatapath(cfg).read_counters()
    leases = store.leases()
    snap = Snapshot(node=cfg.node_name, datapath_mode=mode, datapath_reason="read without the agent",
                    pods=join(leases, counters), ipam_allocated=len(leases),
                    ipam_capacity=store.capacity if pod_cidrs else None, peers=None)
    rows = pod_rows(snap)
    add_rates(rows, None, None)
    return make_reply(snap, rows, None, source)


def agent_config(path: Path | None) -> Config | None:
    """The agent's configuration (file, then environment, as `sknf agent -c` reads it); None when neither
    says enough (no file given and no NODE_NAME/CLUSTER_CIDR in the environment)."""
    try:
        return load(path)
    except ConfigError as e:
        if path is not None:
            raise SourceError(f"agent configuration: {e}") from None
        return None


def fetch(cfg: Config | None, sock: Path) -> dict[str, Any]:
    """The agent's reply if it answers, else local figures, else SourceError naming every problem."""
    try:
        return query_agent(sock)
    except OSError as e:
        agent_problem = _agent_problem(sock, e)
    if cfg is None:
        raise SourceError(f"{agent_problem}; to read the node directly, give the agent's configuration "
                          "(-c FILE, or NODE_NAME and CLUSTER_CIDR in the environment)")
    try:
        return read_local(cfg)
    except OSError as e:
        local_problem = f"{e.filename or 'local state'}: {e.strerror or e}"
        if isinstance(e, PermissionError):
            local_problem += " (run as root)"
    except SourceError as e:
        local_problem = str(e)
    raise SourceError(f"{agent_problem}; and reading the node directly failed: {local_problem}")


# ---- presentation ------------------------------------------------------------------------------------

def human_bytes(n: float) -> str:
    """IEC units, as `ip -h -s link` and iperf3's transfer column."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000 or unit == "G":
            return f"{n:.0f}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_rate(bytes_per_second: float | None) -> str:
    """Bits per second, SI, as links and iperf3's bandwidth are quoted."""
    if bytes_per_second is None:
        return "-"
    n = bytes_per_second * 8
    for unit in ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"):
        if n < 1000 or unit == "Gbit/s":
            return f"{n:.0f} {unit}" if unit == "bit/s" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def fast_share(row: dict[str, Any]) -> float | None:
    """Share of the pod's packets the BPF fast path forwarded; None in kernel mode or with no packets."""
    fast, kernel = row.get("fast_packets"), row.get("kernel_packets")
    if fast is None or kernel is None or fast + kernel == 0:
        return None
    return fast / (fast + kernel)


def matches(row: dict[str, Any], namespace: str | None, pod: str | None) -> bool:
    """-n is exact (as in kubectl); --pod is a glob if it has *?[ and a substring otherwise."""
    if namespace is not None and row["namespace"] != namespace:
        return False
    if pod is None:
        return True
    if any(ch in pod for ch in "*?["):
        return fnmatch.fnmatchcase(row["pod"], pod)
    return pod in row["pod"]


def _rate(row: dict[str, Any], name: str) -> float:
    return row.get(f"{name}_rate") or 0.0


def _ip_key(row: dict[str, Any]) -> tuple[int, int]:
    try:
        ip = ip_address(row["ip"])
    except ValueError:
        return (0, 0)
    return (ip.version, int(ip))


SORT_KEYS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "rate": lambda r: -(_rate(r, "rx_bytes") + _rate(r, "tx_bytes")),
    "rx-rate": lambda r: -_rate(r, "rx_bytes"),
    "tx-rate": lambda r: -_rate(r, "tx_bytes"),
    "rx": lambda r: -r["rx_bytes"],
    "tx": lambda r: -r["tx_bytes"],
    "packets": lambda r: -(r["rx_packets"] + r["tx_packets"]),
    "drops": lambda r: -r["drops"],
    "fast": lambda r: -(fast_share(r) or 0.0),
    "name": lambda r: 0,
    "namespace": lambda r: r["namespace"],
    "ip": _ip_key,
}


def arrange(rows: list[dict[str, Any]], namespace: str | None, pod: str | None,
            sort: str) -> list[dict[str, Any]]:
    """Filter, then sort (busiest first for traffic keys); ties go by namespace/pod name."""
    kept = [r for r in rows if matches(r, namespace, pod)]
    by = SORT_KEYS[sort]
    return sorted(kept, key=lambda r: (by(r), r["namespace"], r["pod"], r["container_id"]))


def _columns(wide: bool) -> list[tuple[str, Callable[[dict[str, Any]], str], bool]]:
    """(header, cell, right-aligned) for each column."""
    def share(r: dict[str, Any]) -> str:
        s = fast_share(r)
        return "-" if s is None else f"{100 * s:.0f}%"

    cols = [
        ("NAMESPACE", lambda r: r["namespace"] or "-", False),
        ("POD", lambda r: r["pod"] or r["container_id"][:12], False),
        ("IP", lambda r: " ".join(r.get("ips") or [r["ip"]]), False),
        ("RX", lambda r: human_bytes(r["rx_bytes"]), True),
        ("TX", lambda r: human_bytes(r["tx_bytes"]), True),
        ("RX-PKTS", lambda r: human_count(r["rx_packets"]), True),
        ("TX-PKTS", lambda r: human_count(r["tx_packets"]), True),
        ("RX-RATE", lambda r: human_rate(r.get("rx_bytes_rate")), True),
        ("TX-RATE", lambda r: human_rate(r.get("tx_bytes_rate")), True),
        ("FAST%", share, True),
        ("DROPS", lambda r: human_count(r["drops"]), True),
    ]
    if wide:
        pps = lambda v: "-" if v is None else human_count(v)  # noqa: E731
        cols += [
            ("REFUSED", refused_cell, False),
            ("RX-PPS", lambda r: pps(r.get("rx_packets_rate")), True),
            ("TX-PPS", lambda r: pps(r.get("tx_packets_rate")), True),
            ("HOST-IF", lambda r: r["host_ifname"], False),
            ("CONTAINER", lambda r: r["container_id"][:12], False),
        ]
    return cols


def refused_cell(row: dict[str, Any]) -> str:
    """Refused frames by reason, nonzero ones only: `spoofed_ip:3,ipv6:1`, or `-`."""
    parts = [f"{reason}:{human_count(n)}" for reason, n in row.get("refused", {}).items() if n]
    return ",".join(parts) or "-"


def summary(reply: dict[str, Any]) -> str:
    dp = reply["datapath"]
    mode = dp["mode"] + (f" ({dp['reason']})" if dp.get("reason") else "")
    ipam = reply["ipam"]
    span = reply.get("rate_interval")
    rates = f"rates over {span:.1f} s" if span else "no rates yet (one sample)"
    peers = f"  peers {reply['overlay_peers']}" if reply["source"] == "agent" else ""
    firewall = f"  iptables {reply['iptables']}" if reply.get("iptables") else ""
    flows = ""
    if ft := reply.get("flows"):
        held = " FULL: all pod traffic on the kernel path" if ft["full"] else " (seeding)" if ft["syncing"] else ""
        flows = f"  flows {ft['entries']}/{ft['capacity']}{held}"
    return (f"node {reply['node']}  datapath {mode}  pods {len(reply['pods'])}"
            f"  ipam {ipam['allocated']}/{ipam['capacity']}{peers}{firewall}{flows}  source {reply['source']}  {rates}")


def render_table(reply: dict[str, Any], wide: bool, headers: bool = True) -> str:
    cols = _columns(wide)
    cells = [[cell(r) for _, cell, _ in cols] for r in reply["pods"]]
    table = ([[h for h, _, _ in cols]] if headers else []) + cells
    widths = [max((len(row[i]) for row in table), default=0) for i in range(len(cols))]
    lines = [summary(reply)] if headers else []
    for row in table:
        parts = [c.rjust(w) if right else c.ljust(w)
                 for c, w, (_, _, right) in zip(row, widths, cols, strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def render(reply: dict[str, Any], output: str, headers: bool = True) -> str:
    if output == "json":
        return json.dumps(reply, indent=2)
    if output == "yaml":
        import yaml  # only here: it costs start-up time the table path does not need

        return "---\n" + yaml.safe_dump(reply, sort_keys=False).rstrip()
    return render_table(reply, wide=output == "wide", headers=headers)


# ---- command line --------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Per-pod traffic on this node: bytes, packets, current rates, fast-path share "
                          "and drops. Asks the agent; when it is down, reads the kernel's counters directly.")
    parser.epilog = ("examples:\n  sknf stats                    # all pods, busiest first\n"
                     "  sknf stats -n default --pod 'web-*' --sort rx\n"
                     "  sknf stats -w --interval 1   # refresh in place every second\n"
                     "  sknf stats -o json            # the agent's reply, filtered and sorted\n"
                     "  sknf stats -c /etc/sknf/config.yaml   # the agent's paths; needed to read the\n"
                     "                                        # node directly when the agent is down")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("-n", "--namespace", help="only pods of this namespace (default: all)")
    parser.add_argument("--pod", help="only pods whose name contains this, or matches it as a glob (*?[)")
    parser.add_argument("--sort", choices=SORTS, default="rate", help="order (default: rate, busiest first)")
    parser.add_argument("-o", "--output", choices=OUTPUTS, default="table", help="output format")
    parser.add_argument("--no-headers", action="store_true", help="table without summary and header lines")
    parser.add_argument("-w", "--watch", action="store_true", help="refresh in place until interrupted")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    parser.add_argument("--count", type=int, help="with --watch: stop after this many refreshes")
    parser.add_argument("-c", "--config", type=Path,
                        help="the agent's configuration file (environment variables override, as for the agent)")
    parser.add_argument("--socket", type=Path, help="agent socket (default: the configuration's, else "
                        "/run/sknf/sknf.sock)")


def _shown(reply: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    return {**reply, "pods": arrange(reply["pods"], args.namespace, args.pod, args.sort)}


def policy_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Which NetworkPolicies select each pod, by direction (rows from a running agent carry them)."""
    out = []
    for row in rows:
        if "policies" not in row:
            continue
        name = f"{row['namespace'] or '-'}/{row['pod'] or row['container_id'][:12]}"
        chosen = row["policies"]
        out.append(f"{name}: " + ("; ".join(f"{d} {', '.join(chosen[d])}" for d in ("ingress", "egress") if d in chosen)
                                  or "no NetworkPolicy selects it (all traffic allowed)"))
    return out


def _text(reply: dict[str, Any], args: argparse.Namespace) -> str:
    """The output; with --pod, a table is followed by the policies selecting each pod shown."""
    shown = _shown(reply, args)
    text = render(shown, args.output, not args.no_headers)
    if args.pod and args.output in ("table", "wide") and (lines := policy_lines(shown["pods"])):
        text += "\n\npolicies:\n" + "\n".join(f"  {line}" for line in lines)
    return text


def run(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        print("sknf stats: --interval must be positive", file=sys.stderr)
        return 2
    try:
        cfg = agent_config(args.config)
        sock = args.socket or (cfg.socket_path if cfg else Config.run_dir / "sknf.sock")
        reply = fetch(cfg, sock)
        if not args.watch:
            print(_text(reply, args))
            return 0
        clear = sys.stdout.isatty() and args.output in ("table", "wide")
        shown = 0
        while True:
            text = _text(reply, args)
            print(("\x1b[H\x1b[2J" if clear else "") + text, flush=True)
            shown += 1
            if args.count is not None and shown >= args.count:
                return 0
            time.sleep(args.interval)
            prev, reply = reply, fetch(cfg, sock)
            # Rates between refreshes, whatever span the source used.
            span = reply["time"] - prev["time"]
            if span > 0:
                add_rates(reply["pods"], prev["pods"], span)
                reply["rate_interval"] = span
    except SourceError as e:
        print(f"sknf stats: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
