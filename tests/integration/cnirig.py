"""A one-node lab with a real agent, and the real plugin run against it as a runtime runs it.

For tests that feed the plugin bad or random input and then ask the kernel and the IPAM store
whether anything was left half-done. `State` is what must not change across a failed ADD.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from leftovers import managed_lab
from pyroute2 import netns as pnetns

from sknf import cni, netlink, nsutil
from sknf.ipam import Store
from sknf.lab import Lab, LabNode, run_chain

BARE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Outcome:
    rc: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class State:
    leases: frozenset[tuple[str, str, str]]  # (container id, ifname, ip)
    host_links: frozenset[str]  # sknf* veths in the node namespace
    pod_links: frozenset[str]  # interfaces in the test pod namespace
    pod_default_routes: frozenset[tuple[str, str]]  # (interface, gateway) of its IPv4 default routes


@dataclass
class Rig:
    lab: Lab
    node: LabNode
    pod_netns: str  # an empty namespace (lo only) for ADDs the tests make

    @property
    def plugin(self) -> Path:
        return self.lab.root / "bin" / "sknf"

    @property
    def pod_path(self) -> str:
        return nsutil.netns_path(self.pod_netns)

    def netconf(self, version: str = "1.0.0") -> dict:
        """The sknf entry of the installed conflist, as a runtime hands it to the plugin."""
        conflist = self.lab.conflist(self.node)
        return {**conflist["plugins"][0], "cniVersion": version, "name": conflist["name"]}

    def env(self, command: str, container_id: str = "", ifname: str = "eth0", netns: str | None = None,
            args: str = "") -> dict[str, str]:
        return {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id,
                "CNI_NETNS": self.pod_path if netns is None else netns, "CNI_IFNAME": ifname, "CNI_ARGS": args,
                "CNI_PATH": str(self.plugin.parent)}

    def run(self, stdin: bytes | dict, env: dict[str, str]) -> Outcome:
        """One plugin exec in the node namespace with a bare environment (plus the given CNI_* variables)."""
        data = json.dumps(stdin).encode() if isinstance(stdin, dict) else stdin
        proc = subprocess.run([str(self.plugin)], input=data, env={"PATH": BARE_PATH, **env}, capture_output=True,
                              timeout=60, preexec_fn=nsutil.preexec_enter(self.node.netns))
        return Outcome(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))

    def state(self) -> State:
        store = Store.open_existing(self.lab.node_dir(self.node.name) / "state")
        with netlink.route(nsutil.netns_path(self.node.netns)) as ipr:
            host = frozenset(netlink.host_veths(ipr, "sknf"))
        with netlink.route(self.pod_path) as ipr:
            names = {link["index"]: link.get("IFLA_IFNAME") for link in ipr.get_links()}
            routes = frozenset((names.get(r.get("RTA_OIF")), r.get("RTA_GATEWAY"))
                               for r in ipr.get_default_routes(family=socket.AF_INET))
        return State(frozenset((lease.container_id, lease.ifname, str(lease.ip)) for lease in store.leases()),
                     host, frozenset(names.values()), routes)


def assert_spec_error(out: Outcome, code: int | None = None) -> dict:
    """Exit 1 and one CNI error object on stdout (spec section 5); no traceback anywhere."""
    assert "Traceback" not in out.stdout + out.stderr
    assert out.rc == 1, out
    doc = json.loads(out.stdout)
    assert isinstance(doc, dict) and set(doc) <= {"cniVersion", "code", "msg", "details"}, doc
    assert doc["cniVersion"] in cni.SUPPORTED_VERSIONS, doc
    assert isinstance(doc["code"], int) and not isinstance(doc["code"], bool), doc
    assert isinstance(doc["msg"], str) and doc["msg"], doc
    assert isinstance(doc.get("details", ""), str), doc
    if code is not None:
        assert doc["code"] == code, doc
    return doc


@contextlib.contextmanager
def one_node_rig(prefix: str, pod_cidr: str | None = None, keep_lab_pod: bool = True,
                 datapath: str = "kernel") -> Iterator[Rig]:
    """A 1-node lab (kernel datapath unless asked); optionally a smaller pod subnet (agent restarted with
    it) and without the lab's own pod, so the store starts empty."""
    pod_netns = f"{prefix}-t"
    with managed_lab(prefix, nodes=1, pods_per_node=1, datapath=datapath) as lab:
        node = lab.state.nodes[0]
        if not keep_lab_pod:
            for pod in lab.state.pods + lab.state.shaped:  # the lab's bandwidth-annotated pod too
                run_chain(lab.plugin_dir, "DEL", lab.conflist(node), container_id=pod.container_id,
                          netns=nsutil.netns_path(pod.netns))
                pod.ip = ""  # nothing left for `down` to delete
        if pod_cidr is not None:
            path = Path(node.config)
            path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "pod_cidr": pod_cidr}))
            lab.restart_agent(node)
        pnetns.create(pod_netns)
        try:
            yield Rig(lab, node, pod_netns)
        finally:
            with contextlib.suppress(OSError):
                pnetns.remove(pod_netns)
