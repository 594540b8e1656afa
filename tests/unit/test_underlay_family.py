"""The underlay's family: the setting and its default, the peers file and Node annotations of an IPv6 underlay,
the rules each family's tool gets, the MTU overhead and the bridge MAC of IPv6 gateways."""

from __future__ import annotations

import logging

import pytest

from sknf import iptables, kube, overlay
from sknf.config import ConfigError, load
from sknf.peers import Node, PeersFileError, parse_nodes

BASE = {"SKNF_NODE_NAME": "n1", "SKNF_PEERS_FILE": "/tmp/peers.yaml"}
V4, DUAL, V6 = "10.244.0.0/16", "10.244.0.0/16,fd00:10:244::/56", "fd00:10:244::/56"


def config(cidr: str, **kw: str):
    return load(env={**BASE, "SKNF_CLUSTER_CIDR": cidr, **{f"SKNF_{k.upper()}": v for k, v in kw.items()}})


@pytest.mark.parametrize(("cidr", "family", "overhead"), [(V4, 4, 50), (DUAL, 4, 50), (V6, 6, 70)])
def test_the_default_underlay_is_ipv4_except_in_an_ipv6_only_cluster(cidr: str, family: int, overhead: int) -> None:
    cfg = config(cidr)
    assert (cfg.underlay_family, cfg.vxlan_overhead) == (family, overhead)


@pytest.mark.parametrize(("cidr", "family"), [(DUAL, "6"), (V6, "4"), (V4, "6")])
def test_either_underlay_may_be_set_for_any_cluster(cidr: str, family: str) -> None:
    assert config(cidr, underlay_family=family).underlay_family == int(family)


def test_the_setting_is_read_from_the_config_file(tmp_path) -> None:
    path = tmp_path / "sknf.yaml"
    path.write_text(f"node_name: n1\ncluster_cidr: {DUAL}\npeers_file: /tmp/p.yaml\nunderlay_family: 6\n")
    assert load(path, env={}).underlay_family == 6


@pytest.mark.parametrize(("value", "why"), [("5", "must be 4 (IPv4 underlay) or 6 (IPv6 underlay) (got 5)"),
                                            ("0", "must be 4"), ("ipv6", "'ipv6' is not an integer"),
                                            ("true", "is not an integer")])
def test_a_bad_underlay_family_names_the_field(value: str, why: str) -> None:
    with pytest.raises(ConfigError, match=r"^underlay_family\b") as err:
        config(V6, underlay_family=value)
    assert why in str(err.value)


def test_the_peers_file_holds_underlay_addresses_of_the_underlay_family() -> None:
    doc = {"nodes": [{"name": "a", "underlay_ip": "2001:DB8:100::000b", "pod_cidr": "fd00:10:244:1::/64"}]}
    assert parse_nodes(doc, "peers.yaml", 6) == [Node("a", "2001:db8:100::b", "fd00:10:244:1::/64")]
    with pytest.raises(PeersFileError, match=r"nodes\[0\] \(a\): underlay_ip 2001:db8:100::b is not an IPv4 "
                                             r"address \(underlay_family is 4\)"):
        parse_nodes(doc, "peers.yaml")
    with pytest.raises(PeersFileError, match=r"not an IPv6 address \(underlay_family is 6\)"):
        parse_nodes({"nodes": [{"name": "a", "underlay_ip": "198.51.100.11"}]}, "peers.yaml", 6)


def node_object(addresses: list[str], annotations: dict[str, str] | None = None) -> dict:
    return {"metadata": {"name": "b", "annotations": annotations or {}},
            "spec": {"podCIDRs": ["10.244.2.0/24", "fd00:10:244:2::/64"]},
            "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]}}


@pytest.mark.parametrize(("family", "want"), [(4, "198.51.100.12"), (6, "2001:db8:100::c")])
def test_a_dual_stack_node_gives_the_internal_ip_of_the_underlay_family(family: int, want: str) -> None:
    for order in (["198.51.100.12", "2001:db8:100::c"], ["2001:db8:100::c", "198.51.100.12"]):
        got = kube._Parser(family).node(node_object(order))
        assert got is not None and got.underlay_ip == want


def test_an_underlay_annotation_of_the_other_family_is_ignored_with_a_fallback(caplog) -> None:
    v6 = kube._Parser(6)
    published = node_object(["198.51.100.12", "2001:db8:100::c"], {kube.UNDERLAY_IP: "2001:DB8:100::99"})
    assert v6.node(published).underlay_ip == "2001:db8:100::99"  # what the node published wins
    wrong = node_object(["198.51.100.12", "2001:db8:100::c"], {kube.UNDERLAY_IP: "198.51.100.99"})
    with caplog.at_level(logging.WARNING, logger="sknf.kube"):
        assert v6.node(wrong).underlay_ip == "2001:db8:100::c"
    assert "ignoring annotation sknf.io/underlay-ip='198.51.100.99'" in caplog.text
    assert "not an IPv6 address (underlay_family is 6)" in caplog.text
    assert v6.node(node_object(["198.51.100.12"])) is None  # no IPv6 address: not a peer (sknf doctor says so)


def test_each_family_gets_its_rules_where_the_underlay_is() -> None:
    """Over an IPv6 underlay ip6tables holds INPUT (/128 peers) and the NOTRACK chains, iptables none of them."""
    v6 = iptables.desired_rules("fd00:10:244::/56", ["2001:db8:100::b", "2001:db8:100::c"], True,
                                ["2001:db8:100::c"])
    assert v6[iptables.INPUT_CHAIN][0][:2] == ["-s", "2001:db8:100::c/128"]
    assert v6[iptables.INPUT_CHAIN][-1][-2:] == ["-j", "DROP"]
    assert v6[iptables.NAT_CHAIN][1][:4] == ["-s", "fd00:10:244::/56", "-d", "2001:db8:100::b/128"]
    assert iptables.RAW_PREROUTING_CHAIN in v6
    dual_v4 = iptables.desired_rules("10.244.0.0/16", [], True, None)  # dual-stack over IPv6: IPv4's tool
    assert set(dual_v4) == {iptables.FORWARD_CHAIN, iptables.NAT_CHAIN}
    v4_of_v6_only = iptables.desired_rules(None, [], True, None)  # nothing at all: ensure() removes sknf's chains
    assert v4_of_v6_only == {}
    underlay_only = iptables.desired_rules(None, ["198.51.100.11"], True, ["198.51.100.12"])
    assert set(underlay_only) == {iptables.INPUT_CHAIN, iptables.RAW_PREROUTING_CHAIN, iptables.RAW_OUTPUT_CHAIN}


def test_ipv6_gateways_give_each_bridge_its_own_mac() -> None:
    """The last four bytes of fd00:10:244:N::1 are the same on every node: the MAC folds the whole address."""
    macs = {overlay.gateway_mac_of(f"fd00:10:244:{n:x}::1") for n in range(1, 257)}
    assert len(macs) == 256
    assert all(m.startswith("0a:58:") for m in macs)
    assert overlay.gateway_mac_of("10.244.1.1") == "0a:58:0a:f4:01:01"  # IPv4 gateways: as before
