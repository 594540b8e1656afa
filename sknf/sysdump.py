"""`sknf sysdump`: one tarball with what is needed to debug a node's pod networking, and nothing secret.

What goes in (each a member; a command that fails or is not installed leaves a note, never a gap):
links, addresses, routes (every table) and policy rules of both families, neighbours, the FDB and bridge ports; tc
qdiscs and filters of `vxsknf`, every pod veth and shaped pod ifb; bpftool's view of programs, tc attachments and
a dump of each map pinned under bpf_pin_dir; both iptables backends (iptables and ip6tables) and the
nftables ruleset;
conntrack statistics; the sysctls sknf depends on; the agent's configuration (the file and the
effective settings), the IPAM leases and parked DELs; and from the running agent its metrics, its
health, stats and flows replies (the last 100 flow events) and its recent log lines (its bounded
in-memory buffer, {"op": "logs"});
and `sknf doctor`'s findings.

Nothing secret: the kubeconfig and service-account token are never read (only the kubeconfig's
path is named), and every text member is passed through `redact`, which blanks bearer tokens, JWTs
and `token:`/`password:`/`*-data:` values wherever they might appear (a config file's comment, a
logged URL). The tarball is written 0600: addresses and rules are not secret, but not public either.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sknf import api
from sknf.config import HOST_VETH_PREFIX, VXLAN, Config, ConfigError, host_port, load

MAX_MEMBER = 16 << 20  # bytes per member: a full 262,144-entry flow map dump stays readable, not unbounded
COMMAND_TIMEOUT = 30.0
COMMANDS: list[tuple[str, list[str]]] = [
    ("net/links.txt", ["ip", "-d", "-s", "link", "show"]),
    ("net/addresses.txt", ["ip", "-d", "address", "show"]),
    ("net/routes.txt", ["ip", "-d", "route", "show", "table", "all"]),
    ("net/rules.txt", ["ip", "rule", "show"]),
    ("net/routes6.txt", ["ip", "-6", "-d", "route", "show", "table", "all"]),  # IPv6 pods or underlay
    ("net/rules6.txt", ["ip", "-6", "rule", "show"]),
    ("net/neighbours.txt", ["ip", "-s", "neighbour", "show"]),
    ("net/fdb.txt", ["bridge", "fdb", "show"]),
    ("net/bridge-ports.txt", ["bridge", "-d", "link", "show"]),
    ("firewall/iptables-nft.txt", ["iptables-nft-save", "-c"]),
    ("firewall/iptables-legacy.txt", ["iptables-legacy-save", "-c"]),
    ("firewall/ip6tables-nft.txt", ["ip6tables-nft-save", "-c"]),
    ("firewall/ip6tables-legacy.txt", ["ip6tables-legacy-save", "-c"]),
    ("firewall/nft-ruleset.txt", ["nft", "-a", "list", "ruleset"]),
    ("firewall/conntrack-stats.txt", ["conntrack", "-S"]),
    ("bpf/programs.txt", ["bpftool", "prog", "show"]),
    ("bpf/tc-attachments.txt", ["bpftool", "net", "show"]),
]
SYSCTLS = ("net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables",
           "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.all.send_redirects",
           "net.ipv4.neigh.default.gc_thresh1", "net.ipv4.neigh.default.gc_thresh2",
           "net.ipv4.neigh.default.gc_thresh3", "net.netfilter.nf_conntrack_count", "net.netfilter.nf_conntrack_max",
           "net.ipv4.ping_group_range")
_SECRETS = [
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1<redacted>"),
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "<redacted-jwt>"),
    (re.compile(r"(?i)((?:token|password|passwd|secret|[a-z-]*-data)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"),
     r"\1<redacted>"),
]


def redact(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def _command(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return f"# {argv[0]} is not installed on this node\n"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"# {' '.join(argv)}: no answer in {COMMAND_TIMEOUT:.0f} s\n"
    head = f"# {' '.join(argv)}" + (f" (exit {proc.returncode})" if proc.returncode else "") + "\n"
    return head + proc.stdout + (f"# stderr:\n{proc.stderr}" if proc.stderr.strip() else "")


def _sysctls() -> str:
    keys = list(SYSCTLS)
    conf = Path("/proc/sys/net/ipv4/conf")
    for dev in sorted(p.name for p in conf.iterdir()) if conf.is_dir() else []:
        keys += [f"net.ipv4.conf.{dev}.rp_filter", f"net.ipv4.conf.{dev}.forwarding"]
    lines = []
    for key in keys:
        try:
            value = Path("/proc/sys/" + key.replace(".", "/")).read_text().strip()
        except OSError as e:
            value = f"<{e.strerror}>"
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def _devices() -> list[str]:
    """vxsknf, every pod's host veth and every shaped pod's ifb."""
    from sknf import netlink
    from sknf.shaping import IFB_PREFIX

    with netlink.route() as ipr:
        ifbs = [link.get("IFLA_IFNAME") for link in ipr.get_links()
                if (link.get("IFLA_IFNAME") or "").startswith(IFB_PREFIX)]
        return [VXLAN, *sorted(netlink.host_veths(ipr, HOST_VETH_PREFIX)), *sorted(ifbs)]


def _tc(devices: list[str]) -> str:
    parts = []
    for dev in devices:
        parts.append(_command(["tc", "-s", "qdisc", "show", "dev", dev]))
        for hook in ("ingress", "egress"):
            parts.append(_command(["tc", "-s", "filter", "show", "dev", dev, hook]))
    return "".join(parts)


def _pinned_maps(pin_dir: Path) -> Iterator[tuple[str, str]]:
    try:
        names = sorted(p.name for p in pin_dir.iterdir() if not p.name.startswith("prog_"))
    except OSError as e:
        yield "bpf/maps.txt", f"# {pin_dir}: {e.strerror}\n"
        return
    for name in names:
        yield f"bpf/map-{name}.txt", _command(["bpftool", "map", "dump", "pinned", str(pin_dir / name)])


def _config(cfg: Config | None, path: Path | None, error: str | None) -> str:
    parts = []
    if path is not None:
        try:
            parts.append(f"# {path}\n{path.read_text()}")
        except OSError as e:
            parts.append(f"# {path}: {e.strerror}\n")
    if cfg is None:
        parts.append(f"# the configuration does not load: {error}\n")
    else:
        settings = {k: str(v) for k, v in dataclasses.asdict(cfg).items() if k != "extra"}
        parts.append("# effective settings (file + environment); the kubeconfig itself is never read\n"
                     + json.dumps(settings, indent=1) + "\n")
    return "\n".join(parts)


def _leases(cfg: Config) -> str:
    from sknf.ipam import CorruptStore, Store

    try:
        store = Store.open_existing(cfg.state_dir)
        doc: dict[str, Any] = {"pod_cidr": ",".join(map(str, store.pod_cidrs)),
                               "leases": [lease.to_json() for lease in store.leases()]}
    except (OSError, CorruptStore) as e:
        doc = {"error": str(e)}
    pending = cfg.state_dir / "pending-del"
    doc["pending_dels"] = sorted(p.name for p in pending.iterdir()) if pending.is_dir() else []
    return json.dumps(doc, indent=1) + "\n"


def _agent(cfg: Config, op: str) -> Any:
    try:
        reply = api.request(cfg.socket_path, {"op": op}, timeout=30)
    except (OSError, ValueError) as e:
        return {"error": f"agent at {cfg.socket_path}: {e}"}
    return reply["result"] if reply["ok"] else {"error": reply["error"]}


def _metrics(cfg: Config) -> str:
    host, port = cfg.metrics_host_port
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    url = f"http://{host_port(host, port)}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.read().decode(errors="replace")
    except OSError as e:
        return f"# {url}: {e}\n"


def collect(config_path: Path | None) -> Iterator[tuple[str, str]]:
    """(member name, text) of everything the dump holds, unredacted; `write` redacts."""
    from sknf import doctor

    try:
        cfg: Config | None = load(config_path)
        error = None
    except ConfigError as e:
        cfg, error = None, str(e)
    import platform

    import sknf

    yield "version.txt", (f"sknf {sknf.__version__}\npython {platform.python_version()}\n"
                          f"kernel {platform.release()} {platform.version()}\n"
                          f"time {time.strftime('%FT%TZ', time.gmtime())}\n")
    for name, argv in COMMANDS:
        yield name, _command(argv)
    yield "net/tc.txt", _tc(_devices())
    yield "sysctls.txt", _sysctls()
    yield "agent/config.txt", _config(cfg, config_path, error)
    findings = doctor.diagnose(doctor.gather(config_path, probe=False))
    out = io.StringIO()
    doctor.render(findings, out)
    yield "doctor.txt", out.getvalue()
    if cfg is None:
        return
    yield from _pinned_maps(cfg.bpf_pin_dir)
    yield "agent/leases.json", _leases(cfg)
    yield "agent/metrics.txt", _metrics(cfg)
    for op in ("health", "stats", "flows"):
        yield f"agent/{op}.json", json.dumps(_agent(cfg, op), indent=1) + "\n"
    logs = _agent(cfg, "logs")
    yield "agent/log.txt", ("\n".join(logs["lines"]) + "\n") if "lines" in logs else json.dumps(logs) + "\n"


def write(target: Path, members: Iterator[tuple[str, str]], root: str) -> list[str]:
    """The tarball at target (0600, gzip), every member redacted and capped at MAX_MEMBER; returns names."""
    names = []
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
        for name, text in members:
            data = redact(text).encode()
            if len(data) > MAX_MEMBER:
                data = data[:MAX_MEMBER] + f"\n# truncated at {MAX_MEMBER} bytes\n".encode()
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
            tar.addfile(info, io.BytesIO(data))
            names.append(name)
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, help="the agent's YAML settings (environment variables override)")
    parser.add_argument("--output", "-o", type=Path,
                        help="the tarball to write (default: ./sknf-sysdump-NODE-TIME.tar.gz)")


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("sknf sysdump: needs root (it reads iptables, BPF maps and the agent's socket)", file=sys.stderr)
        return 1
    node = os.environ.get("SKNF_NODE_NAME") or os.environ.get("NODE_NAME") or os.uname().nodename
    with contextlib.suppress(ConfigError):
        node = load(args.config).node_name
    root = f"sknf-sysdump-{node}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    target = args.output or Path(f"{root}.tar.gz")
    names = write(target, collect(args.config), root)
    print(f"wrote {target}: {len(names)} files")
    return 0
