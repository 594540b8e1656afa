"""Bad input to the real plugin talking to a real agent: each failure is a spec error on stdout with
the right code, and leaves nothing behind (no lease, no host veth, no interface in the pod namespace).

The node's pod subnet is a /29 (5 pod addresses; the lab's own pod holds one) so exhaustion is cheap.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest
from cnirig import Rig, assert_spec_error, one_node_rig
from pyroute2 import netns as pnetns

from sknf import netlink
from sknf.cni import (
    ALREADY_EXISTS,
    DECODING_FAILURE,
    INCOMPATIBLE_VERSION,
    INVALID_ENVIRONMENT,
    IPAM_EXHAUSTED,
    UNKNOWN_CONTAINER,
)

pytestmark = pytest.mark.root

CID = "ske0000000000000000000000000000000000000000000000000000000000001"


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    with one_node_rig("ske-c", pod_cidr="10.244.1.0/29") as built:
        yield built


@pytest.fixture
def unchanged(rig: Rig) -> Iterator[None]:
    """Whatever the test does, the node and the pod namespace end as they started."""
    before = rig.state()
    yield
    assert rig.state() == before


def without(env: dict[str, str], key: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k != key}


def test_malformed_json_is_a_decoding_failure(rig: Rig, unchanged: None) -> None:
    out = rig.run(b'{"cniVersion": "1.0.0", "name": "sknf", "type": ', rig.env("ADD", CID))
    assert_spec_error(out, DECODING_FAILURE)


@pytest.mark.parametrize("missing", ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])
def test_missing_environment_is_invalid_environment(rig: Rig, unchanged: None, missing: str) -> None:
    out = rig.run(rig.netconf(), without(rig.env("ADD", CID), missing))
    assert missing in assert_spec_error(out, INVALID_ENVIRONMENT)["msg"] or missing == "CNI_COMMAND"


@pytest.mark.parametrize("version", ["0.2.0", "9.9.9", ""])
def test_unsupported_version_is_incompatible(rig: Rig, unchanged: None, version: str) -> None:
    out = rig.run({**rig.netconf(), "cniVersion": version}, rig.env("ADD", CID))
    assert_spec_error(out, INCOMPATIBLE_VERSION)


@pytest.mark.parametrize("netns", ["/run/netns/ske-c-absent", "/etc/hostname"])
def test_add_into_a_missing_namespace_is_unknown_container(rig: Rig, unchanged: None, netns: str) -> None:
    assert_spec_error(rig.run(rig.netconf(), rig.env("ADD", CID, netns=netns)), UNKNOWN_CONTAINER)


@pytest.mark.parametrize("ifname", ["a/b", "x" * 16, "..", "eth 0", "ske%d"])
def test_invalid_ifname_is_refused(rig: Rig, unchanged: None, ifname: str) -> None:
    assert_spec_error(rig.run(rig.netconf(), rig.env("ADD", CID, ifname=ifname)), INVALID_ENVIRONMENT)


def test_ifname_already_in_the_pod_is_rolled_back(rig: Rig, unchanged: None) -> None:
    """Fails mid-way: the lease is taken before the kernel refuses the veth's pod end."""
    assert_spec_error(rig.run(rig.netconf(), rig.env("ADD", CID, ifname="lo")), ALREADY_EXISTS)


def test_second_interface_in_one_namespace_keeps_the_first_default_route(rig: Rig) -> None:
    """A second attachment (as a meta plugin would ask) gets its own address; DEL of it leaves the first."""
    first = rig.run(rig.netconf(), rig.env("ADD", CID))
    assert first.rc == 0, first
    try:
        with_first = rig.state()
        assert with_first.pod_default_routes == {("eth0", rig.node.gateway_ip)}
        second = rig.run(rig.netconf(), rig.env("ADD", CID, ifname="eth1"))
        assert second.rc == 0, second
        assert json.loads(second.stdout)["ips"][0]["address"] != json.loads(first.stdout)["ips"][0]["address"]
        assert rig.state().pod_default_routes == with_first.pod_default_routes  # eth1 took no default route
        assert rig.run(rig.netconf(), rig.env("DEL", CID, ifname="eth1")).rc == 0
        assert rig.state() == with_first
    finally:
        rig.run(rig.netconf(), rig.env("DEL", CID))


def test_duplicate_add_is_refused_and_the_pod_keeps_working(rig: Rig, unchanged: None) -> None:
    pod = rig.lab.state.pods[0]
    with netlink.route(f"/run/netns/{pod.netns}") as ipr:
        before = netlink.link_info(ipr, "eth0")["index"]

    out = rig.run(rig.netconf(), rig.env("ADD", pod.container_id, args="K8S_POD_NAMESPACE=lab;K8S_POD_NAME=dup"))

    assert_spec_error(out, ALREADY_EXISTS)
    with netlink.route(f"/run/netns/{pod.netns}") as ipr:
        assert netlink.link_info(ipr, "eth0")["index"] == before
    results = rig.lab.check(bulk_bytes=1 << 20)
    assert results and [r for r in results if not r.ok] == []
    prev = {"cniVersion": "1.0.0", "interfaces": [], "ips": [{"address": f"{pod.ip}/16", "interface": 1}]}
    check = rig.run({**rig.netconf(), "prevResult": prev},
                    rig.env("CHECK", pod.container_id, netns=f"/run/netns/{pod.netns}"))
    assert (check.rc, check.stdout) == (0, "")


def test_del_of_an_unknown_container_succeeds(rig: Rig, unchanged: None) -> None:
    out = rig.run(rig.netconf(), rig.env("DEL", CID))
    assert (out.rc, out.stdout) == (0, "")
    out = rig.run(rig.netconf(), rig.env("DEL", CID, netns=""))  # DEL may come without a namespace
    assert (out.rc, out.stdout) == (0, "")


def test_add_on_an_exhausted_pool(rig: Rig) -> None:
    free = 5 - len(rig.state().leases)  # a /29 has 5 pod addresses
    fillers = [(f"ske-fill-{i}", f"ske-c-f{i}") for i in range(free)]  # one namespace each: one default route
    try:
        for cid, ns in fillers:
            pnetns.create(ns)
            out = rig.run(rig.netconf(), rig.env("ADD", cid, netns=f"/run/netns/{ns}"))
            assert out.rc == 0, out
        full = rig.state()

        out = rig.run(rig.netconf(), rig.env("ADD", CID))

        assert_spec_error(out, IPAM_EXHAUSTED)
        assert rig.state() == full
    finally:
        for cid, ns in fillers:
            rig.run(rig.netconf(), rig.env("DEL", cid, netns=f"/run/netns/{ns}"))
            with contextlib.suppress(OSError):
                pnetns.remove(ns)
    lab_pods = rig.lab.state.pods + rig.lab.state.shaped
    assert {lease[0] for lease in rig.state().leases} == {p.container_id for p in lab_pods}
