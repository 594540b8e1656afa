"""The CNI protocol (spec 1.1.0), agent side: request validation, results, errors, pending DELs.

The plugin executable (`cni/sknf`) only checks stdin is JSON and forwards `{env, config}` here, so every
rule of the spec that depends on the verb lives in one place: which CNI_* variables a verb needs
(code 4), which cniVersion it accepts (code 1: CHECK needs 0.4.0+, GC and STATUS 1.1.0+), what a
valid network configuration looks like (code 7), and how a result is spelled for the version the
runtime asked for (0.3.x/0.4.0 put `"version": "4"` in each IP, 1.0.0 dropped it, 1.1.0 added
interface MTUs). Stdlib only: the agent imports this on every request path.

Error codes: 1-99 are the spec's well-known codes; sknf's own codes start at 100:
  100 IPAM_EXHAUSTED   no free address left in the node's pod subnet (or no free node subnet)
  101 ALREADY_EXISTS   ADD for a (container id, ifname) that already holds an address
  102 STORE_CORRUPT    the on-disk IPAM store cannot be read; the agent must rebuild it
  103 INTERNAL         an unexpected agent failure; the traceback is in the agent's log
  104 FORBIDDEN        the socket peer is not root (SO_PEERCRED), request refused
  110 CHECK_FAILED     CHECK found the pod's network not as ADD left it
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = SUPPORTED_VERSIONS[-1]
PLUGIN_TYPE = "sknf"
PENDING_DEL_DIR = "pending-del"

# Well-known codes (spec section 5, "Error").
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51
# sknf's plugin-specific codes (documented in the module docstring).
IPAM_EXHAUSTED = 100
ALREADY_EXISTS = 101
STORE_CORRUPT = 102
INTERNAL = 103
FORBIDDEN = 104
CHECK_FAILED = 110

# Required CNI_* variables per verb (spec section 2); CNI_COMMAND is always required.
REQUIRED_ENV: dict[str, tuple[str, ...]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "GC": ("CNI_PATH",),
    "STATUS": (),
    "VERSION": (),
}
# The oldest cniVersion at which each verb exists.
MIN_VERSION = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")  # container ids and network names


class CniError(Exception):
    """A failure the runtime should see as a CNI error result (code, short msg, longer details)."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str = LATEST) -> dict[str, Any]:
        """The error result object, ready for json.dumps."""
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


def _vtuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


@dataclass(frozen=True)
class Request:
    """One validated CNI invocation (env + netconf), as the agent's handlers receive it."""

    command: str
    cni_version: str
    network: str  # the netconf's "name"
    config: dict[str, Any]
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = field(default_factory=dict)  # parsed CNI_ARGS
    path: tuple[str, ...] = ()
    prev_result: dict[str, Any] | None = None
    valid_attachments: frozenset[tuple[str, str]] | None = None  # GC only: (container id, ifname)
    bandwidth: Bandwidth | None = None  # ADD and CHECK: runtimeConfig.bandwidth, None when unshaped

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")

    @property
    def infra_container_id(self) -> str:
        return self.args.get("K8S_POD_INFRA_CONTAINER_ID", "")

    @property
    def runtime_config(self) -> dict[str, Any]:
        rc = self.config.get("runtimeConfig")
        return rc if isinstance(rc, dict) else {}


# runtimeConfig.bandwidth (the `bandwidth` capability; rates in bit/s, bursts in bits). kubelet refuses
# annotations below 1 kbit/s; a tbf rate is 32 bits of bytes/s; the reference plugin refuses bursts of
# 4 GiB and more. containerd and CRI-O send burst = 2**32 - 1 bits for every annotated direction.
MIN_RATE = 1000
MAX_RATE = (2**32 - 1) * 8
MAX_BURST = (2**32 - 1) * 8
_BANDWIDTH_FIELDS = ("ingressRate", "ingressBurst", "egressRate", "egressBurst")


@dataclass(frozen=True)
class Bandwidth:
    """A pod's traffic limits, per direction seen from the pod (ingress = to it); 0 = unlimited."""

    ingress_rate: int = 0
    ingress_burst: int = 0
    egress_rate: int = 0
    egress_burst: int = 0

    @property
    def ingress(self) -> bool:
        return self.ingress_rate > 0

    @property
    def egress(self) -> bool:
        return self.egress_rate > 0

    def to_json(self) -> dict[str, int]:
        """The capability's own spelling, so a record reads like the runtime's request."""
        return dict(zip(_BANDWIDTH_FIELDS, (self.ingress_rate, self.ingress_burst, self.egress_rate,
                                            self.egress_burst), strict=True))


def parse_bandwidth(runtime_config: Mapping[str, Any]) -> Bandwidth | None:
    """runtimeConfig.bandwidth validated (code 7 for anything out of range); None when nothing is limited.

    Like the reference plugin: each direction needs both rate and burst or neither; a missing or
    zero field means "not set". Unknown keys are ignored, as the spec asks of plugins.
    """
    raw = runtime_config.get("bandwidth")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise CniError(INVALID_CONFIG, "runtimeConfig.bandwidth must be an object", f"bandwidth={raw!r}")
    values = {}
    for key in _BANDWIDTH_FIELDS:
        value = raw.get(key) or 0
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CniError(INVALID_CONFIG, f"runtimeConfig.bandwidth.{key} must be a non-negative integer",
                           f"{key}={raw.get(key)!r}")
        values[key] = value
    for direction in ("ingress", "egress"):
        rate, burst = values[f"{direction}Rate"], values[f"{direction}Burst"]
        if bool(rate) != bool(burst):
            raise CniError(INVALID_CONFIG, f"runtimeConfig.bandwidth: {direction} rate and burst must be set together",
                           f"{direction}Rate={rate}, {direction}Burst={burst}")
        if rate and not MIN_RATE <= rate <= MAX_RATE:
            raise CniError(INVALID_CONFIG, f"runtimeConfig.bandwidth.{direction}Rate out of range",
                           f"{rate} bit/s, allowed {MIN_RATE}..{MAX_RATE}")
        if burst > MAX_BURST:
            raise CniError(INVALID_CONFIG, f"runtimeConfig.bandwidth.{direction}Burst out of range",
                           f"{burst} bits, at most {MAX_BURST}")
    bw = Bandwidth(*values.values())
    return bw if bw.ingress or bw.egress else None


def error_version(config: Any) -> str:
    """The cniVersion to stamp on an error: the request's own when we speak it, else the latest."""
    version = config.get("cniVersion") if isinstance(config, dict) else None
    return version if version in SUPPORTED_VERSIONS else LATEST


def _parse_args(raw: str) -> dict[str, str]:
    """CNI_ARGS is "K=V;K=V"; a pair without '=' is an invalid environment variable (code 4)."""
    args: dict[str, str] = {}
    for pair in filter(None, raw.split(";")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENVIRONMENT, "invalid CNI_ARGS", f"pair {pair!r} is not KEY=VALUE")
        args[key] = value
    return args


def _check_env(command: str, env: Mapping[str, str]) -> None:
    missing = [name for name in REQUIRED_ENV[command] if not env.get(name)]
    if missing:
        raise CniError(INVALID_ENVIRONMENT, f"required env variables [{','.join(missing)}] missing")
    cid = env.get("CNI_CONTAINERID", "")
    if "CNI_CONTAINERID" in REQUIRED_ENV[command] and not _NAME.match(cid):
        raise CniError(INVALID_ENVIRONMENT, "invalid characters in CNI_CONTAINERID", cid)
    ifname = env.get("CNI_IFNAME", "")
    if "CNI_IFNAME" in REQUIRED_ENV[command] and (
        len(ifname) > 15 or ifname in (".", "..") or any(c in "/:%" or c.isspace() for c in ifname)
    ):
        raise CniError(INVALID_ENVIRONMENT, "invalid CNI_IFNAME",
                       f"{ifname!r}: at most 15 characters, not . or .., no '/', ':', '%' or whitespace")


def _check_version(command: str, config: Mapping[str, Any]) -> str:
    version = config.get("cniVersion")
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f"config is {version!r}, plugin supports {', '.join(SUPPORTED_VERSIONS)}")
    oldest = MIN_VERSION.get(command)
    if oldest and _vtuple(version) < _vtuple(oldest):
        raise CniError(INCOMPATIBLE_VERSION, f"config version does not allow {command}",
                       f"{command} needs cniVersion {oldest} or later, config is {version}")
    return version


def _check_config(config: Mapping[str, Any]) -> str:
    name = config.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise CniError(INVALID_CONFIG, "invalid network name", f"name={name!r}")
    if config.get("type") != PLUGIN_TYPE:
        raise CniError(INVALID_CONFIG, "wrong plugin type",
                       f"type={config.get('type')!r}, want {PLUGIN_TYPE!r}")
    for key in ("agentSocket", "stateDir"):  # absent means the default; the plugin refuses these too
        if key in config and not (isinstance(config[key], str) and config[key]):
            raise CniError(INVALID_CONFIG, f"{key} must be a non-empty string", f"{key}={config[key]!r}")
    prev = config.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "prevResult must be an object", f"prevResult={prev!r}")
    return name


def _valid_attachments(config: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
    """GC's keep-list. libcni also sends the misspelled "cni.dev/attachments" (cni #1101)."""
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
        if key in config:
            raw = config[key] or []  # Go encodes an empty list as null
            break
    else:
        # Refuse rather than treat "absent" as "nothing is valid" and free every lease.
        raise CniError(INVALID_CONFIG, "GC without cni.dev/valid-attachments")
    if not isinstance(raw, list) or not all(
        isinstance(a, dict) and isinstance(a.get("containerID"), str) and isinstance(a.get("ifname"), str)
        for a in raw
    ):
        raise CniError(INVALID_CONFIG, "invalid cni.dev/valid-attachments",
                       "want a list of {containerID, ifname} objects")
    return frozenset((a["containerID"], a["ifname"]) for a in raw)


def parse_request(env: Mapping[str, str], config: Any) -> Request:
    """Validate one invocation in the spec's order: environment, decoding, version, configuration."""
    command = env.get("CNI_COMMAND", "")
    if command not in REQUIRED_ENV:
        raise CniError(INVALID_ENVIRONMENT, "invalid CNI_COMMAND",
                       f"{command!r}, want one of {', '.join(REQUIRED_ENV)}" if command else "missing")
    _check_env(command, env)
    if not isinstance(config, dict):
        raise CniError(DECODING_FAILURE, "network configuration is not a JSON object")
    version = _check_version(command, config)
    name = _check_config(config)
    prev = config.get("prevResult")
    if command == "CHECK" and prev is None:
        raise CniError(INVALID_CONFIG, "CHECK without prevResult")
    return Request(
        command=command,
        cni_version=version,
        network=name,
        config=dict(config),
        container_id=env.get("CNI_CONTAINERID", ""),
        netns=env.get("CNI_NETNS", ""),
        ifname=env.get("CNI_IFNAME", ""),
        args=_parse_args(env.get("CNI_ARGS", "")),
        path=tuple(p for p in env.get("CNI_PATH", "").split(":") if p),
        prev_result=prev,
        valid_attachments=_valid_attachments(config) if command == "GC" else None,
        bandwidth=parse_bandwidth(_runtime_config(config)) if command in ("ADD", "CHECK") else None,
    )


def _runtime_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    rc = config.get("runtimeConfig")
    if rc is not None and not isinstance(rc, dict):
        raise CniError(INVALID_CONFIG, "runtimeConfig must be an object", f"runtimeConfig={rc!r}")
    return rc or {}


# Result fields per spec version; anything else a caller passes is dropped, not passed through.
_INTERFACE_KEYS = {"1.0.0": ("name", "mac", "sandbox"),
                   "1.1.0": ("name", "mac", "mtu", "sandbox", "socketPath", "pciID")}
_IP_KEYS = ("address", "gateway", "interface")
_ROUTE_KEYS = {"1.0.0": ("dst", "gw"), "1.1.0": ("dst", "gw", "mtu", "advmss", "priority", "table", "scope")}


def _pick(item: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The allowed, set fields; addresses (IPv4Address/Interface/Network objects) become strings."""
    picked = {k: item[k] for k in keys if item.get(k) not in (None, "")}
    return {k: v if isinstance(v, int | str) else str(v) for k, v in picked.items()}


def build_result(
    cni_version: str,
    interfaces: Sequence[Mapping[str, Any]],
    ips: Sequence[Mapping[str, Any]],
    routes: Sequence[Mapping[str, Any]] = (),
    dns: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An ADD success result spelled exactly as `cni_version` defines it.

    Entries use the spec's field names (interfaces: name, mac, mtu, sandbox; ips: address in CIDR
    notation, gateway, interface index; routes: dst, gw). Before 1.0.0 every IP carries its
    "version" ("4" or "6"); interface MTUs and route attributes beyond dst/gw exist from 1.1.0 on.
    """
    if cni_version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI versions", f"cannot encode {cni_version!r}")
    spec = "1.1.0" if cni_version == "1.1.0" else "1.0.0"
    legacy = _vtuple(cni_version) < (1, 0, 0)
    result: dict[str, Any] = {
        "cniVersion": cni_version,
        "interfaces": [_pick(i, _INTERFACE_KEYS[spec]) for i in interfaces],
        "ips": [{**({"version": "6" if ":" in str(ip["address"]) else "4"} if legacy else {}), **_pick(ip, _IP_KEYS)}
                for ip in ips],
    }
    if routes:
        result["routes"] = [_pick(r, _ROUTE_KEYS[spec]) for r in routes]
    result["dns"] = dict(dns or {})
    return result


def version_result(cni_version: str = LATEST) -> dict[str, Any]:
    """The VERSION answer (the plugin answers VERSION itself; tests compare it with this)."""
    return {"cniVersion": cni_version, "supportedVersions": list(SUPPORTED_VERSIONS)}


def drain_pending_dels(state_dir: Path) -> list[dict[str, Any]]:
    """Read and remove the DEL requests the plugin parked while the agent was down, oldest first.

    Each is the socket request the plugin could not deliver ({"op": "cni", "env", "config"}); the
    agent replays them before it serves. Unreadable records are logged and removed: a half-written
    one cannot exist (the plugin renames into place), so they are foreign files.
    """
    pending = state_dir / PENDING_DEL_DIR
    try:
        names = sorted(p for p in pending.iterdir() if p.suffix == ".json" and not p.name.startswith("."))
    except FileNotFoundError:
        return []
    requests = []
    for path in names:
        try:
            doc = json.loads(path.read_bytes())
            if not isinstance(doc, dict) or not isinstance(doc.get("env"), dict):
                raise ValueError("not a CNI request")
            requests.append(doc)
        except (OSError, ValueError) as e:
            log.warning("dropping unreadable pending DEL %s: %s", path, e)
        path.unlink(missing_ok=True)
    return requests
