"""containerd drives sknf: `ctr run --cni` (go-cni/libcni, the library containerd's CRI plugin calls for
kubelet's pod sandboxes) on a lab node, with a private containerd and no Python visible to the runtime.

ctr reads the fixed paths /etc/cni/net.d and /opt/cni/bin and sets up the container's network from its own
namespace, so it runs inside the node's network namespace and a private mount namespace where the node's
conflist and a plugin directory (sknf, the lab's installed binary, and the reference portmap and bandwidth)
are mounted over those paths, and /usr/bin/python3 is hidden (/dev/null mounted over the interpreter): the
whole ADD and DEL path of the runtime runs without Python. The image is busybox in an OCI archive made
here. Recipe: /work/shared/containerd-recipe.md. Nothing touches the host's /etc/cni, /opt or containerd.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from leftovers import managed_lab

from sknf import netlink, nsutil
from sknf.ipam import Store
from sknf.lab import REFERENCE_PLUGINS, SERVER_PORT, Lab, _stop

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "skc"
IMAGE = "localhost/skc-busybox:1"
PYTHON = Path("/usr/bin/python3")
MISSING = [tool for tool in ("containerd", "ctr", "containerd-shim-runc-v2") if shutil.which(tool) is None]
if MISSING:
    pytest.skip(f"containerd is not installed ({', '.join(MISSING)} missing; scripts/setup.sh installs it)",
                allow_module_level=True)


def blob(out: tarfile.TarFile, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    out.addfile(info, io.BytesIO(data))
    return {"digest": f"sha256:{digest}", "size": len(data)}


def busybox_archive(path: Path) -> None:
    """An OCI image archive: one layer with static busybox and its applet links."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as t:
        for d in ("bin", "proc", "sys", "dev", "etc", "tmp"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            t.addfile(info)
        t.add("/bin/busybox", "bin/busybox")
        for applet in ("sh", "ip", "nc", "cat"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            t.addfile(info)
    layer_bytes = layer.getvalue()
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]},
              "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(layer_bytes).hexdigest()}"]}}
    with tarfile.open(path, "w") as out:
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               **blob(out, json.dumps(config).encode())},
                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **blob(out, layer_bytes)}]}
        index = {"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", **blob(out, json.dumps(manifest).encode()),
            "annotations": {"io.containerd.image.name": IMAGE, "org.opencontainers.image.ref.name": "1"}}]}
        for name, doc in (("index.json", index), ("oci-layout", {"imageLayoutVersion": "1.0.0"})):
            data = json.dumps(doc).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


@dataclass
class Containerd:
    work: Path
    pid: int

    @property
    def address(self) -> str:
        return str(self.work / "c.sock")

    def ctr(self, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run(["ctr", "--address", self.address, *args], capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"ctr {' '.join(args)}: {proc.stderr.strip()}"
        return proc.stdout.strip()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with managed_lab(PREFIX, nodes=2, pods_per_node=1, datapath="kernel") as built:
        yield built


@pytest.fixture(scope="module")
def daemon() -> Iterator[Containerd]:
    """A private daemon (its own root, state, socket, opt dir; CRI off), ended by its PID."""
    work = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))
    (work / "config.toml").write_text("\n".join([
        "version = 2", 'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
        '[plugins."io.containerd.internal.v1.opt"]', f'  path = "{work}/opt"', ""]))
    log = open(work / "containerd.log", "wb")  # noqa: SIM115 - handed to the daemon
    proc = subprocess.Popen(["containerd", "--config", str(work / "config.toml"), "--root", str(work / "root"),
                             "--state", str(work / "state"), "--address", str(work / "c.sock")],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    daemon = Containerd(work, proc.pid)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["ctr", "--address", daemon.address, "version"], capture_output=True).returncode:
            assert proc.poll() is None and time.monotonic() < deadline, (work / "containerd.log").read_text()
            time.sleep(0.2)
        busybox_archive(work / "busybox.tar")
        daemon.ctr("images", "import", str(work / "busybox.tar"))
        yield daemon
    finally:
        subprocess.run(["ctr", "--address", daemon.address, "tasks", "kill", "-s", "SIGKILL", "skc-1"],
                       capture_output=True, check=False)
        _stop(proc.pid, signal.SIGTERM)
        with open("/proc/mounts") as f:
            mounted = [line.split()[1] for line in f if str(work) in line.split()[1]]
        for target in reversed(mounted):
            subprocess.run(["umount", "-l", target], check=False)
        shutil.rmtree(work, ignore_errors=True)
        assert mounted == []


def run_in_node(lab: Lab, daemon: Containerd, node: int, *ctr_args: str) -> subprocess.CompletedProcess[str]:
    """ctr inside the node's network namespace and a private mount namespace with the node's CNI files at
    the fixed paths and Python hidden; the script checks it is hidden before it execs ctr."""
    n = lab.state.nodes[node]
    bindir = daemon.work / f"cni-bin-{n.name}"
    bindir.mkdir(exist_ok=True)
    for plugin, source in (("sknf", lab.root / "bin" / "sknf"), ("portmap", Path(REFERENCE_PLUGINS) / "portmap"),
                           ("bandwidth", Path(REFERENCE_PLUGINS) / "bandwidth")):
        if not (bindir / plugin).exists():
            shutil.copy(source, bindir / plugin)
    script = ('mount --bind "$1" /etc/cni/net.d && mount -t tmpfs tmpfs /opt && mkdir -p /opt/cni/bin'
              ' && mount --bind "$2" /opt/cni/bin && mount --bind /dev/null "$3" || exit 90;'
              ' if "$4" -c pass 2>/dev/null; then echo "python still runs" >&2; exit 91; fi;'
              ' shift 4; exec "$@"')
    argv = ["nsenter", f"--net={nsutil.netns_path(n.netns)}", "unshare", "--mount", "--propagation", "private",
            "sh", "-c", script, "sh", str(lab.node_dir(n.name) / "net.d"), str(bindir), str(PYTHON.resolve()),
            str(PYTHON), "ctr", "--address", daemon.address, *ctr_args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def leases(lab: Lab, node: int) -> dict[str, str]:
    store = Store.open_existing(lab.node_dir(lab.state.nodes[node].name) / "state")
    return {lease.container_id: str(lease.ip) for lease in store.leases()}


def host_veths(lab: Lab, node: int) -> list[str]:
    with netlink.route(nsutil.netns_path(lab.state.nodes[node].netns)) as ipr:
        return sorted(netlink.host_veths(ipr, "sknf"))


def test_a_container_gets_its_address_reaches_the_other_node_and_leaves_nothing(lab: Lab,
                                                                                daemon: Containerd) -> None:
    n1 = lab.state.nodes[0]
    far = next(p for p in lab.state.pods if p.node == lab.state.nodes[1].name)
    before = (leases(lab, 0), host_veths(lab, 0))
    script = f"ip -4 -o addr show eth0; ip route show default; echo WHO | nc {far.ip} {SERVER_PORT}"
    proc = run_in_node(lab, daemon, 0, "run", "--cni", "--rm", IMAGE, "skc-1", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    ip = next(line for line in lines if " inet " in line).split()[3]
    route, answer = next(line for line in lines if line.startswith("default ")), lines[-1]
    assert ipaddress.IPv4Interface(ip).network == ipaddress.IPv4Network("10.244.0.0/16")  # the cluster prefix
    assert ipaddress.IPv4Interface(ip).ip in ipaddress.IPv4Network(n1.pod_cidr)
    assert route.split()[:3] == ["default", "via", n1.gateway_ip]
    assert answer.split() == [str(ipaddress.IPv4Interface(ip).ip), far.name]  # no NAT across nodes
    # removed (--rm): DEL ran through the chain, nothing of the container is left
    assert (leases(lab, 0), host_veths(lab, 0)) == before
    assert daemon.ctr("containers", "list", "-q") == ""
    assert daemon.ctr("tasks", "list", "-q") == ""
    assert [line for line in daemon.ctr("snapshots", "list").splitlines() if "Active" in line] == []  # image's stay


def test_python_is_hidden_from_the_runtime(lab: Lab, daemon: Containerd) -> None:
    """The negative control of the test above: in that mount namespace the interpreter does not start, so
    the old `#!/usr/bin/python3` plugin could not have run (exit 91 would mean Python still runs)."""
    proc = run_in_node(lab, daemon, 0, "version")
    assert proc.returncode == 0, proc.stderr
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            'mount --bind /dev/null "$1" && exec "$2" -c pass', "sh", str(PYTHON.resolve()),
                            str(PYTHON)], capture_output=True, text=True, timeout=30)
    assert probe.returncode == 126, probe  # "permission denied": not an executable any more
    assert os.access(PYTHON, os.X_OK)  # and the host's own is untouched
