"""Dual-stack node subnets (configured, from the Node object, carved per family) and CNI results."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from sknf import cni
from sknf.agent import node_pod_cidrs
from sknf.config import Config
from sknf.kube import merge_subnets, spec_pod_cidr
from sknf.peers import Node, parse_nodes

V4, V6 = IPv4Network("10.244.0.0/16"), IPv6Network("fd00:10:244::/56")


def cfg(tmp_path: Path, **kw) -> Config:
    return Config(node_name="n1", cluster_cidr=V4, cluster_cidrs=(V4, V6), state_dir=tmp_path, **kw)


class Assigned:
    def __init__(self, cidr: str | None) -> None:
        self.cidr = cidr

    def own_pod_cidr(self) -> str | None:
        return self.cidr


def test_configured_then_peer_entry_then_carved_per_family(tmp_path: Path) -> None:
    c = cfg(tmp_path, pod_cidr=IPv4Network("10.244.9.0/24"), pod_cidrs=(IPv4Network("10.244.9.0/24"),))
    peers = [Node("n2", "198.51.100.12", "10.244.0.0/24,fd00:10:244::/64")]
    assert node_pod_cidrs(c, object(), peers) == (IPv4Network("10.244.9.0/24"), IPv6Network("fd00:10:244:1::/64"))
    assert (tmp_path / "ipam" / "subnet6").read_text() == "fd00:10:244:1::/64\n"  # remembered per family
    own = [Node("n1", "198.51.100.11", "10.244.3.0/24,fd00:10:244:3::/64")]
    assert node_pod_cidrs(cfg(tmp_path / "b"), object(), own) == (IPv4Network("10.244.3.0/24"),
                                                                  IPv6Network("fd00:10:244:3::/64"))


def test_a_node_assigned_one_family_gets_the_other_carved_and_says_so(tmp_path: Path, caplog) -> None:
    got = node_pod_cidrs(cfg(tmp_path), Assigned("10.244.4.0/24"), [])
    assert got == (IPv4Network("10.244.4.0/24"), IPv6Network("fd00:10:244::/64"))
    assert "none of IPv6 that cluster_cidr has" in caplog.text


def test_a_node_assigned_only_ipv6_gets_ipv4_carved_and_says_so(tmp_path: Path, caplog) -> None:
    got = node_pod_cidrs(cfg(tmp_path), Assigned("fd00:10:244:4::/64"), [])
    assert got == (IPv4Network("10.244.0.0/24"), IPv6Network("fd00:10:244:4::/64"))
    assert "the cluster assigned pod subnets fd00:10:244:4::/64, none of IPv4 that cluster_cidr has" in caplog.text


def test_families_the_cluster_lacks_are_ignored(tmp_path: Path) -> None:
    c = Config(node_name="n1", cluster_cidr=V4, state_dir=tmp_path)
    assert node_pod_cidrs(c, Assigned("fd00:5::/64,10.244.5.0/24"), []) == (IPv4Network("10.244.5.0/24"),)


def test_ipv6_only_node(tmp_path: Path) -> None:
    c = Config(node_name="n1", cluster_cidr=V6, state_dir=tmp_path)
    assert node_pod_cidrs(c, object(), []) == (IPv6Network("fd00:10:244::/64"),)


def test_node_spec_in_either_order_and_annotations_fill_a_missing_family() -> None:
    spec = {"spec": {"podCIDR": "fd00:10:244:2::/64", "podCIDRs": ["fd00:10:244:2::/64", "10.244.2.0/24"]}}
    assert spec_pod_cidr(spec) == "10.244.2.0/24,fd00:10:244:2::/64"
    assert merge_subnets("10.244.2.0/24", "10.244.7.0/24,fd00:10:244:7::/64") == "10.244.2.0/24,fd00:10:244:7::/64"
    assert merge_subnets(None, None) is None


def test_peers_file_takes_a_list_or_text_per_family() -> None:
    doc = {"nodes": [{"name": "a", "underlay_ip": "198.51.100.1", "pod_cidr": ["fd00:10:244:1::/64", "10.244.1.0/24"]},
                     {"name": "b", "underlay_ip": "198.51.100.2", "pod_cidr": "10.244.2.0/24,fd00:10:244:2::/64"}]}
    assert [n.pod_cidr for n in parse_nodes(doc, "f")] == ["10.244.1.0/24,fd00:10:244:1::/64",
                                                           "10.244.2.0/24,fd00:10:244:2::/64"]
    with pytest.raises(ValueError, match=r"nodes\[0\] \(a\)"):
        parse_nodes({"nodes": [{"name": "a", "underlay_ip": "198.51.100.1", "pod_cidr": "10.1.0.0/24,10.2.0.0/24"}]},
                    "f")


@pytest.mark.parametrize("version", cni.SUPPORTED_VERSIONS)
def test_results_list_both_addresses_in_every_version(version: str) -> None:
    ips = [{"address": "10.244.1.2/16", "gateway": "10.244.1.1", "interface": 1},
           {"address": "fd00:10:244:1::2/56", "gateway": "fd00:10:244:1::1", "interface": 1}]
    result = cni.build_result(version, [{"name": "eth0", "sandbox": "/x"}], ips,
                              [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "::/0", "gw": "fd00:10:244:1::1"}])
    assert [ip["address"] for ip in result["ips"]] == ["10.244.1.2/16", "fd00:10:244:1::2/56"]
    assert [r["dst"] for r in result["routes"]] == ["0.0.0.0/0", "::/0"]
    if version.startswith("0."):
        assert [ip["version"] for ip in result["ips"]] == ["4", "6"]
    else:
        assert all("version" not in ip for ip in result["ips"])


def test_the_host_record_carries_both_addresses() -> None:
    from ipaddress import IPv4Address, IPv6Address

    from sknf.ipam import Lease
    from sknf.pod import attachment_record, host_veth_name, lease_from_record

    cid = "c" * 64
    lease = Lease(IPv4Address("10.244.1.7"), cid, "eth0", "ns", "pod", host_veth_name(cid, "eth0"),
                  "02:00:00:00:00:07", ip6=IPv6Address("fd00:10:244:1:ffff:ffff:ffff:fffe"))
    record = attachment_record(lease)
    assert record is not None and '"pod":"pod"' in record  # fits with the pod's name
    back = lease_from_record(lease.host_ifname, record)
    assert (back.ip, back.ip6, back.mac) == (lease.ip, lease.ip6, lease.mac)


@pytest.mark.parametrize("datapath", ["auto", "bpf"])
def test_an_ipv6_only_cluster_may_run_the_ebpf_datapath(tmp_path: Path, monkeypatch, datapath: str) -> None:
    """Its programs validate every pod frame and send IPv6 the kernel path (no IPv4 endpoint is a pod's);
    it used to be refused."""
    from sknf.datapath import select

    chosen = object()
    monkeypatch.setattr(select, "BpfDatapath", lambda *a: chosen)
    c = Config(node_name="n1", cluster_cidr=V6, state_dir=tmp_path, datapath=datapath)
    assert select.choose(c) is chosen
