"""`sknf install-cni`: put the plugin executable and its conflist where runtimes look for them.

The conflist says cniVersion 1.0.0 although the plugin speaks 1.1.0: runtimes pick the highest
version a conflist names, and podman 4.3 cannot parse 1.1.0 results while Debian's portmap
(plugins 1.1.1) refuses 1.1.0 conflists. Runtimes that speak 1.1 still get STATUS/GC answered.

The plugin is a static binary built from `cni/sknf.c` into the package as `sknf/cni_plugin`
(`make -C cni`: scripts/setup.sh and the image build run it), so a checkout and an installed
package find it the same way and the host needs nothing to run it. Both files are replaced
atomically: a runtime exec'ing the plugin or reading the directory mid-install sees the old file
or the new one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from sknf import config
from sknf.config import Config
from sknf.fsutil import atomic_write

NETWORK_NAME = "sknf"
PLUGIN_NAME = "sknf"  # the conflist's "type" and the executable's file name


class PluginMissing(RuntimeError):
    """The package holds no plugin binary: a checkout whose `make -C cni` never ran."""


def plugin_source() -> bytes:
    try:
        return resources.files("sknf").joinpath("cni_plugin").read_bytes()
    except FileNotFoundError:
        raise PluginMissing("the CNI plugin binary sknf/cni_plugin is missing: build it with `make -C cni` "
                            "(needs musl-gcc, Debian's musl-tools; scripts/setup.sh does both)") from None


def render_conflist(cfg: Config) -> dict[str, Any]:
    """The network: sknf (the keys the plugin reads; it shapes pods itself), then host port mappings.

    No reference `bandwidth` entry: its ingress qdisc collides with the BPF datapath's clsact, and
    bpf_redirect_peer would skip its shaping anyway (see sknf/shaping.py); sknf declares the
    capability, so runtimes hand it runtimeConfig.bandwidth.
    """
    return {
        "cniVersion": "1.0.0",
        "name": NETWORK_NAME,
        "plugins": [
            {"type": PLUGIN_NAME, "agentSocket": str(cfg.socket_path), "stateDir": str(cfg.state_dir),
             "capabilities": {"bandwidth": True}},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
        ],
    }


def install(cfg: Config) -> list[Path]:
    """Install (or replace) the plugin and the conflist; return the paths written."""
    binary = cfg.cni_bin_dir / PLUGIN_NAME
    conflist = cfg.cni_conf_dir / cfg.cni_conf_name
    atomic_write(binary, plugin_source(), mode=0o755)
    atomic_write(conflist, (json.dumps(render_conflist(cfg), indent=2) + "\n").encode())
    return [binary, conflist]


def uninstall(cfg: Config) -> list[Path]:
    """Remove what install() wrote; return the paths that existed."""
    removed = []
    for path in (cfg.cni_conf_dir / cfg.cni_conf_name, cfg.cni_bin_dir / PLUGIN_NAME):
        if path.exists():
            path.unlink()
            removed.append(path)
    return removed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, help="agent configuration file (YAML); env vars win")
    parser.add_argument("--bin-dir", type=Path, help="CNI plugin directory (default: cni_bin_dir)")
    parser.add_argument("--conf-dir", type=Path, help="CNI config directory (default: cni_conf_dir)")
    parser.add_argument("--uninstall", action="store_true", help="remove the plugin and conflist instead")


def run(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    cfg = dataclasses.replace(cfg, cni_bin_dir=args.bin_dir or cfg.cni_bin_dir,
                              cni_conf_dir=args.conf_dir or cfg.cni_conf_dir)
    try:
        paths = uninstall(cfg) if args.uninstall else install(cfg)
    except PluginMissing as e:
        print(f"sknf install-cni: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"{'removed' if args.uninstall else 'wrote'} {path}")
    return 0
