"""`sknf cleanup` without root: files, the plugin and the Node annotations for real (temp dirs, the API
emulator); the kernel steps are recorded here and run for real in tests/integration/test_node_cleanup.py."""

from __future__ import annotations

import argparse
import ipaddress
import socket
from pathlib import Path

import pytest
from kubeapi import ApiServer, node

from sknf import cleanup, install, iptables, kube, overlay
from sknf.config import Config
from sknf.datapath import select

ME = "skc-a"


@pytest.fixture
def cfg(server: ApiServer, tmp_path: Path) -> Config:
    return Config(node_name=ME, cluster_cidr=ipaddress.IPv4Network("10.244.0.0/16"), peer_source="kubernetes",
                  kubeconfig=server.kubeconfig(tmp_path / "kubeconfig"), state_dir=tmp_path / "lib-sknf",
                  run_dir=tmp_path / "run-sknf", cni_bin_dir=tmp_path / "cni-bin", cni_conf_dir=tmp_path / "net.d")


@pytest.fixture
def kernel_steps(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the kernel-side teardown calls instead of touching this machine's root namespace."""
    calls: list[str] = []
    monkeypatch.setattr(select, "cleanup_all", lambda cfg: calls.append("datapath"), raising=False)
    monkeypatch.setattr(overlay, "teardown", lambda: calls.append("overlay"))
    monkeypatch.setattr(iptables, "teardown", lambda: calls.append("iptables"))
    return calls


def node_made_by_sknf(cfg: Config, server: ApiServer) -> None:
    install.install(cfg)
    (cfg.state_dir / "leases").mkdir(parents=True)
    (cfg.state_dir / "leases" / "10.244.1.5").write_text("{}")
    cfg.run_dir.mkdir()
    kube.connect(cfg).create_node(node(ME, "192.0.2.1", "10.244.1.0/24", {
        kube.UNDERLAY_IP: "192.0.2.1", kube.VTEP_MAC: "02:00:00:00:00:01", "other.io/keep": "me"}))


def test_removes_everything_in_order_and_is_idempotent(cfg: Config, server: ApiServer, kernel_steps) -> None:
    node_made_by_sknf(cfg, server)
    said: list[str] = []
    assert cleanup.cleanup(cfg, said.append) == []
    assert kernel_steps == ["datapath", "overlay", "iptables"]
    assert not (cfg.cni_bin_dir / "sknf").exists()
    assert not (cfg.cni_conf_dir / cfg.cni_conf_name).exists()
    assert not cfg.state_dir.exists() and not cfg.run_dir.exists()
    annotations = kube.connect(cfg).read_node(ME).metadata.annotations
    assert annotations == {"other.io/keep": "me"}
    assert f"removed annotation {kube.VTEP_MAC} on node {ME}" in said
    assert said.index(f"removed {cfg.cni_conf_dir / cfg.cni_conf_name}") < said.index(f"removed {cfg.state_dir}")

    said.clear()
    assert cleanup.cleanup(cfg, said.append) == []  # a second run finds nothing left and is happy
    assert [s for s in said if not s.startswith(("removed tc", "removed links", "removed iptables"))] == []


def test_a_failing_step_does_not_stop_the_others(cfg: Config, server: ApiServer, kernel_steps, monkeypatch) -> None:
    node_made_by_sknf(cfg, server)

    def broken() -> None:
        raise RuntimeError("iptables-restore: resource busy")

    monkeypatch.setattr(iptables, "teardown", broken)
    failures = cleanup.cleanup(cfg, lambda _: None)
    assert failures == ["iptables: RuntimeError: iptables-restore: resource busy"]
    assert not cfg.state_dir.exists()
    assert kube.connect(cfg).read_node(ME).metadata.annotations == {"other.io/keep": "me"}


def test_refuses_while_an_agent_serves(cfg: Config, server: ApiServer, kernel_steps, monkeypatch, capsys) -> None:
    node_made_by_sknf(cfg, server)
    monkeypatch.setattr(cleanup.config, "load", lambda path: cfg)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as agent:
        agent.bind(str(cfg.socket_path))
        agent.listen()
        assert cleanup.run(argparse.Namespace(config=None, force=False)) == 1
        assert "stop it first" in capsys.readouterr().err
        assert cfg.state_dir.exists() and kernel_steps == []
        assert cleanup.run(argparse.Namespace(config=None, force=True)) == 0
    assert not cfg.state_dir.exists()


def test_never_removes_a_directory_not_named_for_sknf(tmp_path: Path) -> None:
    (tmp_path / "var-lib").mkdir()
    with pytest.raises(cleanup.CleanupError, match="does not say sknf"):
        cleanup.remove_dir(tmp_path / "var-lib")
    assert (tmp_path / "var-lib").exists()
