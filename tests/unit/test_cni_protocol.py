"""CNI protocol, agent side: request validation per verb, result formats per version, pending DELs."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

import pytest

from sknf import cni


def env(command: str, **extra: str) -> dict[str, str]:
    base = {"CNI_COMMAND": command, "CNI_CONTAINERID": "abc123", "CNI_NETNS": "/run/netns/x",
            "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin:/usr/lib/cni"}
    return {**base, **extra}


def conf(version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    return {"cniVersion": version, "name": "sknf", "type": "sknf", **extra}


def code_of(e: dict[str, str], c: Any) -> int:
    with pytest.raises(cni.CniError) as err:
        cni.parse_request(e, c)
    return err.value.code


def test_add_request_carries_everything() -> None:
    args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=web;K8S_POD_NAME=front-0;K8S_POD_INFRA_CONTAINER_ID=abc123"
    req = cni.parse_request(env("ADD", CNI_ARGS=args), conf(runtimeConfig={"portMappings": []}))
    assert (req.command, req.cni_version, req.network) == ("ADD", "1.0.0", "sknf")
    assert (req.container_id, req.netns, req.ifname) == ("abc123", "/run/netns/x", "eth0")
    assert (req.pod_namespace, req.pod_name, req.infra_container_id) == ("web", "front-0", "abc123")
    assert req.args["IgnoreUnknown"] == "1"
    assert req.path == ("/opt/cni/bin", "/usr/lib/cni")
    assert req.runtime_config == {"portMappings": []}
    assert req.prev_result is None and req.valid_attachments is None


@pytest.mark.parametrize("command,missing", [
    ("ADD", "CNI_CONTAINERID"), ("ADD", "CNI_NETNS"), ("ADD", "CNI_IFNAME"),
    ("CHECK", "CNI_NETNS"), ("DEL", "CNI_CONTAINERID"), ("DEL", "CNI_IFNAME"), ("GC", "CNI_PATH"),
])
def test_missing_required_variable_is_code_4_and_named(command: str, missing: str) -> None:
    e = env(command)
    del e[missing]
    with pytest.raises(cni.CniError) as err:
        cni.parse_request(e, conf("1.1.0", **{"cni.dev/valid-attachments": [], "prevResult": {}}))
    assert err.value.code == cni.INVALID_ENVIRONMENT
    assert missing in err.value.msg


def test_optional_variables_per_verb() -> None:
    # DEL may come without a netns (it is already gone); STATUS needs nothing but the command.
    e = env("DEL")
    del e["CNI_NETNS"], e["CNI_PATH"]
    assert cni.parse_request(e, conf()).netns == ""
    assert cni.parse_request({"CNI_COMMAND": "STATUS"}, conf("1.1.0")).command == "STATUS"


@pytest.mark.parametrize("e", [
    {}, {"CNI_COMMAND": "FROB"}, env("ADD", CNI_CONTAINERID="-bad"), env("ADD", CNI_CONTAINERID="a/b"),
    env("ADD", CNI_IFNAME="x" * 16), env("ADD", CNI_IFNAME=".."), env("ADD", CNI_IFNAME="a b"),
    env("ADD", CNI_IFNAME="a:b"), env("ADD", CNI_ARGS="K8S_POD_NAME"),
])
def test_invalid_environment_is_code_4(e: dict[str, str]) -> None:
    assert code_of(e, conf()) == cni.INVALID_ENVIRONMENT


@pytest.mark.parametrize("c", [None, [], "text", 3])
def test_non_object_config_is_code_6(c: Any) -> None:
    assert code_of(env("ADD"), c) == cni.DECODING_FAILURE


@pytest.mark.parametrize("command,c", [
    ("ADD", conf("0.2.0")), ("ADD", conf("2.0.0")), ("ADD", {"name": "sknf", "type": "sknf"}),
    ("ADD", conf(1.0)), ("CHECK", conf("0.3.1", prevResult={})), ("GC", conf("1.0.0")),
    ("STATUS", conf("0.4.0")),
])
def test_unsupported_version_is_code_1(command: str, c: dict) -> None:
    assert code_of(env(command), c) == cni.INCOMPATIBLE_VERSION


@pytest.mark.parametrize("c", [
    conf(name=""), conf(name="-x"), conf(name=None), conf(type="bridge"), {"cniVersion": "1.0.0", "name": "n"},
    conf(agentSocket=5), conf(agentSocket=""), conf(stateDir=["x"]), conf(stateDir=None), conf(prevResult="nope"),
])
def test_bad_netconf_is_code_7(c: dict) -> None:
    assert code_of(env("ADD"), c) == cni.INVALID_CONFIG


def test_check_needs_prev_result() -> None:
    assert code_of(env("CHECK"), conf("0.4.0")) == cni.INVALID_CONFIG
    prev = {"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.244.1.5/16"}]}
    assert cni.parse_request(env("CHECK"), conf("0.4.0", prevResult=prev)).prev_result == prev


def test_gc_valid_attachments() -> None:
    keep = [{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "net1"}]
    req = cni.parse_request(env("GC"), conf("1.1.0", **{"cni.dev/valid-attachments": keep}))
    assert req.valid_attachments == {("a", "eth0"), ("b", "net1")}
    # libcni's misspelled key, and Go's null for an empty list
    assert cni.parse_request(env("GC"), conf("1.1.0", **{"cni.dev/attachments": keep})).valid_attachments \
        == {("a", "eth0"), ("b", "net1")}
    assert cni.parse_request(env("GC"), conf("1.1.0", **{"cni.dev/valid-attachments": None})).valid_attachments \
        == frozenset()


@pytest.mark.parametrize("c", [
    conf("1.1.0"), conf("1.1.0", **{"cni.dev/valid-attachments": [{"containerID": "a"}]}),
    conf("1.1.0", **{"cni.dev/valid-attachments": {"a": "eth0"}}),
])
def test_gc_without_a_usable_keep_list_is_refused(c: dict) -> None:
    assert code_of(env("GC"), c) == cni.INVALID_CONFIG


def test_error_json_and_version_stamp() -> None:
    e = cni.CniError(cni.TRY_AGAIN_LATER, "agent busy", "retry")
    assert e.to_json("0.4.0") == {"cniVersion": "0.4.0", "code": 11, "msg": "agent busy", "details": "retry"}
    assert cni.CniError(7, "bad").to_json() == {"cniVersion": "1.1.0", "code": 7, "msg": "bad"}
    assert cni.error_version(conf("0.3.1")) == "0.3.1"
    assert cni.error_version(conf("9.9.9")) == "1.1.0"
    assert cni.error_version("junk") == "1.1.0"


def test_codes_are_the_specs_and_ours_are_above_99() -> None:
    spec = [cni.INCOMPATIBLE_VERSION, cni.UNSUPPORTED_FIELD, cni.UNKNOWN_CONTAINER, cni.INVALID_ENVIRONMENT,
            cni.IO_FAILURE, cni.DECODING_FAILURE, cni.INVALID_CONFIG, cni.TRY_AGAIN_LATER, cni.NOT_AVAILABLE,
            cni.LIMITED_CONNECTIVITY]
    assert spec == [1, 2, 3, 4, 5, 6, 7, 11, 50, 51]
    ours = [cni.IPAM_EXHAUSTED, cni.ALREADY_EXISTS, cni.STORE_CORRUPT, cni.INTERNAL, cni.FORBIDDEN,
            cni.CHECK_FAILED]
    assert min(ours) >= 100 and len(set(ours)) == len(ours)
    assert all(f" {code} " in cni.__doc__ for code in ours)  # each one is documented


INTERFACES = [{"name": "sknfabc", "mac": "02:00:00:00:00:01", "mtu": 1450},
              {"name": "eth0", "mac": "02:00:00:00:00:02", "mtu": 1450, "sandbox": "/run/netns/x"}]
IPS = [{"address": IPv4Interface("10.244.1.5/16"), "gateway": IPv4Address("10.244.1.1"), "interface": 1}]
ROUTES = [{"dst": "0.0.0.0/0", "gw": IPv4Address("10.244.1.1"), "mtu": 1400}]


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0"])
def test_legacy_results_carry_ip_version(version: str) -> None:
    assert cni.build_result(version, INTERFACES, IPS, ROUTES) == {
        "cniVersion": version,
        "interfaces": [{"name": "sknfabc", "mac": "02:00:00:00:00:01"},
                       {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/run/netns/x"}],
        "ips": [{"version": "4", "address": "10.244.1.5/16", "gateway": "10.244.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
        "dns": {},
    }


def test_1_0_result_has_no_ip_version_and_no_mtu() -> None:
    result = cni.build_result("1.0.0", INTERFACES, IPS, ROUTES)
    assert result["ips"] == [{"address": "10.244.1.5/16", "gateway": "10.244.1.1", "interface": 1}]
    assert all("mtu" not in i for i in result["interfaces"])
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}]


def test_1_1_result_reports_mtus() -> None:
    result = cni.build_result("1.1.0", INTERFACES, IPS, ROUTES, dns={"nameservers": ["10.96.0.10"]})
    assert [i["mtu"] for i in result["interfaces"]] == [1450, 1450]
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.244.1.1", "mtu": 1400}]
    assert result["dns"] == {"nameservers": ["10.96.0.10"]}
    assert json.loads(json.dumps(result)) == result  # plain JSON, no address objects left
    assert "routes" not in cni.build_result("1.1.0", INTERFACES, IPS)


def test_result_in_an_unknown_version_is_refused() -> None:
    with pytest.raises(cni.CniError) as e:
        cni.build_result("0.2.0", INTERFACES, IPS)
    assert e.value.code == cni.INCOMPATIBLE_VERSION


def test_version_result() -> None:
    assert cni.version_result("1.0.0") == {"cniVersion": "1.0.0",
                                           "supportedVersions": ["0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


def test_drain_pending_dels(tmp_path: Path) -> None:
    assert cni.drain_pending_dels(tmp_path) == []
    pending = tmp_path / cni.PENDING_DEL_DIR
    pending.mkdir()
    first = {"op": "cni", "env": env("DEL", CNI_CONTAINERID="first"), "config": conf()}
    second = {"op": "cni", "env": env("DEL", CNI_CONTAINERID="second"), "config": conf()}
    (pending / "00000000000000000002-1.json").write_text(json.dumps(second))
    (pending / "00000000000000000001-1.json").write_text(json.dumps(first))
    (pending / "00000000000000000003-1.json").write_text("{torn")
    (pending / ".00000000000000000004-1.json").write_text("{being written")  # plugin's temp file
    assert cni.drain_pending_dels(tmp_path) == [first, second]
    assert [p.name for p in pending.iterdir()] == [".00000000000000000004-1.json"]
    assert cni.drain_pending_dels(tmp_path) == []


# -- runtimeConfig.bandwidth (the `bandwidth` capability) ----------------------------------------

KUBELET_BURST = 2**32 - 1  # containerd and CRI-O: math.MaxUint32 bits for an annotated direction


def test_bandwidth_as_containerd_sends_it() -> None:
    rc = {"bandwidth": {"ingressRate": 50_000_000, "ingressBurst": KUBELET_BURST,
                        "egressRate": 10_000_000, "egressBurst": KUBELET_BURST}}
    bw = cni.parse_request(env("ADD"), conf(runtimeConfig=rc)).bandwidth
    assert bw == cni.Bandwidth(50_000_000, KUBELET_BURST, 10_000_000, KUBELET_BURST)
    assert bw.ingress and bw.egress
    assert bw.to_json() == rc["bandwidth"]  # the record reads like the request


def test_bandwidth_one_direction_and_none() -> None:
    bw = cni.parse_request(env("ADD"), conf(runtimeConfig={"bandwidth": {"egressRate": 8000, "egressBurst": 80000,
                                                                         "ingressRate": 0}})).bandwidth
    assert bw is not None and bw.egress and not bw.ingress
    for rc in ({}, {"bandwidth": {}}, {"bandwidth": {"ingressRate": 0, "ingressBurst": 0}}, {"portMappings": []}):
        assert cni.parse_request(env("ADD"), conf(runtimeConfig=rc)).bandwidth is None
    # Only ADD and CHECK read it: a DEL with odd limits must still delete.
    assert cni.parse_request(env("DEL"), conf(runtimeConfig={"bandwidth": "x"})).bandwidth is None


@pytest.mark.parametrize("bandwidth", [
    "50M", [], {"ingressRate": 50_000_000}, {"ingressBurst": 1000}, {"egressRate": 1000, "egressBurst": 0},
    {"ingressRate": -1, "ingressBurst": 1000}, {"ingressRate": True, "ingressBurst": 1000},
    {"ingressRate": 1.5e6, "ingressBurst": 1000}, {"egressRate": "1000", "egressBurst": 1000},
    {"ingressRate": 999, "ingressBurst": 1 << 20}, {"ingressRate": cni.MAX_RATE + 1, "ingressBurst": 1 << 20},
    {"egressRate": 1000, "egressBurst": cni.MAX_BURST + 1},
])
def test_bad_bandwidth_is_invalid_config(bandwidth: Any) -> None:
    for command in ("ADD", "CHECK"):
        extra = {"prevResult": {"cniVersion": "1.0.0"}} if command == "CHECK" else {}
        assert code_of(env(command), conf(runtimeConfig={"bandwidth": bandwidth}, **extra)) == cni.INVALID_CONFIG


def test_runtime_config_must_be_an_object() -> None:
    assert code_of(env("ADD"), conf(runtimeConfig=["bandwidth"])) == cni.INVALID_CONFIG
