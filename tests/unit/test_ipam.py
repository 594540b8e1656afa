"""IPAM store: allocation rules, persistence, corruption detection, concurrency, subnet carving."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
from ipaddress import IPv4Address, IPv4Network
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


def test_store_file_is_private_and_written_whole(store: Store) -> None:
    store.allocate("a", "eth0")
    assert store.path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in store.dir.iterdir() if p.name.startswith(".")] == []  # no temp files left
    doc = json.loads(store.path.read_text())
    assert doc["pod_cidr"] == str(NET) and doc["leases"][0]["ip"] == "10.244.1.2"


def doc(*leases: dict, version: int = 1) -> bytes:
    return json.dumps({"version": version, "leases": list(leases)}).encode()


def entry(ip: str, cid: str = "a", ifname: str = "eth0", **extra: object) -> dict:
    return {"ip": ip, "container_id": cid, "ifname": ifname, **extra}


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
def test_corrupt_store_is_detected_not_reset(store: Store, content: bytes) -> None:
    store.dir.mkdir(parents=True)
    store.path.write_bytes(content)
    for op in (lambda: store.allocate("x", "eth0"), store.leases, lambda: store.release("x", "eth0")):
        with pytest.raises(CorruptStore) as e:
            op()
        assert e.value.code == cni.STORE_CORRUPT
    assert store.path.read_bytes() == content  # left for inspection, not overwritten


def test_a_truncated_real_document_is_detected(store: Store) -> None:
    for cid in "abc":
        store.allocate(cid, "eth0")
    whole = store.path.read_bytes()
    store.path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CorruptStore):
        Store(store.dir.parent, NET).leases()


def test_rebuild_replaces_a_corrupt_store(store: Store) -> None:
    store.dir.mkdir(parents=True)
    store.path.write_bytes(b"garbage")
    found = [Lease(IPv4Address("10.244.1.7"), "a", "eth0", host_ifname="sknf1"),
             Lease(IPv4Address("10.244.1.3"), "b", "eth0", host_ifname="sknf2")]
    store.rebuild(found)
    assert [lease.ip for lease in store.leases()] == [IPv4Address("10.244.1.3"), IPv4Address("10.244.1.7")]
    assert store.allocate("c", "eth0").ip == IPv4Address("10.244.1.8")  # continues after the highest
    with pytest.raises(IpamError):
        store.rebuild([found[0], Lease(IPv4Address("10.244.1.7"), "z", "eth0")])


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
