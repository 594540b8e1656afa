"""Node-local IPAM: pod addresses from this node's pod subnets, leased per CNI attachment.

Dual-stack: the store has one pod subnet per family, and a lease holds one address of each (`ip`, the
IPv4 one, and `ip6`; an IPv6-only store's `ip` is IPv6). The lease file is linked under every address
it holds, IPv4 first: the link of the last address is the commit, and a release unlinks it first. A
lease linked under only some of its addresses is one a writer died in the middle of: it is no lease
(lookups ignore it) and the next full read removes its names. So allocation is atomic across the
families: exhaustion of one leaves nothing in the other.

Leases are keyed by the CNI attachment (container id, ifname) and carry the whole endpoint record
(pod, host veth, MAC): the agent rebuilds its datapath from them after a restart. One file per
lease, as the reference `host-local` plugin keeps them, so an ADD or DEL writes and parses one
small file whatever the number of pods (one document holding every lease made an ADD cost 1 ms
at 30 pods and over 80 ms at 5,000; docs/performance.md). On disk, in `<state_dir>/ipam/`:

    ips/<address>          the lease (JSON), once per address it holds. The name existing IS the lease:
                           allocation probes names.
    keys/<cid>@<ifname>    a hard link to the same file, so get/release open it without a scan. Live
                           only while ips/<its address> is the same inode; otherwise stale, "no lease".
                           (cid and ifname are %-quoted: no '/', and '@' only as the separator.)
    last                   the round-robin cursor: JSON with the "ip" (and "ip6") handed out last. A hard
                           link to that lease's file (it outlives the lease; only "ip" and "ip6" are read).
    store.json             {"version": 2, "pod_cidr": ...} for readers without the agent's config
                           (comma-separated subnets when dual-stack).
    lock                   the flock target.  rebuilding: exists only while rebuild replaces every lease.
    leases.json            version 1 (one document for all leases): converted on first use, then removed.

Nothing is written in place. A lease is written to a temp file (dot name, ignored by readers) and
fsynced; every other name is a hard link to that complete file. link() fails when the name exists,
so two writers never share an address. Hard links, not symlinks or copies: creating an inode cost
0.2-1 ms on a busy ext4 disk, and an allocation creates one (symlinks made three: 2.5 ms, not 1.1).

What a crash (killed process or power loss) at each point leaves; success is reported last:
  allocate  1. temp written and fsynced: a dead temp file, removed by the next full read.
            2. temp linked as keys/K (replacing a stale K), keys/ fsynced: a key whose inode is not
               ips/<its address> is stale and reads as "no lease"; the next allocate of K replaces
               it, the next full read removes it.
            3. temp linked as ips/A (then as ips/A6: the last link is the commit). The lease is complete
               and its key already durable. A crash between the two links leaves a half lease: not a
               lease for lookups, its name removed by the next full read.
            4. cursor linked as .last.new and renamed to last (old or new, never none), temp removed,
               ips/ fsynced, success. The runtime saw no success before this: its retried ADD gets
               LeaseExists, its DEL frees the lease. The cursor is not fsynced on its own: a power
               cut may take round-robin back a step, nothing more.
  release   unlink ips/A6 (the commit), ips/A, keys/K, fsync ips/. In between: a half lease or a stale key,
            as in 3 and 2.
  rebuild   `rebuilding` is created and fsynced before the first old entry goes, and removed once
            every new entry is durable: a crash in between makes every operation raise CorruptStore,
            so the agent rebuilds from the host again instead of trusting half a set.
  migration a rebuild from the old document, which is removed last: interrupted, it runs again.
So no crash leaves a torn lease read as valid, one address leased twice (one name per address),
or a reported lease without its file and key. tests/unit/test_ipam.py kills a process before
every file-system call of each operation to check this table.

Every operation runs under an exclusive flock, with a per-process threading.Lock around it: the
agent's handler threads and other processes (tests, `sknf stats`) serialise, and a temp file
found under the lock belongs to a dead writer. Allocation is round-robin from the cursor, so a
just-freed IP (whose old owner may still be in a peer's ARP/conntrack tables) is the last to be
reused. Network, gateway (first host, on the bridge) and broadcast are never handed out. Leases
outside the current pod_cidr (the node's subnet changed) are kept, as the pods still exist, but
none are made there.

Damage is reported (CorruptStore), never taken for "no lease": an empty store would hand out the
addresses of running pods; the agent rebuilds it from the host's veths with `Store.rebuild`.
allocate/get/release read only the entries they use, and allocation takes any existing name as
taken, so an unreadable lease is never reused. The full read (`leases`, `gc`; the agent samples
it every second) checks every entry: a name that is not an address, content that does not parse
or names another address, a reserved address, two leases of one attachment or a lease without
its key raise CorruptStore; so do a key holding another attachment's lease, an unreadable
cursor, an interrupted rebuild and an unreadable old document.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

from sknf import cni
from sknf.fsutil import atomic_write, fsync_dir

FORMAT_VERSION = 2
# A directory's mtime is stamped from a coarse clock: two changes within one tick share it. A read is
# trusted as current only when the directories were last changed longer ago than this (as git does
# for racily clean files); until then every call reads again.
MTIME_SLACK_NS = 1_000_000_000
LEGACY_VERSION = 1  # leases.json: every lease in one document
Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


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
    """One attachment's addresses and endpoint record (the datapath's Endpoint is built from it)."""

    ip: Address  # the IPv4 address; in an IPv6-only store the IPv6 one
    container_id: str
    ifname: str
    namespace: str = ""
    pod: str = ""
    host_ifname: str = ""
    mac: str = ""  # the pod-side MAC (sknf chooses it before the veth exists)
    created: float = 0.0  # unix time
    netns: str = ""  # the pod's network namespace as the runtime named it (reconciling the pod's end)
    ip6: IPv6Address | None = None  # the IPv6 address beside the IPv4 `ip` (dual-stack)

    @property
    def key(self) -> tuple[str, str]:
        return (self.container_id, self.ifname)

    @property
    def ips(self) -> tuple[Address, ...]:
        """Every address of the lease, IPv4 first (the order their names are linked in)."""
        return (self.ip,) if self.ip6 is None else (self.ip, self.ip6)

    def address(self, family: int) -> Address | None:
        return next((ip for ip in self.ips if ip.version == family), None)

    def to_json(self) -> dict[str, Any]:
        doc = {**asdict(self), "ip": str(self.ip), "ip6": str(self.ip6)}
        if self.ip6 is None:  # single-stack leases are written as before dual-stack
            del doc["ip6"]
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> Lease:
        if not isinstance(doc, dict):
            raise ValueError(f"lease {doc!r} is not an object")
        fields = {**doc, "ip": ip_address(doc["ip"])}
        if doc.get("ip6") is not None:
            fields["ip6"] = IPv6Address(doc["ip6"])
            if fields["ip"].version != 4:
                raise ValueError(f"lease {doc!r} has two IPv6 addresses")
        lease = cls(**fields)
        texts = [lease.container_id, lease.ifname, lease.namespace, lease.pod, lease.host_ifname, lease.mac,
                 lease.netns]
        if not all(isinstance(t, str) for t in texts) or not (lease.container_id and lease.ifname):
            raise ValueError(f"lease {doc!r} has empty or non-text fields")
        if not isinstance(lease.created, int | float):
            raise ValueError(f"lease {doc!r} has a non-numeric created time")
        return lease


@functools.lru_cache(maxsize=8192)
def _parse(raw: bytes) -> Lease:
    """A lease file's content. Cached (it is a pure function of the bytes): the full read, every
    second in the agent, then parses only the leases it has not seen (a third of its cost)."""
    return Lease.from_json(json.loads(raw))


def _link(source: Path | str, name: Path | str) -> None:
    """Make `name` a hard link to `source`, replacing what is there (the caller holds the lock)."""
    try:
        os.link(source, name)
    except FileExistsError:
        os.unlink(name)
        os.link(source, name)


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


_PLAIN = re.compile(r"[A-Za-z0-9_.~-]+")  # what quote() leaves alone: real ids need no quoting


def _key_name(key: tuple[str, str]) -> str:
    """keys/ entry of an attachment: '/' cannot occur, '@' only as the separator."""
    cid, ifname = (part if _PLAIN.fullmatch(part) else quote(part, safe="") for part in key)
    return f"{cid}@{ifname}"


class Pool:
    """One family's pod subnet: network, gateway (first host, on the bridge) and broadcast (IPv4) or
    all-ones (IPv6) are never handed out."""

    def __init__(self, subnet: Network) -> None:
        if subnet.num_addresses < 4:
            raise ValueError(f"pod_cidr {subnet} holds no pod address (need /{subnet.max_prefixlen - 2} or shorter)")
        self.subnet = subnet
        self.first = int(subnet.network_address) + 2
        self.last = int(subnet.broadcast_address) - 1
        self.capacity = self.last - self.first + 1
        self._address = type(subnet.network_address)

    def reserved(self, ip: Address) -> bool:
        return ip in self.subnet and not self.first <= int(ip) <= self.last

    def after(self, cursor: Address | None) -> Iterator[Address]:
        """Every address of the pool, round-robin from the one after `cursor` (wrapping)."""
        start = int(cursor) if cursor is not None and self.first - 1 <= int(cursor) <= self.last else self.first - 1
        for step in range(1, self.capacity + 1):
            yield self._address(self.first + (start - self.first + step) % self.capacity)


class _Taken(Exception):
    """_commit found the lease's address number `index` leased (by a writer behind the lock's back)."""

    def __init__(self, index: int) -> None:
        self.index = index


def _subnets(pod_cidr: Network | Iterable[Network]) -> tuple[Network, ...]:
    nets = (pod_cidr,) if isinstance(pod_cidr, IPv4Network | IPv6Network) else tuple(pod_cidr)
    if not nets or len({n.version for n in nets}) != len(nets):
        raise ValueError(f"pod subnets {nets} must be one per family")
    return tuple(sorted(nets, key=lambda n: n.version))


class Store:
    """The lease store for one node's pod subnets (one per family); safe across threads and processes."""

    def __init__(self, state_dir: Path, pod_cidr: Network | Iterable[Network]) -> None:
        self.pod_cidrs = _subnets(pod_cidr)
        self.pools = [Pool(net) for net in self.pod_cidrs]
        self.pod_cidr = self.pod_cidrs[0]
        self.gateway = self.pod_cidr.network_address + 1
        self.dir = Path(state_dir) / "ipam"
        self.path = self.dir / "store.json"
        self._ips = self.dir / "ips"
        self._keys = self.dir / "keys"
        self._cursor_path = self.dir / "last"
        self._marker = self.dir / "rebuilding"
        self._legacy = self.dir / "leases.json"
        self._lock_path = self.dir / "lock"
        self._mutex = threading.Lock()
        self._seen: tuple[tuple[tuple[int, int], ...] | None, list[Lease]] = (None, [])  # current()'s last read

    @classmethod
    def open_existing(cls, state_dir: Path) -> Store:
        """The store for the subnet the agent last saved, for readers without its config (`sknf stats`).

        Raises FileNotFoundError when no agent has written one, CorruptStore when it is unreadable.
        """
        base = Path(state_dir) / "ipam"
        for path in (base / "store.json", base / "leases.json"):  # the old document until its conversion
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                continue
            try:
                return cls(state_dir, [ip_network(part) for part in json.loads(raw)["pod_cidr"].split(",")])
            except (ValueError, KeyError, TypeError) as e:
                raise CorruptStore(f"IPAM store {path} is unreadable", str(e)) from None
        raise FileNotFoundError(errno.ENOENT, "no IPAM store", str(base / "store.json"))

    @property
    def capacity(self) -> int:
        """Attachments the store can lease: the addresses of its smallest pool, all but network, gateway
        and broadcast."""
        return min(pool.capacity for pool in self.pools)

    @property
    def allocated(self) -> int:
        """Leases held: addresses of the family holding most (names only: cheap enough for every STATUS)."""
        with self._locked():
            names = [name for name in os.listdir(self._ips) if not name.startswith(".")]
        v6 = sum(1 for name in names if ":" in name)
        return max(len(names) - v6, v6)

    # -- storage ---------------------------------------------------------------------------------

    @contextmanager
    def _locked(self, recover: bool = True) -> Iterator[None]:
        """Exclusive access; first converts an old document and refuses an interrupted rebuild."""
        with self._mutex:
            self._ips.mkdir(parents=True, exist_ok=True)
            self._keys.mkdir(exist_ok=True)
            with open(self._lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    if recover:
                        self._migrate()
                        if self._marker.exists():
                            raise CorruptStore(f"IPAM store {self.dir} is incomplete",
                                               f"a rebuild was interrupted ({self._marker} exists)")
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def _key_path(self, key: tuple[str, str]) -> Path:
        return self._keys / _key_name(key)

    def _load(self, path: str) -> tuple[Lease, int]:
        """The lease in a file of the store, and the file's inode; FileNotFoundError when none is.

        Plain os calls: the full read does this for every lease (pathlib would double its cost).
        """
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                return _parse(os.read(fd, 1 << 16)), os.fstat(fd).st_ino
            finally:
                os.close(fd)
        except (ValueError, KeyError, TypeError, IsADirectoryError) as e:
            raise CorruptStore(f"IPAM lease {path} is unreadable", str(e)) from None

    def _lookup(self, key: tuple[str, str]) -> Lease | None:
        """The attachment's lease through its key; a stale key (see the crash table) is no lease."""
        path = str(self._key_path(key))
        try:
            lease, inode = self._load(path)
        except FileNotFoundError:
            return None
        if lease.key != key:  # a key is only ever linked to its own attachment's lease
            raise CorruptStore(f"IPAM key {path} is inconsistent", f"it holds the lease of {lease.key}")
        return lease if all(_inode(f"{self._ips}/{ip}") == inode for ip in lease.ips) else None

    def _read_all(self) -> list[Lease]:
        """Every lease, each checked; removes what dead writers left (temp files, half leases, stale keys)."""
        named = []
        for name in os.listdir(self._ips):
            if name.startswith("."):
                os.unlink(f"{self._ips}/{name}")
            else:
                named.append((name, *self._load(f"{self._ips}/{name}")))  # listed under the lock: it exists
        names: dict[int, set[str]] = {}
        for name, _, inode in named:
            names.setdefault(inode, set()).add(name)
        found = []
        for name, lease, inode in named:
            if name not in {str(ip) for ip in lease.ips}:
                raise CorruptStore(f"IPAM store {self.dir} is inconsistent",
                                   f"ips/{name} holds the lease of {lease.ip}")
            if names[inode] == {str(ip) for ip in lease.ips}:
                if str(lease.ip) == name:
                    found.append((name, lease, inode))
            else:  # a half lease: a writer died between its names (see the crash table)
                os.unlink(f"{self._ips}/{name}")
        keys = set(os.listdir(self._keys))
        try:
            self._index(lease for _, lease, _ in found)
            for _, lease, inode in found:
                key = _key_name(lease.key)
                keys.discard(key)
                if _inode(f"{self._keys}/{key}") != inode:
                    raise ValueError(f"the lease of {lease.ip} has no key {key}")
        except ValueError as e:
            raise CorruptStore(f"IPAM store {self.dir} is inconsistent", str(e)) from None
        for key in keys:
            os.unlink(f"{self._keys}/{key}")
        return sorted((lease for _, lease, _ in found), key=lambda x: (x.ip.version, int(x.ip)))

    def _index(self, leases: Iterable[Lease]) -> dict[tuple[str, str], Lease]:
        """Key the leases, refusing duplicates and reserved addresses (both mean corruption)."""
        by_key: dict[tuple[str, str], Lease] = {}
        ips: set[Address] = set()
        for lease in leases:
            if lease.key in by_key:
                raise ValueError(f"attachment {lease.key} leased twice")
            for ip in lease.ips:
                if ip in ips:
                    raise ValueError(f"{ip} leased twice")
                if any(pool.reserved(ip) for pool in self.pools):
                    raise ValueError(f"reserved address {ip} is leased")
                ips.add(ip)
            by_key[lease.key] = lease
        return by_key

    def _commit(self, lease: Lease, durable_key: bool = True) -> None:
        """The lease file, linked as its key, then as each address; _Taken (no address stored) when one
        is taken.

        durable_key=False leaves the keys/ fsync to the caller: a rebuild, behind its marker, syncs
        the directory once instead of once per lease (1.6 ms each on a busy disk).
        """
        fd, tmp = tempfile.mkstemp(dir=self._ips, prefix=".new-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(lease.to_json()).encode())
                f.flush()
                os.fsync(f.fileno())
            _link(tmp, self._key_path(lease.key))
            if durable_key:
                fsync_dir(self._keys)  # the key is durable before the lease it finds exists
            linked: list[Path] = []
            for index, ip in enumerate(lease.ips):  # the last link is the commit
                try:
                    os.link(tmp, self._ips / str(ip))
                except FileExistsError:
                    for path in linked:
                        os.unlink(path)
                    raise _Taken(index) from None
                linked.append(self._ips / str(ip))
        finally:
            os.unlink(tmp)

    def _cursor(self) -> list[Address]:
        """The addresses handed out last (none at first)."""
        try:
            doc = json.loads(self._cursor_path.read_bytes())
            return [ip_address(doc[k]) for k in ("ip", "ip6") if doc.get(k) is not None]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptStore(f"IPAM cursor {self._cursor_path} is unreadable", str(e)) from None

    def _free(self, pool: Pool, cursor: list[Address]) -> Iterator[Address]:
        """Unleased addresses of one pool, round-robin from the cursor (wrapping)."""
        for ip in pool.after(next((c for c in cursor if c.version == pool.subnet.version), None)):
            if not os.path.lexists(self._ips / str(ip)):
                yield ip

    def _save_pod_cidr(self, pod_cidrs: tuple[Network, ...]) -> None:
        doc = json.dumps({"version": FORMAT_VERSION, "pod_cidr": ",".join(map(str, pod_cidrs))}).encode()
        try:
            if self.path.read_bytes() == doc:
                return
        except FileNotFoundError:
            pass
        atomic_write(self.path, doc, mode=0o600)

    def _replace(self, leases: Iterable[Lease], last: list[Address], pod_cidrs: tuple[Network, ...]) -> None:
        """Make `leases` the whole store, behind the `rebuilding` marker (see the crash table)."""
        index = self._index(leases)  # ValueError before anything changes
        self._marker.touch()
        fsync_dir(self.dir)
        for directory in (self._ips, self._keys):
            for name in os.listdir(directory):
                os.unlink(directory / name)
        for lease in index.values():
            self._commit(lease, durable_key=False)
        if not last:
            self._cursor_path.unlink(missing_ok=True)
        else:  # the old document's cursor need not be a leased address
            cursor = dict(zip(("ip", "ip6"), map(str, last), strict=False))
            atomic_write(self._cursor_path, json.dumps(cursor).encode(), mode=0o600)
        self._save_pod_cidr(pod_cidrs)
        fsync_dir(self._ips)
        fsync_dir(self._keys)
        self._marker.unlink()
        self._legacy.unlink(missing_ok=True)
        fsync_dir(self.dir)

    def _migrate(self) -> None:
        """Convert a version 1 document once; an unreadable one stays, for inspection and rebuild."""
        try:
            raw = self._legacy.read_bytes()
        except FileNotFoundError:
            return
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("version") != LEGACY_VERSION:
                raise ValueError(f"not a version {LEGACY_VERSION} lease document")
            if not isinstance(doc.get("leases"), list):
                raise ValueError("leases is not a list")
            leases = [Lease.from_json(item) for item in doc["leases"]]
            last = [IPv4Address(doc["last"])] if doc.get("last") is not None else []
            self._replace(leases, last, (IPv4Network(doc.get("pod_cidr", str(self.pod_cidr))),))
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptStore(f"IPAM store {self._legacy} is unreadable", str(e)) from None

    def _drop(self, lease: Lease) -> None:
        """Unlink the lease's names, the commit (its last address) first, then its key (checked: this
        lease's); the caller fsyncs ips/."""
        for ip in reversed(lease.ips):
            os.unlink(self._ips / str(ip))
        self._key_path(lease.key).unlink(missing_ok=True)

    # -- operations ------------------------------------------------------------------------------

    def allocate(self, container_id: str, ifname: str, namespace: str = "", pod: str = "",
                 host_ifname: str = "", mac: str = "", netns: str = "") -> Lease:
        """Lease the next free address of each family after the last ones handed out (wrapping)."""
        with self._locked():
            held = self._lookup((container_id, ifname))
            if held is not None:
                raise LeaseExists(f"attachment {container_id}/{ifname} already holds "
                                  f"{', '.join(map(str, held.ips))}", "duplicate ADD without DEL")
            self._save_pod_cidr(self.pod_cidrs)
            cursor = self._cursor()
            free = [self._free(pool, cursor) for pool in self.pools]
            picks = [next(f, None) for f in free]
            while True:
                for pool, ip in zip(self.pools, picks, strict=True):
                    if ip is None:  # nothing is stored yet: the other family leaks nothing
                        raise Exhausted(f"no free address in pod subnet {pool.subnet}",
                                        f"all {pool.capacity} addresses are leased")
                lease = Lease(picks[0], container_id, ifname, namespace, pod, host_ifname, mac, created=time.time(),
                              netns=netns, ip6=picks[1] if len(picks) > 1 else None)
                try:
                    self._commit(lease)
                except _Taken as e:  # taken behind the lock's back: the link refused to share it
                    picks[e.index] = next(free[e.index], None)
                    continue
                _link(self._ips / str(lease.ip), self.dir / ".last.new")  # a new name, then one rename:
                os.replace(self.dir / ".last.new", self._cursor_path)  # never without a cursor
                fsync_dir(self._ips)
                return lease

    def release(self, container_id: str, ifname: str) -> Lease | None:
        """Free the attachment's address; a second release is a no-op (DEL is idempotent)."""
        with self._locked():
            lease = self._lookup((container_id, ifname))
            if lease is not None:
                self._drop(lease)
                fsync_dir(self._ips)
            return lease

    def get(self, container_id: str, ifname: str) -> Lease | None:
        with self._locked():
            return self._lookup((container_id, ifname))

    def of_container(self, container_id: str) -> list[Lease]:
        """The leases of every attachment of one container (its interfaces), without reading the others."""
        prefix = _key_name((container_id, "")).rpartition("@")[0] + "@"
        with self._locked():
            found = []
            for name in os.listdir(self._keys):
                if name.startswith(prefix):
                    try:
                        lease, _ = self._load(f"{self._keys}/{name}")
                    except FileNotFoundError:
                        continue
                    if lease.container_id == container_id and (lease := self._lookup(lease.key)) is not None:
                        found.append(lease)
            return sorted(found, key=lambda x: x.ifname)

    def leases(self) -> list[Lease]:
        with self._locked():
            return self._read_all()

    def current(self) -> list[Lease]:
        """The leases, read again only when the store's directories changed since the last call: for
        the 1 s stats sampler and scrapes (reading every lease cost ~15 ms at 1,000 pods, 90 ms at
        5,000). Every change to the store adds, removes or renames an entry in them, which stamps
        their mtime; a lease file edited in place by hand goes unseen here until the reconcile's full
        read (`leases()`) finds it."""
        stamp = self._dir_stamp()  # before the read: a change during it makes the next call read again
        seen, leases = self._seen  # one attribute: scrapes and the sampler call from several threads
        if stamp is not None and stamp == seen:
            return list(leases)
        leases = self.leases()
        trusted = stamp is not None and time.time_ns() - max(mtime for _, mtime in stamp) > MTIME_SLACK_NS
        self._seen = (stamp if trusted else None, leases)
        return list(leases)

    def _dir_stamp(self) -> tuple[tuple[int, int], ...] | None:
        try:
            return tuple((st.st_ino, st.st_mtime_ns) for st in map(os.stat, (self.dir, self._ips, self._keys)))
        except FileNotFoundError:
            return None

    def gc(self, valid: Iterable[tuple[str, str]]) -> list[Lease]:
        """Free every lease whose (container id, ifname) is not in `valid`; return the freed ones."""
        keep = set(valid)
        with self._locked():
            freed = [lease for lease in self._read_all() if lease.key not in keep]
            for lease in freed:
                self._drop(lease)
            if freed:
                fsync_dir(self._ips)
            return freed

    def rebuild(self, leases: Iterable[Lease]) -> None:
        """Replace every lease (after CorruptStore) with the leases found on the host."""
        leases = list(leases)
        with self._locked(recover=False):
            ours = [lease for lease in leases if lease.ip in self.pod_cidr]
            last = list(max(ours, key=lambda x: int(x.ip)).ips) if ours else []
            try:
                self._replace(leases, last, self.pod_cidrs)
            except ValueError as e:
                raise IpamError("cannot rebuild the IPAM store", str(e)) from None


class Carved(NamedTuple):
    subnet: Network
    replaced: Network | None  # the remembered subnet that now collided, or None


def carve_subnet(cluster_cidr: Network, prefixlen: int, taken: Iterable[Network], state_dir: Path) -> Carved:
    """This node's pod subnet when nobody assigned one: the lowest free /prefixlen of the cluster.

    The choice is remembered in `<state_dir>/ipam/subnet` (`subnet6` for IPv6) so a restart keeps it (the node's pods
    hold addresses from it). If the remembered subnet now overlaps another node's, or no longer
    fits the cluster CIDR, a new one is carved and `replaced` names the old one: the caller must
    treat the leases from it as lost.
    """
    taken = [t for t in taken if t.version == cluster_cidr.version and t.overlaps(cluster_cidr)]
    memo = Path(state_dir) / "ipam" / ("subnet6" if cluster_cidr.version == 6 else "subnet")
    remembered: Network | None = None
    try:
        remembered = ip_network(memo.read_text().strip())
    except FileNotFoundError:
        pass
    except ValueError as e:
        raise CorruptStore(f"remembered pod subnet {memo} is unreadable", str(e)) from None
    if (remembered is not None and remembered.version == cluster_cidr.version and remembered.prefixlen == prefixlen
            and remembered.subnet_of(cluster_cidr)
            and not any(remembered.overlaps(t) for t in taken)):
        return Carved(remembered, None)
    subnet = next((s for s in cluster_cidr.subnets(new_prefix=prefixlen)
                   if not any(s.overlaps(t) for t in taken)), None)
    if subnet is None:
        raise Exhausted(f"no free /{prefixlen} left in cluster CIDR {cluster_cidr}",
                        f"{len(taken)} node subnets are taken")
    atomic_write(memo, f"{subnet}\n".encode())
    return Carved(subnet, remembered)
