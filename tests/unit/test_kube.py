"""KubePeerSource against an emulated API server over real HTTP, with the real kubernetes client."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubeapi import ApiServer, eventually, node

from sknf import kube
from sknf.config import Config
from sknf.kube import KubeError, KubePeerSource
from sknf.peers import Node

ME = "skc-a"
FAST = {"backoff": (0.05, 0.2), "poll": 0.02, "sync_wait": 15.0}


@pytest.fixture
def cfg(server: ApiServer, tmp_path: Path) -> Config:
    return Config(node_name=ME, cluster_cidr=ipaddress.IPv4Network("10.244.0.0/16"), peer_source="kubernetes",
                  kubeconfig=server.kubeconfig(tmp_path / "kubeconfig"))


@pytest.fixture
def api(cfg: Config):
    """The test's own client, to change Nodes through the API like kubelet or kubectl would."""
    return kube.connect(cfg)


@pytest.fixture
def make_source(cfg: Config) -> Iterator[Callable[..., KubePeerSource]]:
    made: list[KubePeerSource] = []

    def make(**kwargs) -> KubePeerSource:
        made.append(KubePeerSource(cfg, **{**FAST, **kwargs}))
        return made[-1]

    yield make
    for src in made:
        src.close()


def names(src: KubePeerSource) -> list[str]:
    return [n.name for n in src.nodes()]


def test_nodes_follow_adds_updates_and_deletes(api, make_source) -> None:
    api.create_node(node(ME, "192.0.2.1", "10.244.1.0/24"))
    api.create_node(node("skc-b", "192.0.2.2", "10.244.2.0/24",
                         {kube.UNDERLAY_IP: "198.51.100.2", kube.VTEP_MAC: "0A:58:0A:F4:02:01"}))
    api.create_node(node("skc-nic-less"))  # no address yet: not a peer
    src = make_source()

    assert src.nodes() == [Node(ME, "192.0.2.1", "10.244.1.0/24"),
                           Node("skc-b", "198.51.100.2", "10.244.2.0/24", "0a:58:0a:f4:02:01")]
    assert src.unaddressed() == ["skc-nic-less"]  # what `sknf doctor` names
    assert not src.changed()

    api.create_node(node("skc-c", "192.0.2.3", "10.244.3.0/24"))
    eventually(src.changed, what="changed() after an add")
    assert names(src) == [ME, "skc-b", "skc-c"]
    assert not src.changed()

    api.patch_node("skc-b", {"metadata": {"annotations": {kube.UNDERLAY_IP: "198.51.100.22"}}})
    eventually(src.changed, what="changed() after an update")
    assert Node("skc-b", "198.51.100.22", "10.244.2.0/24", "0a:58:0a:f4:02:01") in src.nodes()

    api.delete_node("skc-c")
    eventually(src.changed, what="changed() after a delete")
    assert names(src) == [ME, "skc-b"]

    api.patch_node("skc-nic-less", {"metadata": {"annotations": {kube.UNDERLAY_IP: "198.51.100.9"}}})
    eventually(lambda: src.unaddressed() == [], what="an address makes it a peer")


def test_irrelevant_changes_do_not_flip_changed(api, make_source, server) -> None:
    api.create_node(node("skc-b", "192.0.2.2", "10.244.2.0/24"))
    src = make_source()
    src.nodes()
    api.patch_node("skc-b", {"metadata": {"labels": {"skc/role": "x"}}, "status": {"images": [{"names": ["a"]}]}})
    api.create_node(node("skc-c", "192.0.2.3"))  # a later event: once it is seen, the patch was too
    eventually(src.changed)
    assert names(src) == ["skc-b", "skc-c"]
    api.patch_node("skc-b", {"metadata": {"labels": {"skc/role": "y"}}})
    api.delete_node("skc-c")
    eventually(src.changed)
    assert names(src) == ["skc-b"]  # exactly one change was visible: the delete


def test_bad_annotations_are_ignored_with_a_fallback(api, make_source, caplog) -> None:
    api.create_node(node("skc-b", "192.0.2.2", None, {kube.UNDERLAY_IP: "not-an-ip", kube.VTEP_MAC: "zz",
                                                      kube.POD_CIDR: "10.244.9.0/24"}))
    with caplog.at_level(logging.WARNING, logger="sknf.kube"):
        assert make_source().nodes() == [Node("skc-b", "192.0.2.2", "10.244.9.0/24", None)]
    assert "ignoring annotation sknf.io/underlay-ip='not-an-ip'" in caplog.text
    assert "ignoring annotation sknf.io/vtep-mac='zz'" in caplog.text


def test_publish_self_patches_only_its_own_annotations(api, make_source, server) -> None:
    api.create_node(node(ME, "192.0.2.1", "10.244.1.0/24", {"other.io/keep": "me"}))
    src = make_source()
    src.nodes()

    src.publish_self(Node(ME, "198.51.100.1", "10.244.1.0/24", "0a:58:0a:f4:01:01"))
    patches = server.requests("patch")
    assert len(patches) == 1
    assert patches[0].url.path == f"/api/v1/nodes/{ME}"
    assert patches[0].headers["Content-Type"] == kube.MERGE_PATCH
    assert patches[0].data == {"metadata": {"annotations": {kube.UNDERLAY_IP: "198.51.100.1",
                                                             kube.VTEP_MAC: "0a:58:0a:f4:01:01"}}}
    stored = api.read_node(ME).metadata.annotations
    assert stored == {"other.io/keep": "me", kube.UNDERLAY_IP: "198.51.100.1", kube.VTEP_MAC: "0a:58:0a:f4:01:01"}

    src.publish_self(Node(ME, "198.51.100.1", "10.244.1.0/24", "0a:58:0a:f4:01:01"))
    assert len(server.requests("patch")) == 1  # nothing differs: no request

    src.publish_self(Node(ME, "198.51.100.1", "10.244.1.0/24", None))
    assert server.requests("patch")[-1].data == {"metadata": {"annotations": {kube.VTEP_MAC: None}}}
    with pytest.raises(ValueError, match="not this node"):
        src.publish_self(Node("skc-b", "198.51.100.2"))


def test_publish_self_annotates_a_carved_pod_cidr(api, cfg, make_source, server) -> None:
    api.create_node(node(ME, "192.0.2.1"))  # the cluster allocates no pod subnets
    src = make_source()
    src.publish_self(Node(ME, "192.0.2.1", "10.244.7.0/24"))
    assert server.requests("patch")[-1].data == {"metadata": {"annotations": {
        kube.UNDERLAY_IP: "192.0.2.1", kube.POD_CIDR: "10.244.7.0/24"}}}
    eventually(lambda: Node(ME, "192.0.2.1", "10.244.7.0/24") in src.nodes(), what="own carved subnet")
    assert kube.remove_annotations(cfg) == [kube.POD_CIDR, kube.UNDERLAY_IP]  # what `sknf cleanup` does
    assert server.requests("patch")[-1].data == {"metadata": {"annotations": {
        kube.POD_CIDR: None, kube.UNDERLAY_IP: None}}}
    assert api.read_node(ME).metadata.annotations in (None, {})


def test_watch_resumes_from_the_last_resource_version(api, make_source, server) -> None:
    api.create_node(node("skc-b", "192.0.2.2", rv="41"))
    src = make_source(watch_timeout=1)  # the emulated server ends each watch after 1 s
    src.nodes()
    api.patch_node("skc-b", {"metadata": {"resourceVersion": "42",
                                          "annotations": {kube.VTEP_MAC: "02:00:00:00:00:02"}}})
    eventually(src.changed, what="the update over the watch")
    seen = len(server.requests("watch v1/nodes"))
    following = eventually(lambda: server.requests("watch v1/nodes")[seen:], what="the next watch")
    assert following[0].params["resourceVersion"] == "42"
    assert len(server.requests("list v1/nodes")) == 1  # resumed, not relisted
    assert src.nodes() == [Node("skc-b", "192.0.2.2", None, "02:00:00:00:00:02")]


def test_410_gone_relists_and_forgets_nodes_deleted_meanwhile(api, make_source, server) -> None:
    api.create_node(node("skc-b", "192.0.2.2"))
    api.create_node(node("skc-c", "192.0.2.3"))
    gate = threading.Event()

    async def until_gate() -> None:
        await asyncio.to_thread(gate.wait)

    expired = {"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 410,
                                           "reason": "Expired", "message": "too old resource version: 1 (99)"}}
    server.script("watch v1/nodes", 1, (b"", until_gate, expired))  # the first watch: silent, then 410
    src = make_source()
    assert names(src) == ["skc-b", "skc-c"]
    api.delete_node("skc-c")  # its DELETED event goes to a watch we are not on
    gate.set()
    eventually(src.changed, what="a relist after 410")
    assert names(src) == ["skc-b"]
    assert len(server.requests("list v1/nodes")) == 2
    eventually(lambda: len(server.requests("watch v1/nodes")) == 2, what="a new watch after the relist")


def test_periodic_resync_repairs_a_missed_delete(api, make_source, server) -> None:
    api.create_node(node("skc-b", "192.0.2.2"))
    api.create_node(node("skc-c", "192.0.2.3"))
    src = make_source(resync=1, watch_timeout=1)
    assert names(src) == ["skc-b", "skc-c"]
    server.drop_silently("skc-c")
    eventually(src.changed, what="a resync")
    assert names(src) == ["skc-b"]


def test_api_errors_back_off_exponentially_then_recover(api, make_source, server, caplog) -> None:
    api.create_node(node("skc-b", "192.0.2.2"))
    server.fail("list v1/nodes", 4, status=500)
    with caplog.at_level(logging.WARNING, logger="sknf.kube"):
        src = make_source()
        assert names(src) == ["skc-b"]
    waits = [float(w) for w in re.findall(r"HTTP 500 .*; retrying in ([0-9.]+)s", caplog.text)]
    assert len(waits) == 4
    assert waits[2] > waits[0]  # 0.05 -> 0.1 -> 0.2 (each jittered down by at most half)
    assert max(waits) <= 0.2  # capped
    assert len(server.requests("list v1/nodes")) == 5


def test_a_failed_watch_resumes_where_it_was(api, make_source, server) -> None:
    api.create_node(node("skc-b", "192.0.2.2", rv="7"))
    server.fail("watch v1/nodes", 2, status=503)
    src = make_source()
    assert names(src) == ["skc-b"]
    watches = eventually(lambda: server.requests("watch v1/nodes")[2:], what="a watch after two failures")
    assert {w.params["resourceVersion"] for w in watches} == {"..."}  # the list's version, kept across errors
    assert len(server.requests("list v1/nodes")) == 1


def test_own_pod_cidr_waits_for_the_controller_manager(api, make_source, server, caplog) -> None:
    api.create_node(node(ME, "192.0.2.1"))
    src = make_source()
    got: list[str | None] = []
    with caplog.at_level(logging.WARNING, logger="sknf.kube"):
        waiter = threading.Thread(target=lambda: got.append(src.own_pod_cidr(timeout=60)))
        waiter.start()
        eventually(lambda: len(server.requests("fetch v1/nodes")) >= 3, what="polling")
        api.patch_node(ME, {"spec": {"podCIDR": "10.244.5.0/24", "podCIDRs": ["10.244.5.0/24", "fd00:5::/64"]}})
        waiter.join(30)
    assert got == ["10.244.5.0/24,fd00:5::/64"]  # both families; the agent takes those the cluster has
    assert f"node {ME} has no spec.podCIDR yet" in caplog.text
    assert "--pod-network-cidr" in caplog.text
    assert caplog.text.count("has no spec.podCIDR yet") == 1  # said once, not at every poll


def test_own_pod_cidr_in_the_other_order_is_served_and_said(api, make_source, caplog) -> None:
    api.create_node(node(ME, "192.0.2.1"))
    api.patch_node(ME, {"spec": {"podCIDR": "fd00:10:244:5::/64", "podCIDRs": ["fd00:10:244:5::/64", "10.244.5.0/24"]}})
    with caplog.at_level(logging.INFO, logger="sknf.kube"):
        assert make_source().own_pod_cidr(timeout=5) == "10.244.5.0/24,fd00:10:244:5::/64"
    assert f"node {ME}: spec.podCIDRs fd00:10:244:5::/64,10.244.5.0/24 lists IPv6 first" in caplog.text


def test_own_pod_cidr_waits_for_registration_and_gives_up(api, make_source, caplog) -> None:
    src = make_source()
    with caplog.at_level(logging.WARNING, logger="sknf.kube"):
        assert src.own_pod_cidr(timeout=0.3) is None
    assert f"node {ME} is not registered" in caplog.text
    assert "gave up waiting" in caplog.text


def test_own_pod_cidr_outside_the_cluster_cidr_is_an_error(api, make_source) -> None:
    api.create_node(node(ME, "192.0.2.1", "10.96.1.0/24"))
    with pytest.raises(KubeError, match="set CLUSTER_CIDR"):
        make_source().own_pod_cidr(timeout=5)


def test_no_api_server_is_reported(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    cfg = Config(node_name=ME, cluster_cidr=ipaddress.IPv4Network("10.244.0.0/16"), peer_source="kubernetes",
                 kubeconfig=tmp_path / "missing")
    with pytest.raises(KubeError, match=r"kubeconfig .*missing"):
        KubePeerSource(cfg)
    cfg = Config(node_name=ME, cluster_cidr=ipaddress.IPv4Network("10.244.0.0/16"), peer_source="kubernetes")
    with pytest.raises(KubeError, match="in-cluster service account"):
        KubePeerSource(cfg)


def test_annotation_keys_are_valid_qualified_names() -> None:
    """Kubernetes rejects annotation keys that are not <DNS subdomain>/<name> (63 chars, alphanumeric ends)."""
    for key in kube.ANNOTATIONS:
        prefix, _, name = key.partition("/")
        assert key.startswith(kube.PREFIX)
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", prefix)
        assert re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", name)


def test_the_mtu_is_published_and_read_back_a_bad_one_ignored(api, make_source, server) -> None:
    api.create_node(node(ME, "192.0.2.1", "10.244.1.0/24"))
    api.create_node(node("skc-b", "192.0.2.2", "10.244.2.0/24", {kube.MTU: "1400"}))
    api.create_node(node("skc-c", "192.0.2.3", "10.244.3.0/24", {kube.MTU: "jumbo"}))
    src = make_source()
    assert {n.name: n.mtu for n in src.nodes()} == {ME: None, "skc-b": 1400, "skc-c": None}
    src.publish_self(Node(ME, "192.0.2.1", "10.244.1.0/24", mtu=1450))
    assert server.requests("patch")[-1].data == {"metadata": {"annotations": {kube.UNDERLAY_IP: "192.0.2.1",
                                                                               kube.MTU: "1450"}}}
