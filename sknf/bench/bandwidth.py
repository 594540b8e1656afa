"""`sknf bench bandwidth`: how closely a bandwidth-annotated pod gets its rates, per direction and datapath.

For each datapath (kernel, bpf) a 2-node, 1-pod-per-node lab is built (namespaces only), and a pod is
added on n1 through the conflist the agent installed, with `runtimeConfig.bandwidth` as containerd and
CRI-O send it for `kubernetes.io/{in,e}gress-bandwidth` annotations: the rate in bit/s and a burst of
2**32 - 1 bits. One TCP stream (iperf3, the receiver's rate, the first seconds omitted so the token
bucket's initial burst does not count) is measured in each direction: from the pod to the pod on the
other node, to it from the pod on its own node (the BPF fast path's same-node redirect) and from the
pod on the other node (the overlay's). Printed: the goodput iperf3 reports, and achieved/requested
on the wire, which is what tbf counts: goodput x frame / TCP payload (MTU + 14 over MTU - 52, with
timestamps). Target: within 10%. This is a benchmark: it prints PASS/MISS and exits 0 whatever they say.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator

from pyroute2 import netns as pnetns

from sknf import netlink, nsutil
from sknf.bench.datapath import BenchError, _wait_bound
from sknf.lab import Lab, LabNode, LabPod, run_chain
from sknf.lab.runtime import KUBELET_BURST, bandwidth, with_runtime_config

IPERF_PORT = 5202
TARGET = 0.10


@contextlib.contextmanager
def extra_pod(lab: Lab, node: LabNode, name: str, runtime_config: dict | None = None) -> Iterator[LabPod]:
    """A pod added (and on exit deleted) through the node's installed conflist, as a runtime does."""
    ns = f"{lab.prefix}-{name}"
    pnetns.create(ns)
    pod = LabPod(name=name, node=node.name, netns=ns,
                 container_id=hashlib.sha256(f"{lab.prefix}/{name}".encode()).hexdigest())
    conflist = with_runtime_config(lab.conflist(node), runtime_config or {})
    kw = {"container_id": pod.container_id, "netns": nsutil.netns_path(ns)}
    try:
        result = run_chain(lab.plugin_dir, "ADD", conflist, args=f"K8S_POD_NAMESPACE=lab;K8S_POD_NAME={name}", **kw)
        pod.ip = result["ips"][0]["address"].split("/")[0]
        pod.host_ifname = result["interfaces"][0]["name"]
        yield pod
    finally:
        try:
            run_chain(lab.plugin_dir, "DEL", conflist, **kw)
        finally:
            with contextlib.suppress(OSError):
                pnetns.remove(ns)


@contextlib.contextmanager
def iperf_servers(pods: list[LabPod]) -> Iterator[None]:
    """An iperf3 server in each pod, on its address; killed by PID on exit."""
    procs = []
    try:
        for pod in pods:
            procs.append(subprocess.Popen(["iperf3", "-s", "-B", pod.ip, "-p", str(IPERF_PORT)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, preexec_fn=nsutil.preexec_enter(pod.netns)))
        for proc in procs:
            _wait_bound(proc, "tcp", IPERF_PORT)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def rate(client: LabPod, server: LabPod, seconds: int, reverse: bool = False, omit: int = 1) -> float:
    """Bit/s of one TCP stream client -> server (server -> client with reverse), as its receiver counted it."""
    argv = ["iperf3", "-c", server.ip, "-p", str(IPERF_PORT), "-t", str(seconds), "-O", str(omit), "-J",
            *(["-R"] if reverse else [])]
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=seconds + omit + 30,
                          preexec_fn=nsutil.preexec_enter(client.netns))
    try:
        return json.loads(proc.stdout)["end"]["sum_received"]["bits_per_second"]
    except (ValueError, KeyError):
        raise BenchError(f"iperf3 {client.name} -> {server.name}: {(proc.stdout + proc.stderr)[-400:]}") from None


# path -> (the lab pod at the other end, data flows to the measured pod): n1p1 shares the measured
# pod's node n1 (the fast path's same-node redirect), n2p1 is on the other node (the overlay's).
PATHS = {"egress (to n2p1)": ("n2p1", False), "ingress (from n1p1)": ("n1p1", True),
         "ingress (from n2p1)": ("n2p1", True)}


def directions(lab: Lab, pod: LabPod, seconds: int, omit: int = 1, paths: tuple[str, ...] = tuple(PATHS)
               ) -> dict[str, float]:
    """{path: bit/s} of pod against the lab's pods, whose iperf3 servers must run (see PATHS)."""
    pods = {p.name: p for p in lab.state.pods}
    return {path: rate(pod, pods[PATHS[path][0]], seconds, reverse=PATHS[path][1], omit=omit) for path in paths}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=50, help="ingress and egress rate in Mbit/s (default 50)")
    parser.add_argument("--seconds", type=int, default=8, help="length of each measurement (default 8)")
    parser.add_argument("--omit", type=int, default=2, help="seconds omitted at the start (default 2)")
    parser.add_argument("--prefix", default="skbw", help="namespace prefix of the labs (default skbw)")


def run(args: argparse.Namespace) -> int:
    if shutil.which("iperf3") is None:
        raise BenchError("sknf bench bandwidth needs iperf3")
    requested = int(args.rate * 1e6)
    print(f"sknf bench bandwidth: {args.rate:g} Mbit/s each way, burst {KUBELET_BURST} bits (as containerd "
          f"sends it), one TCP stream per direction, {args.seconds} s after {args.omit} s omitted")
    print(f"{'datapath':9} {'direction':22} {'goodput':>12} {'wire/requested':>15}  target ±{TARGET:.0%}")
    for datapath in ("kernel", "bpf"):
        with Lab(prefix=args.prefix, nodes=2, pods_per_node=1, datapath=datapath) as lab, \
                extra_pod(lab, lab.state.nodes[0], "n1bw", {"bandwidth": bandwidth(requested, requested)}) as pod, \
                iperf_servers(lab.state.pods):
            with netlink.route(nsutil.netns_path(pod.netns)) as ipr:
                mtu = netlink.link_info(ipr, "eth0").get("IFLA_MTU")
            for name, bits in directions(lab, pod, args.seconds, args.omit).items():
                ratio = bits * (mtu + 14) / (mtu - 52) / requested
                verdict = "PASS" if abs(ratio - 1) <= TARGET else "MISS"
                print(f"{datapath:9} {name:22} {bits / 1e6:8.1f} Mbit/s {ratio:15.3f}  {verdict}", flush=True)
    return 0
