"""Agent configuration: one frozen dataclass, read from a YAML file and/or the environment.

Environment variables win over the file, so a DaemonSet can set the two settings users edit
(CLUSTER_CIDR, HOST_PHYSICAL_IF) and NODE_NAME from the downward API while the rest comes from a
ConfigMap. Every error names the field (and its source) that is wrong.

Every setting is read from `SKNF_<NAME>`: plain names such as MTU, DATAPATH or VXLAN_PORT are set by
anything (a Service named `vxlan` injects VXLAN_PORT=udp://... into every pod of its namespace).
The three documented before the prefix existed (CLUSTER_CIDR, HOST_PHYSICAL_IF, NODE_NAME) are
still read unprefixed; the SKNF_ spelling wins when both are set.

Dual-stack: `cluster_cidr` (and `pod_cidr`) take one network per family, comma-separated or as a YAML
list (`10.244.0.0/16,fd00:10:244::/56`), in either order. `cluster_cidr` then holds the first family's
network (IPv4 when the cluster has IPv4, so IPv4-only code reads it unchanged) and `cluster_cidrs` all
of them, IPv4 first; `cidr(6)` is the IPv6 one. An IPv6-only cluster lists just an IPv6 network.

The underlay (the nodes' addresses VXLAN runs between) is one family for the whole cluster, whatever
families the pods have: one VXLAN device cannot mix them. `underlay_family` picks it: 4 by default, 6
by default in an IPv6-only cluster; either may be set explicitly for any cluster.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BRIDGE = "brsknf"
VXLAN = "vxsknf"
HOST_VETH_PREFIX = "sknf"  # host ends of pod veths: sknf + 11 hex digits
# What VXLAN adds to a pod frame, by the underlay's family: outer IPv4 20 (IPv6 40) + UDP 8 + VXLAN 8 +
# inner Ethernet 14. The overlay (and pod) MTU is the underlay's less this.
VXLAN_OVERHEAD = {4: 50, 6: 70}
DATAPATHS = ("auto", "bpf", "kernel")
PEER_SOURCES = ("static", "kubernetes")
MAX_FLOW_MAP_CAPACITY = 1 << 26  # entries allocate as flows arrive (no prealloc); this bounds a typo
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Cluster prefix lengths accepted per family, and the longest node subnet (it must hold two pods).
CLUSTER_PREFIX = {4: (8, 28), 6: (16, 120)}
MAX_NODE_PREFIX = {4: 30, 6: 126}
SUBNET_SETTING = {4: "node_subnet_prefix", 6: "node_subnet_prefix6"}


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message starts with the field name."""


@dataclass(frozen=True)
class Config:
    node_name: str
    cluster_cidr: Network  # the first family's (IPv4 in a dual-stack cluster); cluster_cidrs has all
    host_physical_if: str | None = None  # None: the interface of the default route
    pod_cidr: Network | None = None  # None: from the peer source, else carved; pod_cidrs has all
    node_subnet_prefix: int = 24  # IPv4 node subnets carved from the cluster CIDR
    node_subnet_prefix6: int = 64  # IPv6 ones
    vxlan_vni: int = 1
    vxlan_port: int = 4789
    mtu: int | None = None  # pod/overlay MTU; None: underlay MTU - 50 (IPv6 underlay: - 70)
    underlay_family: int | None = None  # 4 or 6; None: 6 in an IPv6-only cluster, else 4 (set by __post_init__)
    datapath: str = "auto"
    peer_source: str = "static"
    peers_file: Path | None = None
    kubeconfig: Path | None = None
    masquerade: bool = True
    state_dir: Path = Path("/var/lib/sknf")
    run_dir: Path = Path("/run/sknf")
    bpf_pin_dir: Path = Path("/sys/fs/bpf/sknf")
    metrics_bind: str = "0.0.0.0:9655"
    reconcile_interval: float = 10.0
    flow_map_capacity: int | None = None  # learned-flow map entries; None: nf_conntrack_max
    flow_events: bool = True  # BPF datapath: new-flow and drop events for `sknf flows`
    install_cni: bool = False
    cni_bin_dir: Path = Path("/opt/cni/bin")
    cni_conf_dir: Path = Path("/etc/cni/net.d")
    cni_conf_name: str = "10-sknf.conflist"
    log_level: str = "info"
    network_policy: bool = True  # enforce NetworkPolicy (policy_dir, else the API with peer_source kubernetes)
    policy_dir: Path | None = None  # manifests of NetworkPolicies, Namespaces, Pods (lab, bare metal)
    cluster_cidrs: tuple[Network, ...] = ()  # every family's network, IPv4 first; () means (cluster_cidr,)
    pod_cidrs: tuple[Network, ...] = ()  # the configured node subnets, one per family; () means (pod_cidr,)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.cluster_cidrs:
            object.__setattr__(self, "cluster_cidrs", (self.cluster_cidr,))
        if not self.pod_cidrs and self.pod_cidr is not None:
            object.__setattr__(self, "pod_cidrs", (self.pod_cidr,))
        if self.underlay_family is None:
            object.__setattr__(self, "underlay_family", 6 if self.families == (6,) else 4)

    @property
    def vxlan_overhead(self) -> int:
        """Bytes VXLAN over this cluster's underlay adds to a pod frame (50 over IPv4, 70 over IPv6)."""
        return VXLAN_OVERHEAD[self.underlay_family]

    @property
    def families(self) -> tuple[int, ...]:
        """The cluster's IP versions, 4 first: (4,), (6,) or (4, 6)."""
        return tuple(net.version for net in self.cluster_cidrs)

    def cidr(self, family: int) -> Network | None:
        """The cluster network of one family, None when the cluster has none."""
        return next((net for net in self.cluster_cidrs if net.version == family), None)

    def subnet_prefix(self, family: int) -> int:
        """The prefix length of the node subnets carved for one family."""
        return self.node_subnet_prefix6 if family == 6 else self.node_subnet_prefix

    @property
    def socket_path(self) -> Path:
        """The agent's root-only CNI socket; the conflist carries this path to the plugin."""
        return self.run_dir / "sknf.sock"

    @property
    def metrics_host_port(self) -> tuple[str, int]:
        host, _, port = self.metrics_bind.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)


def host_port(host: str, port: int) -> str:
    """HOST:PORT as URLs and metrics_bind write it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


ENV_PREFIX = "SKNF_"
LEGACY_ENV = ("cluster_cidr", "host_physical_if", "node_name")  # also read without the prefix


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _from_env(env: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """(variable, value) setting this field, the SKNF_ spelling first; None when neither is set (or empty)."""
    for var in (_env_name(name), *([name.upper()] if name in LEGACY_ENV else [])):
        raw = env.get(var)
        if raw not in (None, ""):
            return var, raw
    return None


def _convert(name: str, raw: Any, source: str) -> Any:
    """Turn one raw value (YAML scalar or env string) into the field's type, or raise naming it."""
    where = f"{name} (from {source})"
    try:
        if name in ("cluster_cidr", "pod_cidr"):
            return networks(raw, where)
        if name in ("node_subnet_prefix", "node_subnet_prefix6", "vxlan_vni", "vxlan_port", "mtu", "flow_map_capacity",
                    "underlay_family"):
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if name == "reconcile_interval":
            return float(raw)
        if name in ("masquerade", "install_cni", "network_policy", "flow_events"):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if name in ("peers_file", "kubeconfig", "state_dir", "run_dir", "bpf_pin_dir", "cni_bin_dir",
                    "cni_conf_dir", "policy_dir"):
            return Path(str(raw))
        return str(raw)
    except ConfigError:
        raise
    except (ValueError, TypeError, OverflowError):  # "x", a YAML list or mapping, .inf for an integer
        kind = {int: "an integer", float: "a number", bool: "true or false"}
        ftype = next(f.type for f in dataclasses.fields(Config) if f.name == name)
        want = next((v for k, v in kind.items() if k.__name__ in str(ftype)), "a valid value")
        if name.endswith("cidr"):
            want = "a network such as 10.244.0.0/16, or one per family: 10.244.0.0/16,fd00:10:244::/56"
        raise ConfigError(f"{where}: {raw!r} is not {want}") from None


def networks(raw: Any, where: str) -> tuple[Network, ...]:
    """One network, or one per family (comma-separated text or a list), IPv4 first."""
    items = raw if isinstance(raw, list) else str(raw).split(",")
    nets = [ipaddress.ip_network(str(item).strip(), strict=True) for item in items]
    if not nets or len(nets) > 2 or len({n.version for n in nets}) != len(nets):
        raise ConfigError(f"{where}: {raw!r} must be one network, or one IPv4 and one IPv6 network")
    return tuple(sorted(nets, key=lambda n: n.version))


def _validate(cfg: Config) -> None:
    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"{name}: {why} (got {getattr(cfg, name)!r})")

    if not _NODE_NAME.match(cfg.node_name):
        raise bad("node_name", "must be a DNS-1123 subdomain")
    if cfg.host_physical_if is not None and not _IFNAME.match(cfg.host_physical_if):
        raise bad("host_physical_if", "must be a Linux interface name (1-15 characters)")
    for net in cfg.cluster_cidrs:
        low, high = CLUSTER_PREFIX[net.version]
        if not low <= net.prefixlen <= high:
            raise bad("cluster_cidr", f"IPv{net.version} prefix length must be between /{low} and /{high}")
        name, longest = SUBNET_SETTING[net.version], MAX_NODE_PREFIX[net.version]
        if not net.prefixlen < getattr(cfg, name) <= longest:
            raise bad(name, f"must be longer than the cluster prefix /{net.prefixlen} and at most {longest}")
    for sub in cfg.pod_cidrs:
        cluster = cfg.cidr(sub.version)
        if cluster is None or not sub.subnet_of(cluster):
            raise bad("pod_cidr", f"{sub} must lie inside cluster_cidr {','.join(map(str, cfg.cluster_cidrs))}")
        if sub.prefixlen > MAX_NODE_PREFIX[sub.version]:
            raise bad("pod_cidr", f"{sub} must hold at least two pod addresses (/{MAX_NODE_PREFIX[sub.version]} "
                      "or shorter)")
    if not 1 <= cfg.vxlan_vni <= 0xFFFFFF:
        raise bad("vxlan_vni", "must be between 1 and 16777215")
    if not 1 <= cfg.vxlan_port <= 65535:
        raise bad("vxlan_port", "must be a UDP port (1-65535)")
    if cfg.underlay_family not in (4, 6):
        raise bad("underlay_family", "must be 4 (IPv4 underlay) or 6 (IPv6 underlay)")
    if cfg.mtu is not None and not 576 <= cfg.mtu <= 9000:
        raise bad("mtu", "must be between 576 and 9000")
    if cfg.datapath not in DATAPATHS:
        raise bad("datapath", f"must be one of {', '.join(DATAPATHS)}")
    if cfg.peer_source not in PEER_SOURCES:
        raise bad("peer_source", f"must be one of {', '.join(PEER_SOURCES)}")
    if cfg.peer_source == "static" and cfg.peers_file is None:
        raise bad("peers_file", "is required when peer_source is static")
    if cfg.flow_map_capacity is not None and not 1 <= cfg.flow_map_capacity <= MAX_FLOW_MAP_CAPACITY:
        raise bad("flow_map_capacity", f"must be between 1 and {MAX_FLOW_MAP_CAPACITY}")
    if not 0 < cfg.reconcile_interval < math.inf:  # also refuses .nan, which compares false to everything
        raise bad("reconcile_interval", "must be a positive number of seconds")
    try:
        host, port = cfg.metrics_host_port
        ipaddress.ip_address(host)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise bad("metrics_bind", "must be ADDRESS:PORT, e.g. 127.0.0.1:9655") from None
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise bad("log_level", "must be debug, info, warning or error")


FIELDS = {f.name for f in dataclasses.fields(Config)} - {"extra", "cluster_cidrs", "pod_cidrs"}
REQUIRED = ("node_name", "cluster_cidr")


def load(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build and validate the configuration from an optional YAML file plus the environment."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if path is not None:
        try:
            doc = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML: {e}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"config file {path}: must be a mapping of settings")
        for key, raw in doc.items():
            name = str(key).replace("-", "_")
            if name not in FIELDS:
                raise ConfigError(f"{key} (from {path}): unknown setting; known: {', '.join(sorted(FIELDS))}")
            if raw is not None:
                values[name] = _convert(name, raw, str(path))
    for name in FIELDS:
        if (found := _from_env(env, name)) is not None:
            values[name] = _convert(name, found[1], f"${found[0]}")
    for name in REQUIRED:
        if name not in values:
            raise ConfigError(f"{name}: required (set ${_env_name(name)} or '{name}' in the config file)")
    for name in ("cluster_cidr", "pod_cidr"):
        if name in values:
            values[name + "s"] = values[name]
            values[name] = values[name][0]
    cfg = Config(**values)
    _validate(cfg)
    return cfg
