"""The lab's stand-in for the API server's NetworkPolicy inputs: one directory of manifests every node's
agent watches (`policy_dir`), holding a Pod per lab pod (labels, address, named container ports) and
whatever NetworkPolicies and Namespaces a test or an operator writes there."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import yaml

LAB_NAMESPACE = "lab"  # every lab pod's (K8S_POD_NAMESPACE)
# What the lab's server listens on (sknf.lab.server: TCP and UDP on one port), by name.
NAMED_PORTS = (("http", "TCP"), ("echo", "UDP"))


def pod(name: str, node: str, ip: str, port: int, ip6: str = "") -> dict[str, Any]:
    """A lab pod as a Pod object: labels pod=<name>, node=<node>; status.podIPs both addresses in dual-stack."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": LAB_NAMESPACE, "name": name, "labels": {"pod": name, "node": node}},
            "spec": {"nodeName": node, "containers": [{"name": "server", "ports": [
                {"name": n, "containerPort": port, "protocol": proto} for n, proto in NAMED_PORTS]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": a} for a in (ip, ip6) if a]}}


def write(directory: Path, name: str, docs: list[dict[str, Any]]) -> Path:
    """Replace manifest `name`.yaml atomically (agents never read half a file)."""
    path = directory / f"{name}.yaml"
    tmp = directory / f".{name}.tmp"
    tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    os.replace(tmp, path)
    return path


def remove(directory: Path, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (directory / f"{name}.yaml").unlink()
