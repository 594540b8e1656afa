"""Dual-stack settings: one cluster network per family, per-family node subnets, IPv6-only clusters."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from sknf.config import ConfigError, load

BASE = {"SKNF_NODE_NAME": "n1", "SKNF_PEERS_FILE": "/tmp/peers.yaml"}
DUAL = "10.244.0.0/16,fd00:10:244::/56"


def env(**kw: str) -> dict[str, str]:
    return {**BASE, **{f"SKNF_{k.upper()}": v for k, v in kw.items()}}


@pytest.mark.parametrize("text", [DUAL, "fd00:10:244::/56, 10.244.0.0/16"])
def test_two_families_in_either_order(text: str) -> None:
    cfg = load(env=env(cluster_cidr=text))
    assert cfg.cluster_cidrs == (IPv4Network("10.244.0.0/16"), IPv6Network("fd00:10:244::/56"))
    assert cfg.cluster_cidr == IPv4Network("10.244.0.0/16")  # IPv4-only code reads the IPv4 network
    assert cfg.families == (4, 6) and cfg.cidr(6) == IPv6Network("fd00:10:244::/56")
    assert (cfg.subnet_prefix(4), cfg.subnet_prefix(6)) == (24, 64)


def test_a_yaml_list_and_per_family_pod_subnets(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("cluster_cidr: [fd00:10:244::/56, 10.244.0.0/16]\n"
                    "pod_cidr: 10.244.3.0/24,fd00:10:244:3::/64\nnode_subnet_prefix6: 72\n")
    cfg = load(path, env=BASE)
    assert cfg.pod_cidrs == (IPv4Network("10.244.3.0/24"), IPv6Network("fd00:10:244:3::/64"))
    assert cfg.pod_cidr == IPv4Network("10.244.3.0/24") and cfg.subnet_prefix(6) == 72


def test_ipv6_only() -> None:
    cfg = load(env=env(cluster_cidr="fd00:10:244::/56", pod_cidr="fd00:10:244:7::/64"))
    assert cfg.families == (6,) and cfg.cluster_cidr == IPv6Network("fd00:10:244::/56") and cfg.cidr(4) is None
    assert cfg.pod_cidrs == (IPv6Network("fd00:10:244:7::/64"),)


def test_single_family_configs_are_unchanged() -> None:
    cfg = load(env=env(cluster_cidr="10.244.0.0/16"))
    assert cfg.cluster_cidrs == (IPv4Network("10.244.0.0/16"),) and cfg.families == (4,) and cfg.pod_cidrs == ()


@pytest.mark.parametrize(("settings", "field", "why"), [
    ({"cluster_cidr": "10.244.0.0/16,10.245.0.0/16"}, "cluster_cidr", "one IPv4 and one IPv6"),
    ({"cluster_cidr": DUAL + ",fd01::/56"}, "cluster_cidr", "one IPv4 and one IPv6"),
    ({"cluster_cidr": "10.244.0.0/16,fd00::1/56"}, "cluster_cidr", "not a network"),
    ({"cluster_cidr": "10.244.0.0/16,"}, "cluster_cidr", "not a network"),
    ({"cluster_cidr": "fd00::/8"}, "cluster_cidr", "between /16 and /120"),
    ({"cluster_cidr": DUAL, "node_subnet_prefix6": "56"}, "node_subnet_prefix6", "longer than the cluster prefix /56"),
    ({"cluster_cidr": DUAL, "node_subnet_prefix6": "127"}, "node_subnet_prefix6", "at most 126"),
    ({"cluster_cidr": DUAL, "pod_cidr": "fd00:10:245::/64"}, "pod_cidr", "inside cluster_cidr"),
    ({"cluster_cidr": "10.244.0.0/16", "pod_cidr": "fd00:10:244::/64"}, "pod_cidr", "inside cluster_cidr"),
    ({"cluster_cidr": DUAL, "pod_cidr": "fd00:10:244::/127"}, "pod_cidr", "two pod addresses"),
])
def test_bad_dual_stack_settings_name_the_field(settings: dict[str, str], field: str, why: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}\b") as err:
        load(env=env(**settings))
    assert why in str(err.value)


def test_ipv6_only_cluster_ignores_the_ipv4_subnet_size() -> None:
    """node_subnet_prefix (IPv4) is checked only when the cluster has IPv4."""
    cfg = load(env=env(cluster_cidr="fd00:10:244::/56", node_subnet_prefix="12"))
    assert cfg.node_subnet_prefix == 12
