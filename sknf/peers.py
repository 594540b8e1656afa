"""Where the agent learns about the other nodes of the cluster (the overlay peers).

A peer source yields the full current set of nodes; the overlay reconciler diffs that against what
the kernel holds. Two sources: a static YAML file (lab, bare metal, tests), re-read when it changes,
and the Kubernetes Node objects (`sknf.kube`).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import yaml

from sknf.config import Network, networks

if TYPE_CHECKING:
    from sknf.wakeup import Wakeup


@dataclass(frozen=True)
class Node:
    """One cluster node as the overlay needs it."""

    name: str
    underlay_ip: str  # the VTEP address: VXLAN packets for this node's pods go here
    pod_cidr: str | None = None  # the node's pod subnets when known, one per family, comma-separated, IPv4 first
    vtep_mac: str | None = None
    mtu: int | None = None  # the node's pod/overlay MTU, as it publishes it (`sknf doctor` compares them)


def pod_subnets(text: str | None) -> tuple[Network, ...]:
    """A Node's pod subnets from its `pod_cidr` text (one per family, comma-separated), IPv4 first."""
    if not text:
        return ()
    return tuple(sorted((ipaddress.ip_network(part.strip()) for part in text.split(",")), key=lambda n: n.version))


def join_subnets(nets: Iterable[Network]) -> str | None:
    """The `pod_cidr` text of one subnet per family, IPv4 first; None for none."""
    return ",".join(str(n) for n in sorted(nets, key=lambda n: n.version)) or None


def subnet_of(node: Node, family: int) -> Network | None:
    """The node's pod subnet of one family, None when unknown."""
    return next((n for n in pod_subnets(node.pod_cidr) if n.version == family), None)


class PeerSource(Protocol):
    def nodes(self) -> list[Node]:
        """All nodes currently known (this node included, when the source lists it)."""

    def changed(self) -> bool:
        """True when nodes() may return something new since the last call to nodes()."""

    def publish_self(self, node: Node) -> None:
        """Make this node's facts visible to the others (no-op where the source is read-only)."""

    def watch(self, wakeup: Wakeup) -> None:
        """From now on, wake `wakeup` whenever changed() may have become true."""


# libyaml's safe loader when PyYAML has it: 0.1 s instead of 0.6 s for a 5,000-node file.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class PeersFileError(ValueError):
    """The static peers file is unreadable or malformed; the message names the file and entry."""


def underlay_address(raw: object, family: int) -> str:
    """A node's underlay address in canonical text, which must be of the cluster's underlay family (one
    VXLAN device cannot reach both); ValueError saying which family was expected."""
    ip = ipaddress.ip_address(str(raw).strip())
    if ip.version != family:
        raise ValueError(f"underlay_ip {ip} is not an IPv{family} address (underlay_family is {family})")
    return str(ip)


def parse_nodes(doc: object, where: str, family: int = 4) -> list[Node]:
    """Validate a peers document: {nodes: [{name, underlay_ip, pod_cidr?, vtep_mac?, mtu?}, ...]}, every
    underlay_ip of the underlay family."""
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        raise PeersFileError(f"{where}: expected a mapping with a 'nodes' list")
    out: list[Node] = []
    for i, entry in enumerate(doc["nodes"]):
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("underlay_ip"):
            raise PeersFileError(f"{where}: nodes[{i}] needs 'name' and 'underlay_ip'")
        try:
            ip = underlay_address(entry["underlay_ip"], family)
            cidr = entry.get("pod_cidr")
            cidr = join_subnets(networks(cidr, "pod_cidr")) if cidr else None
        except ValueError as e:  # ConfigError included
            raise PeersFileError(f"{where}: nodes[{i}] ({entry['name']}): {e}") from None
        mtu = entry.get("mtu")
        if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int) or not 576 <= mtu <= 9000):
            raise PeersFileError(f"{where}: nodes[{i}] ({entry['name']}): mtu {mtu!r} is not an MTU (576-9000)")
        out.append(Node(name=str(entry["name"]), underlay_ip=ip, pod_cidr=cidr, vtep_mac=entry.get("vtep_mac"),
                        mtu=mtu))
    return out


class StaticPeerSource:
    """Nodes from a YAML file; re-read when it is replaced (inode) or its mtime or size changes."""

    def __init__(self, path: Path, family: int = 4) -> None:
        self.path = path
        self.family = family  # of the underlay: every node's underlay_ip must be one
        self._stamp: tuple[int, int, int] | None = None

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def changed(self) -> bool:
        return self._current_stamp() != self._stamp

    def nodes(self) -> list[Node]:
        self._stamp = self._current_stamp()
        try:
            doc = yaml.load(self.path.read_text(), Loader=SAFE_LOADER)
        except OSError as e:
            raise PeersFileError(f"{self.path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise PeersFileError(f"{self.path}: not valid YAML: {e}") from None
        return parse_nodes(doc, str(self.path), self.family)

    def publish_self(self, node: Node) -> None:
        """The file is written by whoever lays out the cluster; nothing to publish."""

    def watch(self, wakeup: Wakeup) -> None:
        """inotify on the file's directory: writers rename into place, a ConfigMap swaps a symlink there."""
        wakeup.watch_dir(self.path.parent)
