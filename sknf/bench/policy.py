"""`sknf bench policy`: NetworkPolicy compile and apply time with many pods and policies on one node.

A synthetic cluster: --pods pods (all local, the worst case for one node) in --namespaces namespaces,
labelled app=<one of 50>, tier=<front|back|db>, with a named port; --policies policies cycling
through the kinds the case table covers (pod selector + named port, namespace selector, ipBlock with
except, endPort range, egress to DNS only, default deny). Measured, each the median of --rounds: the
compile (sknf.policy), the first nftables transaction into an empty namespace of the benchmark's own,
the transaction after one policy changed (what a change costs on a running node), and a no-op apply
(what every reconcile costs). Target: compile <= 1 s for 1,000 pods and 200 policies.

--throughput: one TCP stream (iperf3, sknf.bench.datapath's load generators) to n1p1 from its neighbour and
from the other node, in a 2-node lab on the BPF datapath, interleaved per round between four states:
no policy; --policies policies installed that select none of the measured pods (their fast path, with
the policy table and a selected pod elsewhere on the node); n1p1 selected with an ingress rule allowing its
two clients on every TCP port, decided in the BPF programs (bpf); the same allow written as 17 port
ranges, beyond the programs' bounds, so n1p1 keeps the kernel path and nftables (kernel). Printed:
medians of per-round ratios to the no-policy state, with their range.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

from pyroute2 import netns as pnetns

from sknf import nsutil, stats
from sknf.bench import median_seconds
from sknf.bench.datapath import Pair, servers, throughput
from sknf.lab import Lab, manifests
from sknf.policy import LocalEndpoint, compile_policies
from sknf.policy import nft as policy_nft

TARGET = 1.0  # seconds to compile 1,000 pods and 200 policies


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--policies", type=int, default=200)
    parser.add_argument("--namespaces", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prefix", default="sknf-bench", help="name prefix of the namespaces this makes")
    parser.add_argument("--throughput", action="store_true", help="measure throughput in a lab instead")
    parser.add_argument("--seconds", type=int, default=2, help="--throughput: length of each iperf3 test")


def cluster(pods: int, policies: int, namespaces: int) -> tuple[list[dict], list[dict], list[dict],
                                                                  list[LocalEndpoint]]:
    ns = [{"metadata": {"name": f"ns{i}", "labels": {"team": f"t{i % 5}"}}} for i in range(namespaces)]
    objs, local = [], []
    for i in range(pods):
        ip = f"10.244.{1 + i // 250}.{2 + i % 250}"
        meta = {"namespace": f"ns{i % namespaces}", "name": f"p{i}",
                "labels": {"app": f"a{i % 50}", "tier": ("front", "back", "db")[i % 3]}}
        objs.append({"metadata": meta, "spec": {"containers": [{"ports": [
            {"name": "http", "containerPort": 8000 + i % 7}]}]}, "status": {"podIP": ip}})
        local.append(LocalEndpoint(ip, meta["namespace"], meta["name"]))
    kinds = [
        lambda k: {"podSelector": {"matchLabels": {"app": f"a{k % 50}"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "front"}}}],
                                "ports": [{"port": "http"}]}]},
        lambda k: {"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["back"]}]},
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": f"t{k % 5}"}}}]}]},
        lambda k: {"podSelector": {"matchLabels": {"tier": "db"}},
                   "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": [f"10.244.{k % 4}.0/24"]}}]}]},
        lambda k: {"podSelector": {"matchLabels": {"app": f"a{k % 50}"}},
                   "ingress": [{"ports": [{"protocol": "TCP", "port": 9000, "endPort": 9000 + k}]}]},
        lambda k: {"podSelector": {}, "policyTypes": ["Egress"],
                   "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns0"}}}],
                               "ports": [{"protocol": "UDP", "port": 53}]}]},
        lambda k: {"podSelector": {"matchLabels": {"app": f"a{k % 50}", "tier": "front"}}, "policyTypes": ["Ingress"]},
    ]
    pols = [{"metadata": {"namespace": f"ns{k % namespaces}", "name": f"pol{k}"}, "spec": kinds[k % len(kinds)](k)}
            for k in range(policies)]
    return pols, objs, ns, local


STATES = ("none", "installed", "bpf", "kernel")
# n1p1 selected, allowing its two clients on every TCP port: as 1 range (the programs decide), or as 1
# TCP range + 16 UDP ports (beyond the programs' 16 ranges: ENDPOINT_POLICY, nftables on the kernel path)
SELECTED_PORTS = {"bpf": [{"protocol": "TCP"}],
                  "kernel": [{"protocol": "TCP", "port": 1, "endPort": 65535}]
                  + [{"protocol": "UDP", "port": 40000 + 2 * i} for i in range(16)]}


def _state(lab: Lab, state: str, policies: int) -> None:
    """Write the manifests of one state and wait until n1's agent enforces it (its stats say so)."""
    docs = [{"kind": "NetworkPolicy", "metadata": {"namespace": manifests.LAB_NAMESPACE, "name": f"p{k}"},
             "spec": {"podSelector": {"matchLabels": {"pod": "n1p2" if k == 0 else f"nobody{k}"}},
                      "ingress": [{"ports": [{"port": 9000 + k}]}]}} for k in range(policies)]
    if state in SELECTED_PORTS:
        clients = [{"podSelector": {"matchLabels": {"pod": p}}} for p in ("n1p2", "n2p1")]
        docs.append({"kind": "NetworkPolicy", "metadata": {"namespace": manifests.LAB_NAMESPACE, "name": "all"},
                     "spec": {"podSelector": {"matchLabels": {"pod": "n1p1"}},
                              "ingress": [{"from": clients, "ports": SELECTED_PORTS[state]}]}})
    if state == "none":
        manifests.remove(lab.manifest_dir, "bench")
    else:
        manifests.write(lab.manifest_dir, "bench", docs)
    node = lab.state.nodes[0]
    want = {"ingress": ["lab/all"]} if state in SELECTED_PORTS else {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = stats.query_agent(lab.node_dir(node.name) / "run" / "sknf.sock")["pods"]
        if next(r for r in rows if r["pod"] == "n1p1").get("policies") == want:
            time.sleep(1)  # the datapath flag follows the rules within the same apply
            return
        time.sleep(0.2)
    raise RuntimeError(f"state {state} not applied after 30 s")


def run_throughput(args: argparse.Namespace) -> int:
    samples: dict[tuple[str, str], list[float]] = {}
    with Lab(prefix=args.prefix, nodes=2, pods_per_node=2, datapath="bpf") as lab:
        by_name = {p.name: p for p in lab.state.pods}
        pairs = [Pair(f"{src}->n1p1", "policy", by_name[src].netns, by_name["n1p1"].netns, by_name["n1p1"].ip, "")
                 for src in ("n1p2", "n2p1")]
        with servers(pairs, 0):
            for r in range(args.rounds):
                for state in STATES[r % len(STATES):] + STATES[:r % len(STATES)]:  # the order rotates
                    _state(lab, state, args.policies)
                    for pair in pairs:
                        samples.setdefault((state, pair.name), []).append(throughput(pair, args.seconds, 0))
        _state(lab, "none", args.policies)
    print(f"sknf bench policy --throughput: {args.rounds} rounds x {args.seconds} s, one TCP stream, BPF datapath "
          "(ratios of samples taken side by side; a shared machine's noise is in the ranges)")
    for pair in pairs:
        base = samples[("none", pair.name)]
        print(f"  {pair.name}: no policy {statistics.median(base):.2f} Gbit/s")
        for state in STATES[1:]:
            ratios = sorted(a / b for a, b in zip(samples[(state, pair.name)], base, strict=True))
            print(f"    {state:<9} {statistics.median(samples[(state, pair.name)]):.2f} Gbit/s, "
                  f"{statistics.median(ratios):.3f} x no policy (range {ratios[0]:.3f}-{ratios[-1]:.3f})")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.throughput:
        return run_throughput(args)
    pols, pods, namespaces, local = cluster(args.pods, args.policies, args.namespaces)
    compiled = compile_policies(pols, pods, namespaces, local)
    compile_s = median_seconds(lambda: compile_policies(pols, pods, namespaces, local), args.rounds)
    chains, _ = policy_nft.desired(compiled)
    rules = sum(len(policy_nft.chain_rules(*c)) for c in chains.values())
    print(f"{args.pods} pods, {args.policies} policies, {args.namespaces} namespaces: "
          f"{len(compiled.selected())} endpoints selected, {len(chains)} chains, {rules} rules, "
          f"{len(compiled.problems)} problems")
    print(f"compile: {compile_s * 1000:.0f} ms (median of {args.rounds}), {compile_s / TARGET:.2f} x the "
          f"{TARGET:.0f} s target: {'met' if compile_s <= TARGET else 'NOT met'}")
    if os.geteuid() != 0:
        print("nftables figures need root (a network namespace of the benchmark's own)", file=sys.stderr)
        return 0
    ns = f"{args.prefix}-policy"
    pnetns.create(ns)
    try:
        with nsutil.entered(ns):
            changed = [dict(p) for p in pols]

            def first() -> None:
                policy_nft.remove()
                policy_nft.apply(compiled)

            first_s = median_seconds(first, args.rounds)
            flips = iter(range(10**6))

            def one_change() -> None:
                k = next(flips)
                changed[0] = {**pols[0], "spec": {**pols[0]["spec"], "ingress": [{"ports": [{"port": 1 + k}]}]}}
                policy_nft.apply(compile_policies(changed, pods, namespaces, local))

            change_s = median_seconds(one_change, args.rounds)
            policy_nft.apply(compiled)
            noop_s = median_seconds(lambda: policy_nft.apply(compiled), args.rounds)
            policy_nft.remove()
    finally:
        with contextlib.suppress(OSError):
            pnetns.remove(ns)
    print(f"nft first apply: {first_s * 1000:.0f} ms; one policy changed (compile + apply): "
          f"{change_s * 1000:.0f} ms; no-op apply (every reconcile): {noop_s * 1000:.0f} ms")
    return 0
