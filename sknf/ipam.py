"""Node-local IPAM: pod addresses from this node's pod subnet, leased per CNI attachment.

Why it works this way:
- One JSON document (`<state_dir>/ipam/leases.json`) holds every lease; each change rewrites it
  atomically (temp + fsync + rename), so a crash leaves the old or the new state, never half.
  Leases are keyed by the CNI attachment (container id, ifname) and carry the whole endpoint
  record (pod, host veth, MAC): the agent rebuilds its datapath from them after a restart.
- Every operation re-reads the document under an exclusive flock on a separate lock file, with
  a per-process threading.Lock around it: the agent's handler threads and any other process
  (tests, `sknf cleanup`) serialise, and nobody works from a stale copy.
- Allocation is round-robin from the last address handed out, so a just-freed IP (whose old
  owner may still be in a peer's ARP/conntrack tables) is the last to be reused.
- Network, gateway (first host, on the bridge) and broadcast are never handed out. Leases
  outside the current pod_cidr (the node's subnet changed) are kept, as the pods still exist,
  but none are made there. The document records pod_cidr for readers without the agent's config.
- A document that does not parse or breaks an invariant raises CorruptStore instead of being
  reset: an empty store would hand out the addresses of running pods. The agent rebuilds it from
  the host's veths with `Store.rebuild`.
"""

from __future__ import annotations

import fcntl
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from sknf import cni
from sknf.fsutil import atomic_write

T = TypeVar("T")
FORMAT_VERSION = 1


class IpamError(cni.CniError):
    """An IPAM failure; a CniError so the agent's socket reports it with its code unchanged."""

    CODE = cni.INTERNAL

    def __init__(self, msg: str, details: str = "") -> None:
        super().__init__(self.CODE, msg, details)


class Exhausted(IpamError):
    CODE = cni.IPAM_EXHAUSTED


class LeaseExists(IpamError):
    """Duplicate ADD: the attachment already holds an address."""

    CODE = cni.ALREADY_EXISTS


class CorruptStore(IpamError):
    CODE = cni.STORE_CORRUPT


@dataclass(frozen=True)
class Lease:
    """One attachment's address and endpoint record (the datapath's Endpoint is built from it)."""

    ip: IPv4Address
    container_id: str
    ifname: str
    namespace: str = ""
    pod: str = ""
    host_ifname: str = ""
    mac: str = ""  # the pod-side MAC (sknf chooses it before the veth exists)
    created: float = 0.0  # unix time

    @property
    def key(self) -> tuple[str, str]:
        return (self.container_id, self.ifname)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ip": str(self.ip)}

    @classmethod
    def from_json(cls, doc: Any) -> Lease:
        if not isinstance(doc, dict):
            raise ValueError(f"lease {doc!r} is not an object")
        fields = {**doc, "ip": IPv4Address(doc["ip"])}
        lease = cls(**fields)
        texts = [lease.container_id, lease.ifname, lease.namespace, lease.pod, lease.host_ifname, lease.mac]
        if not all(isinstance(t, str) for t in texts) or not (lease.container_id and lease.ifname):
            raise ValueError(f"lease {doc!r} has empty or non-text fields")
        if not isinstance(lease.created, int | float):
            raise ValueError(f"lease {doc!r} has a non-numeric created time")
        return lease


class _State(NamedTuple):
    leases: dict[tuple[str, str], Lease]
    last: IPv4Address | None  # the address handed out most recently (round-robin cursor)


class Store:
    """The lease store for one node's pod subnet; safe across threads and processes."""

    def __init__(self, state_dir: Path, pod_cidr: IPv4Network) -> None:
        if pod_cidr.num_addresses < 4:
            raise ValueError(f"pod_cidr {pod_cidr} holds no pod address (need /30 or shorter)")
        self.pod_cidr = pod_cidr
        self.gateway = pod_cidr.network_address + 1
        self.dir = Path(state_dir) / "ipam"
        self.path = self.dir / "leases.json"
        self._lock_path = self.dir / "lock"
        self._mutex = threading.Lock()
        self._first = int(pod_cidr.network_address) + 2
        self._last = int(pod_cidr.broadcast_address) - 1

    @classmethod
    def open_existing(cls, state_dir: Path) -> Store:
        """The store for the subnet the agent last saved, for readers without its config (`sknf stats`).

        Raises FileNotFoundError when no agent has written one, CorruptStore when it is unreadable.
        """
        path = Path(state_dir) / "ipam" / "leases.json"
        try:
            pod_cidr = IPv4Network(json.loads(path.read_bytes())["pod_cidr"])
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptStore(f"IPAM store {path} is unreadable", str(e)) from None
        return cls(state_dir, pod_cidr)

    @property
    def capacity(self) -> int:
        """Addresses pods can get: all but network, gateway and broadcast."""
        return self._last - self._first + 1

    @property
    def allocated(self) -> int:
        return len(self._read(lambda s: s.leases))

    # -- storage ---------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._mutex:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self._lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> _State:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return _State({}, None)  # first start on this node
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
                raise ValueError(f"not a version {FORMAT_VERSION} lease document")
            if not isinstance(doc.get("leases"), list):
                raise ValueError("leases is not a list")
            leases = [Lease.from_json(item) for item in doc["leases"]]
            last = IPv4Address(doc["last"]) if doc.get("last") is not None else None
            return _State(self._index(leases), last)
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptStore(f"IPAM store {self.path} is unreadable", str(e)) from None

    def _index(self, leases: Iterable[Lease]) -> dict[tuple[str, str], Lease]:
        """Key the leases, refusing duplicates and reserved addresses (both mean corruption)."""
        by_key: dict[tuple[str, str], Lease] = {}
        ips: set[IPv4Address] = set()
        for lease in leases:
            if lease.key in by_key:
                raise ValueError(f"attachment {lease.key} leased twice")
            if lease.ip in ips:
                raise ValueError(f"{lease.ip} leased twice")
            if lease.ip in self.pod_cidr and not self._first <= int(lease.ip) <= self._last:
                raise ValueError(f"reserved address {lease.ip} is leased")
            by_key[lease.key] = lease
            ips.add(lease.ip)
        return by_key

    def _save(self, state: _State) -> None:
        doc = {
            "version": FORMAT_VERSION,
            "pod_cidr": str(self.pod_cidr),  # for open_existing; leases outside it (old subnet) stay
            "last": str(state.last) if state.last else None,
            "leases": [lease.to_json() for lease in sorted(state.leases.values(), key=lambda x: x.ip)],
        }
        atomic_write(self.path, json.dumps(doc, indent=1).encode(), mode=0o600)

    def _read(self, fn: Callable[[_State], T]) -> T:
        with self._locked():
            return fn(self._load())

    # -- operations ------------------------------------------------------------------------------

    def allocate(self, container_id: str, ifname: str, namespace: str = "", pod: str = "",
                 host_ifname: str = "", mac: str = "") -> Lease:
        """Lease the next free address after the last one handed out (wrapping)."""
        with self._locked():
            state = self._load()
            if (container_id, ifname) in state.leases:
                held = state.leases[(container_id, ifname)]
                raise LeaseExists(f"attachment {container_id}/{ifname} already holds {held.ip}",
                                  "duplicate ADD without DEL")
            taken = {int(lease.ip) for lease in state.leases.values()}
            last = state.last
            cursor = int(last) if last is not None and last in self.pod_cidr else self._first - 1
            for step in range(1, self.capacity + 1):
                candidate = self._first + (cursor - self._first + step) % self.capacity
                if candidate not in taken:
                    break
            else:
                raise Exhausted(f"no free address in pod subnet {self.pod_cidr}",
                                f"all {self.capacity} addresses are leased")
            lease = Lease(IPv4Address(candidate), container_id, ifname, namespace, pod, host_ifname, mac,
                          created=time.time())
            self._save(_State({**state.leases, lease.key: lease}, lease.ip))
            return lease

    def release(self, container_id: str, ifname: str) -> Lease | None:
        """Free the attachment's address; a second release is a no-op (DEL is idempotent)."""
        with self._locked():
            state = self._load()
            lease = state.leases.pop((container_id, ifname), None)
            if lease is not None:
                self._save(state)
            return lease

    def get(self, container_id: str, ifname: str) -> Lease | None:
        return self._read(lambda s: s.leases.get((container_id, ifname)))

    def leases(self) -> list[Lease]:
        return self._read(lambda s: sorted(s.leases.values(), key=lambda x: x.ip))

    def gc(self, valid: Iterable[tuple[str, str]]) -> list[Lease]:
        """Free every lease whose (container id, ifname) is not in `valid`; return the freed ones."""
        keep = set(valid)
        with self._locked():
            state = self._load()
            freed = [lease for key, lease in state.leases.items() if key not in keep]
            if freed:
                kept = {key: lease for key, lease in state.leases.items() if key in keep}
                self._save(state._replace(leases=kept))
            return sorted(freed, key=lambda x: x.ip)

    def rebuild(self, leases: Iterable[Lease]) -> None:
        """Replace the whole document (after CorruptStore) with leases found on the host."""
        with self._locked():
            try:
                index = self._index(leases)
            except ValueError as e:
                raise IpamError("cannot rebuild the IPAM store", str(e)) from None
            ours = [lease.ip for lease in index.values() if lease.ip in self.pod_cidr]
            self._save(_State(index, max(ours, default=None)))


class Carved(NamedTuple):
    subnet: IPv4Network
    replaced: IPv4Network | None  # the remembered subnet that now collided, or None


def carve_subnet(cluster_cidr: IPv4Network, prefixlen: int, taken: Iterable[IPv4Network],
                 state_dir: Path) -> Carved:
    """This node's pod subnet when nobody assigned one: the lowest free /prefixlen of the cluster.

    The choice is remembered in `<state_dir>/ipam/subnet` so a restart keeps it (the node's pods
    hold addresses from it). If the remembered subnet now overlaps another node's, or no longer
    fits the cluster CIDR, a new one is carved and `replaced` names the old one: the caller must
    treat the leases from it as lost.
    """
    taken = [t for t in taken if t.overlaps(cluster_cidr)]
    memo = Path(state_dir) / "ipam" / "subnet"
    remembered: IPv4Network | None = None
    try:
        remembered = IPv4Network(memo.read_text().strip())
    except FileNotFoundError:
        pass
    except ValueError as e:
        raise CorruptStore(f"remembered pod subnet {memo} is unreadable", str(e)) from None
    if (remembered is not None and remembered.prefixlen == prefixlen and remembered.subnet_of(cluster_cidr)
            and not any(remembered.overlaps(t) for t in taken)):
        return Carved(remembered, None)
    subnet = next((s for s in cluster_cidr.subnets(new_prefix=prefixlen)
                   if not any(s.overlaps(t) for t in taken)), None)
    if subnet is None:
        raise Exhausted(f"no free /{prefixlen} left in cluster CIDR {cluster_cidr}",
                        f"{len(taken)} node subnets are taken")
    atomic_write(memo, f"{subnet}\n".encode())
    return Carved(subnet, remembered)
