"""A container runtime's view of CNI, as the lab drives the plugins: bare environment, netconf on stdin,
the conflist's chain in order (DEL in reverse), and capabilities' runtimeConfig handed only to the plugins
that declare them, as libcni does."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

KUBELET_BURST = 2**32 - 1  # bits: what containerd and CRI-O send for an annotated direction (math.MaxUint32)


class LabError(RuntimeError):
    """The lab cannot do what it was asked (a plugin of the chain failed, a node is not ready, ...)."""


def cni_exec(plugin_dir: str, command: str, netconf: dict, *, container_id: str, netns: str, ifname: str = "eth0",
             args: str = "", timeout: float = 60) -> tuple[int, dict | None]:
    """Run one plugin as a runtime does: bare environment, netconf on stdin, result on stdout."""
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
           "CNI_ARGS": args, "CNI_PATH": plugin_dir, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    binary = next(Path(d) / netconf["type"] for d in plugin_dir.split(":") if (Path(d) / netconf["type"]).exists())
    proc = subprocess.run([str(binary)], input=json.dumps(netconf).encode(), env=env, capture_output=True,
                          timeout=timeout)
    out = proc.stdout.decode().strip()
    return proc.returncode, (json.loads(out) if out else None)


def run_chain(plugin_dir: str, command: str, conflist: dict, **kw) -> dict | None:
    """ADD/CHECK run the conflist's plugins in order, each with its predecessor's result; DEL in reverse."""
    plugins = conflist["plugins"]
    order = list(reversed(plugins)) if command == "DEL" else plugins
    prev = None
    for conf in order:
        netconf = {**conf, "cniVersion": conflist["cniVersion"], "name": conflist["name"]}
        if prev is not None and command != "DEL":
            netconf["prevResult"] = prev
        code, out = cni_exec(plugin_dir, command, netconf, **kw)
        if code != 0:
            raise LabError(f"CNI {command} via {conf['type']} failed: {out}")
        if command == "ADD":
            prev = out
    return prev


def with_runtime_config(conflist: dict, runtime_config: dict) -> dict:
    """The conflist as libcni hands it to each plugin: runtimeConfig holds only the capabilities it declares."""
    plugins = []
    for plugin in conflist["plugins"]:
        declared = {k: v for k, v in runtime_config.items() if plugin.get("capabilities", {}).get(k)}
        plugins.append({**plugin, "runtimeConfig": declared} if declared else plugin)
    return {**conflist, "plugins": plugins}


def bandwidth(ingress_rate: int = 0, egress_rate: int = 0, burst: int = KUBELET_BURST) -> dict:
    """runtimeConfig.bandwidth for these rates (bit/s), as a runtime spells it for annotated directions."""
    out = {}
    if ingress_rate:
        out |= {"ingressRate": ingress_rate, "ingressBurst": burst}
    if egress_rate:
        out |= {"egressRate": egress_rate, "egressBurst": burst}
    return out
