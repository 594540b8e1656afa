"""NetworkPolicy inputs: the manifest directory, and list+watch of Pods, Namespaces and NetworkPolicies
against an emulated API server (real HTTP, the real kubernetes client)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from pathlib import Path

import pytest
from kubeapi import ApiServer, eventually

from sknf import kube
from sknf.config import Config
from sknf.policy.source import DirectorySource, KubePolicySource, project_pod

POLICY = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"namespace": "web", "name": "deny"}, "spec": {"podSelector": {}}}


def pod(name: str, ip: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": "web", "name": name, "labels": labels or {"app": name},
                         "annotations": {"big": "x" * 100}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i", "ports": [
                {"name": "http", "containerPort": 80}, {"containerPort": 9}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": []}}


def test_directory_reads_every_kind_and_lists(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("---\n".join([
        "kind: Namespace\nmetadata: {name: web, labels: {team: a}}\n",
        "kind: List\nitems:\n- kind: Pod\n  metadata: {namespace: web, name: p}\n",
        "kind: Service\nmetadata: {name: ignored}\n"]))
    (tmp_path / "b.json").write_text('{"kind": "NetworkPolicy", "metadata": {"namespace": "web", "name": "x"}}')
    (tmp_path / "notes.txt").write_text("not a manifest")
    src = DirectorySource(tmp_path)
    assert src.changed()
    objs = src.objects()
    assert [len(objs.namespaces), len(objs.pods), len(objs.policies)] == [1, 1, 1]
    assert not src.changed()
    (tmp_path / "b.json").unlink()
    assert src.changed()
    assert src.objects().policies == []


def test_a_broken_file_keeps_what_it_held(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("kind: NetworkPolicy\nmetadata: {namespace: web, name: deny}\nspec: {podSelector: {}}\n")
    src = DirectorySource(tmp_path)
    assert len(src.objects().policies) == 1
    path.write_text("kind: NetworkPolicy\nmetadata: [unclosed\n")
    with caplog.at_level(logging.ERROR, logger="sknf.policy.source"):
        assert len(src.objects().policies) == 1  # not lifted by a typo
        assert len(src.objects().policies) == 1
    assert caplog.text.count(str(path)) == 1  # said once


def test_a_missing_directory_holds_nothing(tmp_path: Path) -> None:
    assert DirectorySource(tmp_path / "nope").objects().policies == []


def test_pods_are_kept_as_the_projection_the_compiler_reads() -> None:
    got = project_pod(pod("a", "10.244.1.2"))
    assert got == {"metadata": {"namespace": "web", "name": "a", "labels": {"app": "a"}},
                   "spec": {"hostNetwork": False, "containers": [{"ports": [{"name": "http", "containerPort": 80}]}]},
                   "status": {"podIP": "10.244.1.2", "podIPs": [{"ip": "10.244.1.2"}], "phase": "Running"}}


@pytest.fixture
def core(server: ApiServer, tmp_path: Path):
    for kind in ("v1/pods", "v1/namespaces", "networking.k8s.io/v1/networkpolicies"):  # known while empty
        server.call(lambda kind=kind: server.emu.resources[kind])
    cfg = Config(node_name="n1", cluster_cidr=ipaddress.IPv4Network("10.244.0.0/16"), peer_source="kubernetes",
                 kubeconfig=server.kubeconfig(tmp_path / "kubeconfig"))
    return kube.connect(cfg)


@pytest.fixture
def net(core):
    from kubernetes import client

    return client.NetworkingV1Api(core.api_client)


def test_kube_source_follows_all_three_kinds(core, net) -> None:
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}})
    core.create_namespaced_pod("web", pod("a", "10.244.1.2"))
    src = KubePolicySource(core, backoff=(0.05, 0.2))
    try:
        objs = eventually(src.objects, what="the first lists")
        assert [len(objs.pods), len(objs.namespaces), len(objs.policies)] == [1, 1, 0]
        assert not src.changed()
        net.create_namespaced_network_policy("web", POLICY)
        eventually(src.changed, what="the policy over its watch")
        assert src.objects().policies[0]["spec"] == {"podSelector": {}}
        core.patch_namespaced_pod("a", "web", {"metadata": {"labels": {"app": "b"}}})
        eventually(lambda: src.changed() and src.objects().pods[0]["metadata"]["labels"] == {"app": "b"},
                   what="the relabel")
        core.patch_namespaced_pod("a", "web", {"metadata": {"annotations": {"other": "y"}}})
        core.patch_namespace("web", {"metadata": {"labels": {"team": "a"}}})
        eventually(lambda: src.changed() and src.objects().namespaces[0]["metadata"]["labels"] == {"team": "a"},
                   what="the namespace label")
        assert not src.changed()  # the annotation-only change was no change at all
        net.delete_namespaced_network_policy("deny", "web")
        eventually(lambda: src.changed() and src.objects().policies == [], what="the delete")
    finally:
        src.close()


def test_nothing_until_every_kind_is_listed_then_410_relists(core, net, server: ApiServer) -> None:
    net.create_namespaced_network_policy("web", POLICY)
    server.fail("list v1/pods", 2, status=403)
    gate = threading.Event()

    async def until_gate() -> None:
        await asyncio.to_thread(gate.wait)

    expired = {"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 410,
                                           "reason": "Expired", "message": "too old"}}
    server.script("watch networking.k8s.io/v1/networkpolicies", 1, (b"", until_gate, expired))
    src = KubePolicySource(core, backoff=(0.05, 0.2))
    try:
        assert src.objects() is None  # pods not listed yet: enforce nothing new rather than guess
        eventually(src.objects, what="the pods list after two refusals")
        net.delete_namespaced_network_policy("deny", "web")  # its DELETED goes to a watch we are not on
        gate.set()
        eventually(lambda: src.objects() is not None and src.objects().policies == [], what="a relist after 410")
        assert len(server.requests("list networking.k8s.io/v1/networkpolicies")) == 2
    finally:
        src.close()
