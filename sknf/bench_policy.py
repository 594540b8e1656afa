"""`sknf bench policy`: NetworkPolicy compile and apply time with many pods and policies on one node.

A synthetic cluster: --pods pods (all local, the worst case for one node) in --namespaces namespaces,
labelled app=<one of 50>, tier=<front|back|db>, with a named port; --policies policies cycling
through the kinds the case table covers (pod selector + named port, namespace selector, ipBlock with
except, endPort range, egress to DNS only, default deny). Measured, each the median of --rounds: the
compile (sknf.policy), the first nftables transaction into an empty namespace of the benchmark's own,
the transaction after one policy changed (what a change costs on a running node), and a no-op apply
(what every reconcile costs). Target: compile <= 1 s for 1,000 pods and 200 policies.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

from pyroute2 import netns as pnetns

from sknf import nsutil, policy_nft
from sknf.policy import LocalEndpoint, compile_policies

TARGET = 1.0  # seconds to compile 1,000 pods and 200 policies


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--policies", type=int, default=200)
    parser.add_argument("--namespaces", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prefix", default="sknf-bench", help="name prefix of the namespace nft runs in")


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


def _median(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(args: argparse.Namespace) -> int:
    pols, pods, namespaces, local = cluster(args.pods, args.policies, args.namespaces)
    compiled = compile_policies(pols, pods, namespaces, local)
    compile_s = _median(lambda: compile_policies(pols, pods, namespaces, local), args.rounds)
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

            first_s = _median(first, args.rounds)
            flips = iter(range(10**6))

            def one_change() -> None:
                k = next(flips)
                changed[0] = {**pols[0], "spec": {**pols[0]["spec"], "ingress": [{"ports": [{"port": 1 + k}]}]}}
                policy_nft.apply(compile_policies(changed, pods, namespaces, local))

            change_s = _median(one_change, args.rounds)
            policy_nft.apply(compiled)
            noop_s = _median(lambda: policy_nft.apply(compiled), args.rounds)
            policy_nft.remove()
    finally:
        with contextlib.suppress(OSError):
            pnetns.remove(ns)
    print(f"nft first apply: {first_s * 1000:.0f} ms; one policy changed (compile + apply): "
          f"{change_s * 1000:.0f} ms; no-op apply (every reconcile): {noop_s * 1000:.0f} ms")
    return 0
