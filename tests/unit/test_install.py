"""`sknf install-cni`: the conflist, atomic installation of the plugin, uninstall, the CLI."""

from __future__ import annotations

import argparse
import json
import subprocess
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from sknf import cli, config, install
from sknf.config import Config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's settings come from the environment too; keep the machine's out of these tests."""
    for name in config.FIELDS:
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return Config(node_name="node-1", cluster_cidr=IPv4Network("10.244.0.0/16"), run_dir=tmp_path / "run",
                  state_dir=tmp_path / "state", cni_bin_dir=tmp_path / "bin", cni_conf_dir=tmp_path / "net.d")


def test_conflist(cfg: Config) -> None:
    conflist = install.render_conflist(cfg)
    assert conflist["cniVersion"] == "1.0.0"  # see the module docstring: podman 4.3 and portmap 1.1.1
    assert conflist["name"] == "sknf"
    sknf, portmap = conflist["plugins"]  # sknf shapes pods itself (sknf/shaping.py): no `bandwidth` entry
    assert sknf == {"type": "sknf", "agentSocket": str(cfg.socket_path), "stateDir": str(cfg.state_dir),
                    "capabilities": {"bandwidth": True}}
    assert portmap == {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}


def test_plugin_source_is_the_binary_built_into_the_package() -> None:
    assert install.plugin_source() == (REPO / "sknf" / "cni_plugin").read_bytes()
    assert install.plugin_source()[:4] == b"\x7fELF"


def test_a_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, cfg: Config,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    class Empty:
        def joinpath(self, name: str) -> Path:
            return cfg.state_dir / name

    monkeypatch.setattr(install.resources, "files", lambda _package: Empty())
    with pytest.raises(install.PluginMissing, match="make -C cni"):
        install.install(cfg)
    assert not cfg.cni_conf_dir.exists()  # nothing half-installed


def test_install_and_uninstall(cfg: Config) -> None:
    written = install.install(cfg)
    binary, conflist = cfg.cni_bin_dir / "sknf", cfg.cni_conf_dir / "10-sknf.conflist"
    assert written == [binary, conflist]
    assert binary.read_bytes() == (REPO / "sknf" / "cni_plugin").read_bytes()
    assert binary.stat().st_mode & 0o777 == 0o755
    assert json.loads(conflist.read_text()) == install.render_conflist(cfg)
    # The installed copy works on its own.
    out = subprocess.run([str(binary)], env={"CNI_COMMAND": "VERSION"}, input=b"", capture_output=True, check=True)
    assert "1.1.0" in json.loads(out.stdout)["supportedVersions"]
    assert install.install(cfg) == written  # reinstall replaces in place
    assert sorted(p.name for p in cfg.cni_bin_dir.iterdir()) == ["sknf"]  # no temp files left
    assert install.uninstall(cfg) == [conflist, binary]
    assert not binary.exists() and not conflist.exists()
    assert install.uninstall(cfg) == []


def test_cli_reads_config_and_honours_dir_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "sknf.yaml"
    conf.write_text(f"node_name: node-1\ncluster_cidr: 10.244.0.0/16\npeers_file: /dev/null\n"
                    f"cni_conf_name: 05-sknf.conflist\nrun_dir: {tmp_path / 'run'}\n")
    parser = argparse.ArgumentParser()
    install.add_arguments(parser)
    args = parser.parse_args(["--config", str(conf), "--bin-dir", str(tmp_path / "b"), "--conf-dir",
                              str(tmp_path / "c")])
    assert install.run(args) == 0
    written = json.loads((tmp_path / "c" / "05-sknf.conflist").read_text())
    assert written["plugins"][0]["agentSocket"] == str(tmp_path / "run" / "sknf.sock")
    assert (tmp_path / "b" / "sknf").exists()
    assert "wrote" in capsys.readouterr().out
    assert install.run(parser.parse_args([*map(str, ["--config", conf, "--bin-dir", tmp_path / "b",
                                                     "--conf-dir", tmp_path / "c"]), "--uninstall"])) == 0
    assert not (tmp_path / "b" / "sknf").exists()


def test_cli_reports_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.yaml").write_text("node_name: node-1\n")
    assert cli.main(["install-cni", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "sknf install-cni: bad configuration: cluster_cidr" in capsys.readouterr().err
