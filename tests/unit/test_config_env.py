"""Settings from the environment: SKNF_-prefixed names, the three documented plain names, precedence."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest

from sknf.config import LEGACY_ENV, ConfigError, load

BASE = {"SKNF_NODE_NAME": "n1", "SKNF_CLUSTER_CIDR": "10.244.0.0/16", "SKNF_PEERS_FILE": "/tmp/peers.yaml"}


def test_every_setting_reads_its_prefixed_name() -> None:
    cfg = load(env={**BASE, "SKNF_VXLAN_PORT": "8472", "SKNF_MTU": "1400", "SKNF_DATAPATH": "kernel",
                    "SKNF_LOG_LEVEL": "debug", "SKNF_HOST_PHYSICAL_IF": "eth1"})
    assert (cfg.node_name, cfg.cluster_cidr, cfg.vxlan_port, cfg.mtu) == ("n1", IPv4Network("10.244.0.0/16"), 8472,
                                                                          1400)
    assert (cfg.datapath, cfg.log_level, cfg.host_physical_if) == ("kernel", "debug", "eth1")


def test_generic_names_are_ignored() -> None:
    """What a Service named `vxlan` (or anything else) injects does not reach the agent's settings."""
    cfg = load(env={**BASE, "VXLAN_PORT": "udp://10.96.0.10:4789", "MTU": "x", "DATAPATH": "nonsense",
                    "LOG_LEVEL": "loud", "KUBECONFIG": "/nowhere", "PEER_SOURCE": "kubernetes"})
    assert (cfg.vxlan_port, cfg.mtu, cfg.datapath, cfg.log_level) == (4789, None, "auto", "info")
    assert (cfg.kubeconfig, cfg.peer_source) == (None, "static")


def test_documented_plain_names_still_work() -> None:
    assert set(LEGACY_ENV) == {"cluster_cidr", "host_physical_if", "node_name"}
    cfg = load(env={"NODE_NAME": "n2", "CLUSTER_CIDR": "10.32.0.0/12", "HOST_PHYSICAL_IF": "ens3",
                    "SKNF_PEERS_FILE": "/tmp/p.yaml"})
    assert (cfg.node_name, cfg.cluster_cidr, cfg.host_physical_if) == ("n2", IPv4Network("10.32.0.0/12"), "ens3")


@pytest.mark.parametrize("name", sorted(LEGACY_ENV))
def test_prefixed_name_wins_over_plain(name: str) -> None:
    good = {"node_name": "n1", "cluster_cidr": "10.244.0.0/16", "host_physical_if": "eth0"}[name]
    env = {**BASE, f"SKNF_{name.upper()}": good, name.upper(): "not valid!"}
    assert str(getattr(load(env=env), name)) == good


def test_empty_prefixed_name_falls_back_to_plain() -> None:
    cfg = load(env={**BASE, "SKNF_NODE_NAME": "", "NODE_NAME": "n3"})
    assert cfg.node_name == "n3"


def test_errors_name_the_variable_that_was_read() -> None:
    with pytest.raises(ConfigError, match=r"^vxlan_port \(from \$SKNF_VXLAN_PORT\)"):
        load(env={**BASE, "SKNF_VXLAN_PORT": "udp://10.96.0.10:4789"})
    with pytest.raises(ConfigError, match=r"^cluster_cidr \(from \$CLUSTER_CIDR\)"):
        load(env={"NODE_NAME": "n1", "CLUSTER_CIDR": "10.0.0.1/8", "SKNF_PEERS_FILE": "/tmp/p"})
    with pytest.raises(ConfigError, match=r"node_name: required \(set \$SKNF_NODE_NAME"):
        load(env={"SKNF_CLUSTER_CIDR": "10.244.0.0/16"})
