"""IPAM store: allocation rules, persistence, corruption detection, concurrency, subnet carving."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sknf import cni
from sknf.ipam import Carved, CorruptStore, Exhausted, IpamError, Lease, LeaseExists, Store, carve_subnet

REPO = Path(__file__).resolve().parents[2]
NET = IPv4Network("10.244.1.0/24")


def reserved(net: IPv4Network) -> set[IPv4Address]:
    return {net.network_address, net.network_address + 1, net.broadcast_address}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path, NET)


def test_first_lease_is_after_the_gateway_and_records_the_endpoint(store: Store) -> None:
    lease = store.allocate("c1", "eth0", "default", "web-0", "sknfabc")
    assert lease.ip == IPv4Address("10.244.1.2")
    assert store.gateway == IPv4Address("10.244.1.1")
    assert (lease.namespace, lease.pod, lease.host_ifname, lease.mac) == ("default", "web-0", "sknfabc", "")
    assert lease.created > 0
    assert store.get("c1", "eth0") == lease
    assert store.capacity == 253
    assert store.allocated == 1


def test_round_robin_does_not_reuse_a_freed_address_at_once(store: Store) -> None:
    a = store.allocate("a", "eth0")
    store.release("a", "eth0")
    b = store.allocate("b", "eth0")
    assert b.ip == a.ip + 1


def test_allocation_wraps_around_and_skips_taken(tmp_path: Path) -> None:
    store = Store(tmp_path, IPv4Network("10.0.0.0/29"))  # hosts .2-.6
    ips = [store.allocate(f"c{i}", "eth0").ip for i in range(5)]
    assert [str(ip) for ip in ips] == [f"10.0.0.{i}" for i in range(2, 7)]
    store.release("c1", "eth0")  # frees .3
    store.release("c3", "eth0")  # frees .5
    assert store.allocate("x", "eth0").ip == IPv4Address("10.0.0.3")  # wrapped past .6
    assert store.allocate("y", "eth0").ip == IPv4Address("10.0.0.5")


def test_exhaustion_is_an_error_with_a_cni_code(tmp_path: Path) -> None:
    store = Store(tmp_path, IPv4Network("10.0.0.0/30"))
    assert store.capacity == 1
    assert store.allocate("a", "eth0").ip == IPv4Address("10.0.0.2")
    with pytest.raises(Exhausted) as e:
        store.allocate("b", "eth0")
    assert isinstance(e.value, IpamError) and isinstance(e.value, cni.CniError)
    assert e.value.code == cni.IPAM_EXHAUSTED
    assert "10.0.0.0/30" in e.value.msg


def test_subnet_without_pod_addresses_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Store(tmp_path, IPv4Network("10.0.0.0/31"))


def test_duplicate_add_is_a_distinct_error(store: Store) -> None:
    first = store.allocate("c1", "eth0")
    with pytest.raises(LeaseExists) as e:
        store.allocate("c1", "eth0")
    assert e.value.code == cni.ALREADY_EXISTS
    assert str(first.ip) in e.value.msg
    assert store.allocate("c1", "net1").ip != first.ip  # another interface of the same container is fine


def test_release_is_idempotent(store: Store) -> None:
    lease = store.allocate("c1", "eth0")
    assert store.release("c1", "eth0") == lease
    assert store.release("c1", "eth0") is None
    assert store.get("c1", "eth0") is None
    assert store.allocated == 0


def test_allocate_records_the_mac(store: Store) -> None:
    lease = store.allocate("c1", "eth0", mac="02:00:00:00:00:01")
    assert lease.mac == "02:00:00:00:00:01"
    assert store.get("c1", "eth0") == lease


def test_leases_survive_a_restart_and_round_robin_continues(tmp_path: Path) -> None:
    first = Store(tmp_path, NET)
    a = first.allocate("a", "eth0", "ns", "pod-a", "sknf1", "02:00:00:00:00:0a")
    first.allocate("b", "eth0")
    first.release("b", "eth0")
    again = Store(tmp_path, NET)
    mac = "02:00:00:00:00:0a"
    assert again.leases() == [Lease(a.ip, "a", "eth0", "ns", "pod-a", "sknf1", mac, a.created)]
    assert again.allocate("c", "eth0").ip == a.ip + 2  # not b's freed address


def test_open_existing_finds_the_subnet_without_configuration(tmp_path: Path) -> None:
    Store(tmp_path, NET).allocate("a", "eth0")
    reader = Store.open_existing(tmp_path)
    assert reader.pod_cidr == NET and reader.capacity == 253
    assert [lease.container_id for lease in reader.leases()] == ["a"]
    with pytest.raises(FileNotFoundError):
        Store.open_existing(tmp_path / "elsewhere")


def test_gc_frees_everything_not_valid(store: Store) -> None:
    for cid in ("a", "b", "c"):
        store.allocate(cid, "eth0")
    freed = store.gc({("b", "eth0"), ("zzz", "eth0")})
    assert sorted(lease.container_id for lease in freed) == ["a", "c"]
    assert [lease.container_id for lease in store.leases()] == ["b"]
    assert store.gc({("b", "eth0")}) == []


def test_one_private_file_per_lease_and_nothing_left_over(store: Store) -> None:
    a = store.allocate("a", "eth0", "ns", "pod-a", "sknf1", "02:00:00:00:00:0a")
    store.allocate("b", "net1")
    store.release("b", "net1")
    ipam = store.dir
    assert sorted(p.name for p in (ipam / "ips").iterdir()) == ["10.244.1.2"]  # no temp files either
    lease_file = ipam / "ips" / "10.244.1.2"
    assert lease_file.stat().st_mode & 0o777 == 0o600
    assert Lease.from_json(json.loads(lease_file.read_text())) == a
    assert [p.name for p in (ipam / "keys").iterdir()] == ["a@eth0"]
    assert (ipam / "keys" / "a@eth0").stat().st_ino == lease_file.stat().st_ino  # a hard link
    assert json.loads((ipam / "last").read_text())["ip"] == "10.244.1.3"  # b's, released since
    assert json.loads(store.path.read_text()) == {"version": 2, "pod_cidr": str(NET)}
    assert store.path.stat().st_mode & 0o777 == 0o600


def test_attachment_keys_are_quoted_into_safe_names(store: Store) -> None:
    odd = [("x/../y", "eth0"), ("x", "a@b"), ("x@a", "b"), (".", ".."), ("c%2F", "d"), ("c/", "d")]
    leases = [store.allocate(*key) for key in odd]
    assert [store.get(*key) for key in odd] == leases
    assert all("/" not in p.name for p in (store.dir / "keys").iterdir())
    assert len(store.leases()) == len(odd)


def doc(*leases: dict, version: int = 1, **extra: object) -> bytes:
    return json.dumps({"version": version, "leases": list(leases), **extra}).encode()


def entry(ip: str, cid: str = "a", ifname: str = "eth0", **extra: object) -> dict:
    return {"ip": ip, "container_id": cid, "ifname": ifname, **extra}


def test_a_version_1_document_is_converted_once(tmp_path: Path) -> None:
    legacy = tmp_path / "ipam" / "leases.json"
    legacy.parent.mkdir()
    legacy.write_bytes(doc(entry("10.244.1.5", "a", host_ifname="sknf1", mac="02:00:00:00:00:05", created=1.5),
                           entry("10.244.1.3", "b"), last="10.244.1.7", pod_cidr=str(NET)))
    assert Store.open_existing(tmp_path).pod_cidr == NET  # readable before the conversion
    store = Store(tmp_path, NET)
    assert store.leases() == [Lease(IPv4Address("10.244.1.3"), "b", "eth0"),
                              Lease(IPv4Address("10.244.1.5"), "a", "eth0", "", "", "sknf1", "02:00:00:00:00:05", 1.5)]
    assert not legacy.exists()
    assert store.get("a", "eth0").ip == IPv4Address("10.244.1.5")
    assert store.allocate("c", "eth0").ip == IPv4Address("10.244.1.8")  # the old cursor carries over
    assert Store.open_existing(tmp_path).pod_cidr == NET


def test_an_interrupted_conversion_runs_again(tmp_path: Path) -> None:
    """What a crash half-way leaves: the marker, some new files, and the old document (removed last)."""
    ipam = tmp_path / "ipam"
    (ipam / "ips").mkdir(parents=True)
    (ipam / "leases.json").write_bytes(doc(entry("10.244.1.5", "a"), entry("10.244.1.6", "b")))
    (ipam / "rebuilding").touch()
    (ipam / "ips" / "10.244.1.5").write_text(json.dumps(entry("10.244.1.5", "a")))
    (ipam / "ips" / ".new-x").write_text("{")
    store = Store(tmp_path, NET)
    assert [(lease.container_id, str(lease.ip)) for lease in store.leases()] == [("a", "10.244.1.5"),
                                                                               ("b", "10.244.1.6")]
    assert sorted(p.name for p in ipam.iterdir()) == ["ips", "keys", "lock", "store.json"]


@pytest.mark.parametrize("content", [
    b"",
    doc(entry("10.244.1.5"))[:20],
    b"[]",
    doc(version=99),
    doc(entry("10.244.1.300")),
    doc(entry("10.244.1.1")),
    doc(entry("10.244.1.5", cid="")),
    doc(entry("10.244.1.5", x=1)),
    doc(entry("10.244.1.5"), entry("10.244.1.5", cid="b")),
    doc(entry("10.244.1.5"), entry("10.244.1.6")),
], ids=["empty", "truncated", "not-object", "version", "bad-ip", "gateway", "no-cid", "unknown-key",
        "dup-ip", "dup-key"])
def test_a_corrupt_version_1_document_is_detected_not_reset(store: Store, content: bytes) -> None:
    legacy = store.dir / "leases.json"
    store.dir.mkdir(parents=True)
    legacy.write_bytes(content)
    for op in (lambda: store.allocate("x", "eth0"), store.leases, lambda: store.release("x", "eth0")):
        with pytest.raises(CorruptStore) as e:
            op()
        assert e.value.code == cni.STORE_CORRUPT
    assert legacy.read_bytes() == content  # left for inspection, not overwritten
    assert list((store.dir / "ips").iterdir()) == []


def three_leases(store: Store) -> list[Lease]:
    return [store.allocate(cid, "eth0") for cid in "abc"]  # .2 .3 .4


@pytest.mark.parametrize("damage", [
    lambda ipam: (ipam / "ips" / "10.244.1.3").write_bytes(b""),
    lambda ipam: (ipam / "ips" / "10.244.1.3").write_bytes((ipam / "ips" / "10.244.1.3").read_bytes()[:30]),
    lambda ipam: (ipam / "ips" / "10.244.1.3").write_bytes(b"\xff\xfe garbage"),
    lambda ipam: (ipam / "ips" / "10.244.1.3").write_bytes((ipam / "ips" / "10.244.1.4").read_bytes()),
    lambda ipam: (ipam / "ips" / "10.244.1.3").rename(ipam / "ips" / "not-an-address"),
    lambda ipam: (ipam / "ips" / "10.244.1.1").write_text(json.dumps(entry("10.244.1.1", "gw"))),
    lambda ipam: (ipam / "keys" / "b@eth0").unlink(),
    lambda ipam: (ipam / "ips" / "10.244.1.9").write_text(json.dumps(entry("10.244.1.9", "b"))),
    lambda ipam: (ipam / "keys" / "b@eth0").unlink() or (ipam / "keys" / "b@eth0").write_text(
        (ipam / "ips" / "10.244.1.3").read_text()),
], ids=["empty", "truncated", "garbage", "other-address", "bad-name", "gateway", "key-lost", "dup-key",
        "key-copied"])
def test_a_damaged_lease_is_detected_by_the_full_read(store: Store, damage) -> None:
    three_leases(store)
    damage(store.dir)
    with pytest.raises(CorruptStore) as e:
        Store(store.dir.parent, NET).leases()
    assert e.value.code == cni.STORE_CORRUPT
    with pytest.raises(CorruptStore):
        store.gc(set())
    assert store.allocate("d", "eth0").ip == IPv4Address("10.244.1.5")  # the damaged address is not reused


def test_a_damaged_lease_fails_the_operations_that_read_it(store: Store) -> None:
    three_leases(store)
    (store.dir / "ips" / "10.244.1.3").write_bytes(b"{")
    for op in (store.get, store.release, store.allocate):
        with pytest.raises(CorruptStore):
            op("b", "eth0")
    assert store.get("a", "eth0").ip == IPv4Address("10.244.1.2")
    (store.dir / "last").unlink()  # a hard link to c's lease: not written through
    (store.dir / "last").write_text("garbage")
    with pytest.raises(CorruptStore):
        store.allocate("d", "eth0")


def test_rebuild_replaces_a_corrupt_store(store: Store) -> None:
    three_leases(store)
    (store.dir / "ips" / "10.244.1.3").write_bytes(b"garbage")
    found = [Lease(IPv4Address("10.244.1.7"), "a", "eth0", host_ifname="sknf1"),
             Lease(IPv4Address("10.244.1.3"), "b", "eth0", host_ifname="sknf2")]
    store.rebuild(found)
    assert [lease.ip for lease in store.leases()] == [IPv4Address("10.244.1.3"), IPv4Address("10.244.1.7")]
    assert store.get("c", "eth0") is None
    assert store.allocate("c", "eth0").ip == IPv4Address("10.244.1.8")  # continues after the highest
    with pytest.raises(IpamError):
        store.rebuild([found[0], Lease(IPv4Address("10.244.1.7"), "z", "eth0")])
    assert len(store.leases()) == 3  # a refused rebuild changes nothing


def test_an_interrupted_rebuild_is_corrupt_until_rebuilt(store: Store) -> None:
    three_leases(store)
    (store.dir / "rebuilding").touch()
    for op in (store.leases, lambda: store.get("a", "eth0"), lambda: store.allocate("d", "eth0")):
        with pytest.raises(CorruptStore):
            op()
    store.rebuild([Lease(IPv4Address("10.244.1.2"), "a", "eth0")])
    assert [lease.key for lease in store.leases()] == [("a", "eth0")]


# -- crash points --------------------------------------------------------------------------------
# The partial states each crash point of the module docstring's table leaves, made by hand ...

def test_leftovers_of_a_crash_before_the_commit_are_harmless(store: Store) -> None:
    """Crash after the key (step 1) or the temp file (step 2): neither is a lease; both are tidied."""
    three_leases(store)
    (store.dir / "ips" / ".new-dead").write_text(json.dumps(entry("10.244.1.5", "d")))
    os.link(store.dir / "ips" / ".new-dead", store.dir / "keys" / "d@eth0")  # .5 was never linked
    (store.dir / "keys" / "e@eth0").write_text(json.dumps(entry("10.244.1.2", "e")))  # .2 is a's
    assert store.get("d", "eth0") is None and store.get("e", "eth0") is None
    assert store.release("e", "eth0") is None
    assert store.get("a", "eth0").ip == IPv4Address("10.244.1.2")
    assert store.allocate("d", "eth0").ip == IPv4Address("10.244.1.5")  # a retried ADD; no LeaseExists
    assert len(store.leases()) == 4
    assert sorted(p.name for p in (store.dir / "keys").iterdir()) == ["a@eth0", "b@eth0", "c@eth0", "d@eth0"]
    assert not [p for p in (store.dir / "ips").iterdir() if p.name.startswith(".")]


def test_a_release_interrupted_after_its_commit_is_complete(store: Store) -> None:
    """Crash between unlinking the lease and its key: the key is stale, even once the address is reused."""
    three_leases(store)
    b = (store.dir / "keys" / "b@eth0").read_bytes()
    (store.dir / "ips" / "10.244.1.3").unlink()
    assert store.get("b", "eth0") is None and store.release("b", "eth0") is None
    store.rebuild([*store.leases(), Lease(IPv4Address("10.244.1.3"), "z", "eth0")])  # reused by z
    (store.dir / "keys" / "b@eth0").write_bytes(b)
    assert store.get("b", "eth0") is None and store.release("b", "eth0") is None
    assert store.get("z", "eth0").ip == IPv4Address("10.244.1.3")


# ... and every point for real: a child process killed (os._exit: no finally, no cleanup) just before
# its n-th file-system call, for n = 0, 1, ... until the operation completes. The store must then be
# readable and hold the state before or after the operation, and the runtime's retry must converge.

CRASHED = 17
FS_CALLS = ("open", "link", "unlink", "fsync", "replace", "rename", "mkdir")


def killed_at(n: int, op) -> bool:
    """Run op in a forked child that dies before its n-th file-system call; True if it died."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        calls = itertools.count()

        def dying(fn):
            def call(*args, **kwargs):
                if next(calls) == n:
                    os._exit(CRASHED)
                return fn(*args, **kwargs)
            return call

        for name in FS_CALLS:
            setattr(os, name, dying(getattr(os, name)))
        try:
            op()
        except BaseException:
            os._exit(1)
        os._exit(0)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    assert code in (0, CRASHED)
    return code == CRASHED


def crash_sweep(tmp_path: Path, prepare, op, check, net=NET) -> int:
    """prepare(store) once; then for each n: a copy, op killed at n, check(fresh store, died)."""
    template = tmp_path / "template"
    prepare(Store(template, net))
    for n in itertools.count():
        run = tmp_path / f"run{n}"
        subprocess.run(["cp", "-a", template, run], check=True)  # keeps the hard links (copytree does not)
        died = killed_at(n, lambda run=run: op(Store(run, net)))
        check(Store(run, net), died)
        if not died:
            return n


def keys_and_ips(store: Store) -> dict[tuple[str, str], IPv4Address]:
    return {lease.key: lease.ip for lease in store.leases()}


def test_allocate_killed_at_every_point(tmp_path: Path) -> None:
    before: dict = {}

    def prepare(store: Store) -> None:
        three_leases(store)
        store.release("b", "eth0")
        before.update(keys_and_ips(store))

    def check(store: Store, died: bool) -> None:
        after = keys_and_ips(store)
        assert {k: v for k, v in after.items() if k != ("d", "eth0")} == before
        if died and ("d", "eth0") not in after:  # not committed: the runtime's retry gets an address
            store.allocate("d", "eth0")
        elif died:
            with pytest.raises(LeaseExists):
                store.allocate("d", "eth0")
        assert keys_and_ips(store)[("d", "eth0")] == IPv4Address("10.244.1.5")
        assert store.get("d", "eth0").ip == IPv4Address("10.244.1.5")
        assert store.allocate("e", "eth0").ip == IPv4Address("10.244.1.6")  # the cursor held
        assert sorted(p.name for p in (store.dir / "ips").iterdir()) == ["10.244.1.2", "10.244.1.4",
                                                                        "10.244.1.5", "10.244.1.6"]

    assert crash_sweep(tmp_path, prepare, lambda s: s.allocate("d", "eth0"), check) >= 8


def test_release_and_gc_killed_at_every_point(tmp_path: Path) -> None:
    def check(store: Store, died: bool) -> None:
        after = keys_and_ips(store)
        assert set(after) in ({("a", "eth0"), ("c", "eth0")}, {("a", "eth0"), ("b", "eth0"), ("c", "eth0")})
        store.gc({("a", "eth0"), ("c", "eth0")})  # the runtime's retry
        assert store.get("b", "eth0") is None and len(store.leases()) == 2

    assert crash_sweep(tmp_path, three_leases, lambda s: s.release("b", "eth0"), check) >= 3
    assert crash_sweep(tmp_path / "gc", three_leases, lambda s: s.gc({("a", "eth0"), ("c", "eth0")}), check) >= 3


def test_conversion_killed_at_every_point(tmp_path: Path) -> None:
    content = doc(entry("10.244.1.5", "a"), entry("10.244.1.3", "b"), last="10.244.1.9", pod_cidr=str(NET))

    def prepare(store: Store) -> None:
        store.dir.mkdir(parents=True)
        (store.dir / "leases.json").write_bytes(content)

    def check(store: Store, died: bool) -> None:
        assert keys_and_ips(store) == {("a", "eth0"): IPv4Address("10.244.1.5"),
                                       ("b", "eth0"): IPv4Address("10.244.1.3")}
        assert store.allocate("c", "eth0").ip == IPv4Address("10.244.1.10")

    assert crash_sweep(tmp_path, prepare, lambda s: s.leases(), check) >= 15


def test_rebuild_killed_at_every_point(tmp_path: Path) -> None:
    found = [Lease(IPv4Address("10.244.1.9"), "x", "eth0"), Lease(IPv4Address("10.244.1.3"), "y", "eth0")]

    def check(store: Store, died: bool) -> None:
        try:
            after = keys_and_ips(store)
        except CorruptStore:  # behind the marker: rebuilt again, as the agent does
            store.rebuild(found)
            after = keys_and_ips(store)
        assert after in ({("a", "eth0"): IPv4Address("10.244.1.2"), ("b", "eth0"): IPv4Address("10.244.1.3"),
                          ("c", "eth0"): IPv4Address("10.244.1.4")},
                         {lease.key: lease.ip for lease in found})

    assert crash_sweep(tmp_path, three_leases, lambda s: s.rebuild(found), check) >= 10


# -- concurrency ---------------------------------------------------------------------------------

WORKER = """
import sys
from ipaddress import IPv4Network
from pathlib import Path
from sknf.ipam import Store
store = Store(Path(sys.argv[1]), IPv4Network(sys.argv[2]))
sys.stdin.readline()  # start signal: all workers begin together
for i in range(int(sys.argv[4])):
    print(store.allocate(f"{sys.argv[3]}-{i}", "eth0").ip, flush=True)
"""


def test_threads_and_processes_allocating_at_once_get_unique_addresses(tmp_path: Path) -> None:
    net = IPv4Network("10.244.0.0/22")
    per_thread, per_process, n_threads, n_procs = 4, 40, 50, 4
    argv = [sys.executable, "-c", WORKER, str(tmp_path), str(net)]
    procs = [subprocess.Popen([*argv, f"p{n}", str(per_process)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
             for n in range(n_procs)]
    store = Store(tmp_path, net)
    got: list[IPv4Address] = []
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads + 1)

    def worker(n: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                got.append(store.allocate(f"t{n}-{i}", "eth0").ip)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(n_threads)]
    try:
        for t in threads:
            t.start()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        start.wait()
        for t in threads:
            t.join()
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0
            got.extend(IPv4Address(line) for line in out.split())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert errors == []
    expected = n_threads * per_thread + n_procs * per_process
    assert len(got) == expected
    assert len(set(got)) == expected
    assert not set(got) & reserved(net)
    assert store.allocated == expected
    assert sorted(lease.ip for lease in store.leases()) == sorted(got)


# -- property: any sequence of operations keeps the store's invariants ---------------------------

class StoreMachine(RuleBasedStateMachine):
    """Model: a dict (cid, ifname) -> ip. A small subnet so exhaustion and wrap-around happen."""

    net = IPv4Network("10.9.0.0/28")

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(prefix="ska-ipam-")
        self.store = Store(Path(self.tmp.name), self.net)
        self.model: dict[tuple[str, str], IPv4Address] = {}
        self.last: IPv4Address | None = None

    keys = st.tuples(st.sampled_from("abcdefgh"), st.sampled_from(["eth0", "net1"]))

    @rule(key=keys)
    def allocate(self, key: tuple[str, str]) -> None:
        if key in self.model:
            with pytest.raises(LeaseExists):
                self.store.allocate(*key)
        elif len(self.model) == self.store.capacity:
            with pytest.raises(Exhausted):
                self.store.allocate(*key)
        else:
            ip = self.store.allocate(*key).ip
            assert ip not in self.model.values()
            if self.last is not None:  # round-robin: nothing free strictly between last and ip
                span = range(int(self.last) + 1, int(ip)) if ip > self.last else \
                    [*range(int(self.last) + 1, int(self.net.broadcast_address)),
                     *range(int(self.net.network_address) + 2, int(ip))]
                assert not {IPv4Address(i) for i in span} - set(self.model.values())
            self.model[key] = ip
            self.last = ip

    @rule(key=keys)
    def release(self, key: tuple[str, str]) -> None:
        lease = self.store.release(*key)
        assert (lease.ip if lease else None) == self.model.pop(key, None)

    @rule(keep=st.sets(keys))
    def gc(self, keep: set[tuple[str, str]]) -> None:
        freed = {lease.key for lease in self.store.gc(keep)}
        assert freed == set(self.model) - keep
        self.model = {k: v for k, v in self.model.items() if k in keep}

    @rule()
    def restart(self) -> None:
        self.store = Store(Path(self.tmp.name), self.net)

    @invariant()
    def matches_model(self) -> None:
        leases = self.store.leases()
        assert {lease.key: lease.ip for lease in leases} == self.model
        ips = [lease.ip for lease in leases]
        assert len(ips) == len(set(ips))
        assert all(ip in self.net and ip not in reserved(self.net) for ip in ips)

    def teardown(self) -> None:
        self.tmp.cleanup()


TestStoreProperties = StoreMachine.TestCase
TestStoreProperties.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# -- subnet carving ------------------------------------------------------------------------------

CLUSTER = IPv4Network("10.244.0.0/16")


def test_carve_takes_the_lowest_free_subnet_and_remembers_it(tmp_path: Path) -> None:
    taken = [IPv4Network("10.244.0.0/24"), IPv4Network("10.244.2.0/23"), IPv4Network("192.168.0.0/16")]
    assert carve_subnet(CLUSTER, 24, taken, tmp_path) == Carved(IPv4Network("10.244.1.0/24"), None)
    # After a restart the same subnet comes back even though a lower one is now free.
    assert carve_subnet(CLUSTER, 24, [], tmp_path) == Carved(IPv4Network("10.244.1.0/24"), None)


def test_carve_replaces_a_remembered_subnet_that_now_collides(tmp_path: Path) -> None:
    carve_subnet(CLUSTER, 24, [], tmp_path)
    again = carve_subnet(CLUSTER, 24, [IPv4Network("10.244.0.0/24")], tmp_path)
    assert again == Carved(IPv4Network("10.244.1.0/24"), IPv4Network("10.244.0.0/24"))
    assert carve_subnet(CLUSTER, 24, [IPv4Network("10.244.0.0/24")], tmp_path).replaced is None


def test_carve_follows_a_changed_prefix_length(tmp_path: Path) -> None:
    carve_subnet(CLUSTER, 24, [], tmp_path)
    assert carve_subnet(CLUSTER, 26, [IPv4Network("10.244.0.0/26")], tmp_path) == \
        Carved(IPv4Network("10.244.0.64/26"), IPv4Network("10.244.0.0/24"))


def test_carve_when_the_cluster_is_full(tmp_path: Path) -> None:
    with pytest.raises(Exhausted):
        carve_subnet(IPv4Network("10.244.0.0/23"), 24, [IPv4Network("10.244.0.0/23")], tmp_path)


def test_carve_detects_a_corrupt_memory(tmp_path: Path) -> None:
    (tmp_path / "ipam").mkdir()
    (tmp_path / "ipam" / "subnet").write_text("not a subnet")
    with pytest.raises(CorruptStore):
        carve_subnet(CLUSTER, 24, [], tmp_path)


# -- dual-stack: one address per family per attachment ---------------------------------------------

NET6 = IPv6Network("fd00:10:244:1::/64")
DUAL = (NET, NET6)


def test_dual_stack_leases_one_address_per_family(tmp_path: Path) -> None:
    store = Store(tmp_path, (NET6, NET))  # either order
    a = store.allocate("a", "eth0", mac="02:00:00:00:00:01")
    assert (a.ip, a.ip6, a.ips) == (IPv4Address("10.244.1.2"), IPv6Address("fd00:10:244:1::2"), (a.ip, a.ip6))
    b = store.allocate("b", "eth0")
    assert (b.ip, b.ip6) == (IPv4Address("10.244.1.3"), IPv6Address("fd00:10:244:1::3"))
    assert store.get("a", "eth0") == a and store.leases() == [a, b]
    assert sorted(p.name for p in (store.dir / "ips").iterdir()) == [
        "10.244.1.2", "10.244.1.3", "fd00:10:244:1::2", "fd00:10:244:1::3"]
    assert (store.allocated, store.capacity) == (2, 253)
    assert json.loads((store.dir / "ips" / "fd00:10:244:1::2").read_text())["ip6"] == "fd00:10:244:1::2"
    reader = Store.open_existing(tmp_path)
    assert reader.pod_cidrs == DUAL and reader.leases() == [a, b]
    assert store.release("a", "eth0") == a and store.leases() == [b]
    assert not (store.dir / "ips" / "fd00:10:244:1::2").exists()
    c = store.allocate("c", "eth0")  # round-robin in both families
    assert (c.ip, c.ip6) == (IPv4Address("10.244.1.4"), IPv6Address("fd00:10:244:1::4"))
    assert store.gc({("c", "eth0")}) == [b] and store.leases() == [c]


def test_single_stack_leases_are_written_as_before(store: Store) -> None:
    lease = store.allocate("a", "eth0")
    assert "ip6" not in json.loads((store.dir / "ips" / str(lease.ip)).read_text()) and lease.ip6 is None


def test_ipv6_only_store(tmp_path: Path) -> None:
    store = Store(tmp_path, NET6)
    lease = store.allocate("a", "eth0")
    assert (lease.ip, lease.ip6, lease.address(4)) == (IPv6Address("fd00:10:244:1::2"), None, None)
    assert store.leases() == [lease] and Store.open_existing(tmp_path).pod_cidr == NET6


@pytest.mark.parametrize(("small", "full"), [
    ((IPv4Network("10.244.1.0/30"), IPv6Network("fd00:10:244:1::/120")), 0),
    ((IPv4Network("10.244.1.0/29"), IPv6Network("fd00:10:244:1::/126")), 1),
])
def test_exhausting_one_family_leaks_nothing_in_the_other(tmp_path: Path, small: tuple, full: int) -> None:
    """A /30 or a /126 holds one pod; a second gets a clear error and no address of either family."""
    store = Store(tmp_path, small)
    held = [store.allocate(c, "eth0") for c in "a"]
    files = sorted(p.name for p in (store.dir / "ips").iterdir())
    with pytest.raises(Exhausted, match=f"no free address in pod subnet {small[full]}") as err:
        store.allocate("c", "eth0")
    assert err.value.code == cni.IPAM_EXHAUSTED
    assert store.leases() == held and sorted(p.name for p in (store.dir / "ips").iterdir()) == files
    assert store.get("c", "eth0") is None and sorted(os.listdir(store.dir / "keys")) == ["a@eth0"]
    store.release("a", "eth0")
    family = small[full].version
    assert store.allocate("c", "eth0").address(family) == held[0].address(family)  # the one address there is


def test_an_address_taken_behind_the_locks_back_is_skipped_in_its_family_only(tmp_path: Path) -> None:
    store = Store(tmp_path, DUAL)
    os.makedirs(store.dir / "ips", exist_ok=True)
    os.link(__file__, store.dir / "ips" / "fd00:10:244:1::2")  # not via lexists: the probe sees it, pick ::3
    lease = store.allocate("a", "eth0")
    assert (lease.ip, lease.ip6) == (IPv4Address("10.244.1.2"), IPv6Address("fd00:10:244:1::3"))


def test_a_half_lease_is_no_lease_and_the_full_read_removes_it(tmp_path: Path) -> None:
    store = Store(tmp_path, DUAL)
    a = store.allocate("a", "eth0")
    b = store.allocate("b", "eth0")
    os.unlink(store.dir / "ips" / str(b.ip6))  # a writer died between b's two links
    assert store.get("b", "eth0") is None
    assert store.leases() == [a] and not (store.dir / "ips" / str(b.ip)).exists()
    assert store.allocate("b", "eth0").ip == IPv4Address("10.244.1.4")  # the retried ADD


def test_a_lease_named_under_a_foreign_address_is_corrupt(tmp_path: Path) -> None:
    store = Store(tmp_path, DUAL)
    a = store.allocate("a", "eth0")
    os.link(store.dir / "ips" / str(a.ip), store.dir / "ips" / "10.244.1.9")
    with pytest.raises(CorruptStore, match="inconsistent"):
        store.leases()


def test_dual_stack_rebuild_keeps_both_addresses_and_the_cursor(tmp_path: Path) -> None:
    store = Store(tmp_path, DUAL)
    found = [Lease(IPv4Address("10.244.1.7"), "a", "eth0", ip6=IPv6Address("fd00:10:244:1::9")),
             Lease(IPv4Address("10.244.1.3"), "b", "eth0", ip6=IPv6Address("fd00:10:244:1::3"))]
    store.rebuild(found)
    assert store.leases() == sorted(found, key=lambda x: int(x.ip))
    nxt = store.allocate("c", "eth0")
    assert (nxt.ip, nxt.ip6) == (IPv4Address("10.244.1.8"), IPv6Address("fd00:10:244:1::a"))
    with pytest.raises(IpamError, match="cannot rebuild"):
        store.rebuild([found[0], Lease(IPv4Address("10.244.1.8"), "z", "eth0", ip6=IPv6Address("fd00:10:244:1::9"))])


def test_dual_stack_allocate_killed_at_every_point(tmp_path: Path) -> None:
    def prepare(store: Store) -> None:
        store.allocate("a", "eth0")

    def check(store: Store, died: bool) -> None:
        leases = store.leases()
        assert [x.key for x in leases] in ([("a", "eth0")], [("a", "eth0"), ("d", "eth0")])
        if store.get("d", "eth0") is None:
            store.allocate("d", "eth0")
        d = store.get("d", "eth0")
        assert (d.ip, d.ip6) == (IPv4Address("10.244.1.3"), IPv6Address("fd00:10:244:1::3"))
        assert len(os.listdir(store.dir / "ips")) == 4

    assert crash_sweep(tmp_path, prepare, lambda s: s.allocate("d", "eth0"), check, DUAL) >= 9


def test_dual_stack_release_killed_at_every_point(tmp_path: Path) -> None:
    def prepare(store: Store) -> None:
        store.allocate("a", "eth0")
        store.allocate("b", "eth0")

    def check(store: Store, died: bool) -> None:
        assert [x.key for x in store.leases()] in ([("a", "eth0")], [("a", "eth0"), ("b", "eth0")])
        store.release("b", "eth0")  # the runtime's retry
        assert store.get("b", "eth0") is None and len(os.listdir(store.dir / "ips")) == 2

    assert crash_sweep(tmp_path, prepare, lambda s: s.release("b", "eth0"), check, DUAL) >= 4


# -- current(): the sampler's read, again only when the store changed ---------------------------------

def age(store: Store, seconds: float) -> None:
    """Stamp the store's directories as changed `seconds` ago (past the mtime slack)."""
    then = time.time_ns() - int(seconds * 1e9)
    for d in (store.dir, store.dir / "ips", store.dir / "keys"):
        os.utime(d, ns=(then, then))


def test_current_reads_again_only_after_a_change(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    a = store.allocate("a", "eth0")
    age(store, 5)
    reads = []
    full = store.leases
    monkeypatch.setattr(store, "leases", lambda: reads.append(1) or full())
    assert store.current() == [a] and len(reads) == 1
    assert store.current() == [a] and len(reads) == 1  # unchanged directories: no read
    b = store.allocate("b", "eth0")  # stamps the directories now
    assert store.current() == [a, b] and len(reads) == 2
    assert store.current() == [a, b] and len(reads) == 3  # changed within the slack: not trusted yet
    age(store, 5)
    store.current()
    assert store.current() == [a, b] and len(reads) == 4
    store.release("a", "eth0")
    assert store.current() == [b] and len(reads) == 5


def test_current_sees_a_rebuild_marker_and_a_lost_store(store: Store) -> None:
    store.allocate("a", "eth0")
    age(store, 5)
    store.current()
    (store.dir / "rebuilding").touch()  # a rebuild interrupted: the directory's stamp moves
    with pytest.raises(CorruptStore):
        store.current()
    (store.dir / "rebuilding").unlink()
    age(store, 5)
    assert len(store.current()) == 1
    for d in ("ips", "keys"):
        for name in os.listdir(store.dir / d):
            os.unlink(store.dir / d / name)
        os.rmdir(store.dir / d)
    assert store.current() == []  # recreated empty: a new directory, a new stamp
