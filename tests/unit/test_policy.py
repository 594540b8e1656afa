"""The NetworkPolicy compiler against a case table in the spirit of the upstream conformance tests.

A small cluster: namespaces x (team=a) and y (team=b), pods a/b/c in each, a DNS pod in kube-system;
this node holds x/a, x/b, y/a. The cluster is dual-stack: every pod but the DNS one also has an IPv6
address (`x/a:6` in a flow names it), from its Pod's status.podIPs, or for local pods their lease. Each
case installs policies and says, for (src, dst, protocol, port), whether a new flow is allowed once both
ends' rules are applied (sknf.policy.flow_allowed).
"""

from __future__ import annotations

import pytest

from sknf.policy import Allow, LocalEndpoint, compile_policies, flow_allowed

IPS = {"x/a": "10.244.1.2", "x/b": "10.244.1.3", "x/c": "10.244.2.2", "y/a": "10.244.1.4", "y/b": "10.244.2.3",
       "y/c": "10.244.2.4", "kube-system/dns": "10.244.2.10"}
IPS6 = {"x/a": "fd00:10:244:1::2", "x/b": "fd00:10:244:1::3", "y/a": "fd00:10:244:1::4", "x/c": "fd00:10:244:2::2",
        "y/b": "fd00:10:244:2::3", "y/c": "fd00:10:244:2::4"}
OUTSIDE = "192.0.2.7"
OUTSIDE6 = "2001:db8::7"
LOCAL = ("x/a", "x/b", "y/a")


def pod(key: str, ports: tuple[tuple[str, int, str], ...] = (("http", 80, "TCP"), ("dns", 53, "UDP"))) -> dict:
    ns, name = key.split("/")
    return {"metadata": {"namespace": ns, "name": name, "labels": {"pod": name, "app": "web" if name != "c" else "db"}},
            "spec": {"containers": [{"ports": [{"name": n, "containerPort": p, "protocol": proto}
                                               for n, p, proto in ports]}]},
            "status": {"podIP": IPS[key], "podIPs": [{"ip": a} for a in (IPS[key], IPS6.get(key)) if a]}}


PODS = [pod(k) for k in IPS if k != "x/b"] + [pod("x/b", (("http", 8080, "TCP"), ("dns", 53, "UDP")))]
NAMESPACES = [{"metadata": {"name": "x", "labels": {"team": "a"}}},
              {"metadata": {"name": "y", "labels": {"team": "b"}}}, {"metadata": {"name": "kube-system"}}]
ENDPOINTS = [LocalEndpoint(IPS[k], *k.split("/"), IPS6[k]) for k in LOCAL]


def policy(name: str, spec: dict, namespace: str = "x") -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def ip(key: str) -> str:
    if key.endswith(":6") and key[:-2] in IPS6:
        return IPS6[key[:-2]]
    return IPS.get(key, key)


DENY_ALL_INGRESS = policy("deny", {"podSelector": {}, "policyTypes": ["Ingress"]})
CASES = {
    "no policy: everything passes": ([], [("y/a", "x/a", "TCP", 80, True), ("x/a", OUTSIDE, "UDP", 53, True)]),
    "default deny ingress": ([DENY_ALL_INGRESS], [
        ("y/a", "x/a", "TCP", 80, False), ("x/b", "x/a", "UDP", 53, False),
        ("x/a", "y/a", "TCP", 80, True),  # egress is not covered
        ("y/b", "y/a", "TCP", 80, True)]),  # other namespace untouched
    "default deny both ways (implicit ingress, explicit egress)": (
        [policy("deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})],
        [("x/a", "y/a", "TCP", 80, False), ("y/a", "x/a", "TCP", 80, False), ("x/a", OUTSIDE, "TCP", 443, False)]),
    "allow from a namespace": ([DENY_ALL_INGRESS, policy("from-b", {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}]})], [
        ("y/a", "x/a", "TCP", 80, True), ("y/c", "x/b", "UDP", 9999, True),
        ("x/c", "x/a", "TCP", 80, False),  # same namespace, not team b
        ("y/a", "x/c", "TCP", 80, True)]),  # x/c is not local: nothing enforced here
    "namespace and pod selector combined": ([policy("combo", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}},
                               "podSelector": {"matchLabels": {"app": "db"}}}]}]})], [
        ("y/c", "x/a", "TCP", 80, True), ("y/a", "x/a", "TCP", 80, False), ("x/c", "x/a", "TCP", 80, False)]),
    "namespace and pod selector as two peers (an or)": ([policy("either", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}},
                              {"podSelector": {"matchLabels": {"app": "db"}}}]}]})], [
        ("y/c", "x/a", "TCP", 80, True), ("y/a", "x/a", "TCP", 80, True), ("x/c", "x/a", "TCP", 80, True),
        ("x/b", "x/a", "TCP", 80, False)]),
    "matchExpressions In / NotIn / Exists / DoesNotExist": ([policy("exprs", {
        "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]},
                                             {"key": "tier", "operator": "DoesNotExist"}]},
        "ingress": [{"from": [{"podSelector": {"matchExpressions": [
            {"key": "app", "operator": "NotIn", "values": ["web"]}, {"key": "pod", "operator": "Exists"}]}}]}]})], [
        ("x/c", "x/a", "TCP", 80, True), ("x/c", "x/b", "TCP", 80, True), ("x/b", "x/a", "TCP", 80, False)]),
    "all namespaces (empty namespaceSelector), nothing from outside": ([policy("cluster", {
        "podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]})], [
        ("y/b", "x/a", "TCP", 1, True), (OUTSIDE, "x/a", "TCP", 80, False)]),
    "ipBlock with except": ([policy("block", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/16",
                                           "except": ["10.244.2.0/24", "10.244.1.3/32"]}}]}]})],
        [("y/a", "x/a", "TCP", 80, True), ("x/c", "x/a", "TCP", 80, False), ("x/b", "x/a", "TCP", 80, False),
         (OUTSIDE, "x/a", "TCP", 80, False), ("10.244.3.9", "x/a", "UDP", 5, True)]),
    "named port resolves on each selected pod": ([policy("http", {
        "podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]})], [
        ("y/b", "x/a", "TCP", 80, True), ("y/b", "x/a", "TCP", 8080, False),
        ("y/b", "x/b", "TCP", 8080, True), ("y/b", "x/b", "TCP", 80, False),
        ("y/b", "x/a", "UDP", 80, False)]),
    "named egress port resolves on each destination": ([policy("to-http", {
        "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"podSelector": {}}], "ports": [{"port": "http", "protocol": "TCP"}]}]})], [
        ("x/a", "x/b", "TCP", 8080, True), ("x/a", "x/b", "TCP", 80, False), ("x/a", "x/c", "TCP", 80, True),
        ("x/a", "y/b", "TCP", 80, False)]),
    "port range with endPort": ([policy("range", {
        "podSelector": {}, "ingress": [{"ports": [{"protocol": "TCP", "port": 8000, "endPort": 8100}]}]})], [
        ("y/b", "x/a", "TCP", 8000, True), ("y/b", "x/a", "TCP", 8100, True), ("y/b", "x/a", "TCP", 8101, False),
        ("y/b", "x/a", "TCP", 7999, False), ("y/b", "x/a", "UDP", 8050, False)]),
    "protocol without port: every port of it": ([policy("udp", {
        "podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP"}]}]})], [
        ("y/b", "x/a", "UDP", 1, True), ("y/b", "x/a", "UDP", 65535, True), ("y/b", "x/a", "TCP", 80, False)]),
    "egress to DNS only": ([policy("dns", {
        "podSelector": {}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]})], [
        ("x/a", "kube-system/dns", "UDP", 53, True), ("x/a", "kube-system/dns", "TCP", 53, True),
        ("x/a", "kube-system/dns", "TCP", 80, False), ("x/a", "y/a", "UDP", 53, False),
        ("x/a", OUTSIDE, "UDP", 53, False), ("y/a", OUTSIDE, "TCP", 443, True)]),
    "implicit egress type from egress rules": ([policy("implicit", {
        "podSelector": {"matchLabels": {"pod": "a"}}, "egress": [{"to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}]}]})], [
        ("x/a", OUTSIDE, "TCP", 1, True), ("x/a", "y/a", "TCP", 80, False),
        ("y/b", "x/a", "TCP", 80, False)]),  # Ingress is implied too, with no rule: deny
    "union of policies": ([
        policy("p1", {"podSelector": {"matchLabels": {"pod": "a"}},
                      "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                                   "ports": [{"port": 80}]}]}),
        policy("p2", {"podSelector": {"matchLabels": {"app": "web"}},
                      "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}]})],
        [("x/b", "x/a", "TCP", 80, True), ("x/b", "x/a", "TCP", 81, False), ("x/c", "x/a", "UDP", 9, True),
         ("x/c", "x/b", "TCP", 80, True), ("x/a", "x/b", "TCP", 80, False)]),
    "allow all ingress rule ({})": ([DENY_ALL_INGRESS, policy("all", {"podSelector": {}, "ingress": [{}]})], [
        (OUTSIDE, "x/a", "UDP", 7, True)]),
    "SCTP port": ([policy("sctp", {"podSelector": {}, "ingress": [{"ports": [{"protocol": "SCTP", "port": 9999}]}]})], [
        ("y/b", "x/a", "SCTP", 9999, True), ("y/b", "x/a", "TCP", 9999, False), ("y/b", "x/a", "SCTP", 9998, False)]),
    "both ends local: egress and ingress both apply": ([
        policy("out", {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                       "egress": [{"ports": [{"port": 80}]}]}),
        policy("in", {"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"ports": [{"port": 81}]}]})], [
        ("x/a", "x/b", "TCP", 80, False), ("x/a", "x/b", "TCP", 81, False), ("x/a", "y/a", "TCP", 80, True)]),
    "invalid policy fails closed for its pods": ([policy("bad", {
        "podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]})], [
        ("y/b", "x/a", "TCP", 80, False), ("y/b", "x/b", "TCP", 80, True)]),
    "unreadable podSelector fails closed for its namespace": ([policy("bad", {
        "podSelector": {"matchExpressions": [{"key": "pod", "operator": "Near"}]}, "ingress": [{}]})], [
        ("y/b", "x/a", "TCP", 80, False), ("x/b", "y/b", "TCP", 80, False), ("y/b", "y/a", "TCP", 80, True)]),
    "one broken policy, the rest keeps enforcing": ([
        policy("bad", {"podSelector": {"matchLabels": {"pod": "b"}},
                       "ingress": [{"from": [{"ipBlock": {"cidr": "nope"}}]}]}),
        policy("good", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": 80}]}]})], [
        ("y/b", "x/a", "TCP", 80, True), ("y/b", "x/a", "TCP", 81, False), ("y/b", "x/b", "TCP", 80, False)]),
    "IPv6: default deny covers the pod's IPv6 address": ([DENY_ALL_INGRESS], [
        ("y/b:6", "x/a:6", "TCP", 80, False), ("x/b:6", "x/a:6", "UDP", 53, False),
        (OUTSIDE6, "x/b:6", "TCP", 1, False),
        ("x/a:6", "y/b:6", "TCP", 80, True),  # egress is not covered
        ("y/b:6", "y/a:6", "TCP", 80, True)]),  # other namespace untouched
    "IPv6: ipBlock with except": ([policy("block6", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"ipBlock": {"cidr": "fd00:10:244::/56",
                                           "except": ["fd00:10:244:2::/64", "fd00:10:244:1::3/128"]}}]}]})],
        [("y/a:6", "x/a:6", "TCP", 80, True), ("x/c:6", "x/a:6", "TCP", 80, False),
         ("x/b:6", "x/a:6", "TCP", 80, False), (OUTSIDE6, "x/a:6", "TCP", 80, False),
         ("fd00:10:244:3::9", "x/a:6", "UDP", 5, True),
         ("y/a", "x/a", "TCP", 80, False)]),  # an IPv6 block allows no IPv4 address
    "IPv6: a pod selector allows both addresses of a dual-stack pod": ([policy("from-c", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}], "ports": [{"port": "http"}]}]})], [
        ("x/c", "x/a", "TCP", 80, True), ("x/c:6", "x/a:6", "TCP", 80, True), ("x/c:6", "x/a:6", "TCP", 81, False),
        ("x/b:6", "x/a:6", "TCP", 80, False), ("y/c:6", "x/a:6", "TCP", 80, False)]),
    "IPv6: egress to pods on a named port, IPv4-only peers have no IPv6 address": ([policy("to-pods", {
        "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "http", "protocol": "TCP"}]}]})], [
        ("x/a:6", "x/b:6", "TCP", 8080, True), ("x/a:6", "x/b:6", "TCP", 80, False),
        ("x/a:6", "y/c:6", "TCP", 80, True),
        ("x/a", "kube-system/dns", "TCP", 80, True), ("x/a:6", OUTSIDE6, "TCP", 80, False)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_case_table(case: str) -> None:
    policies, flows = CASES[case]
    compiled = compile_policies(policies, PODS, NAMESPACES, ENDPOINTS)
    got = [(src, dst, proto, port, flow_allowed(compiled, ip(src), ip(dst), proto, port))
           for src, dst, proto, port, _ in flows]
    assert got == flows


def test_problems_name_the_object() -> None:
    bad = [policy("bad", {"podSelector": {}, "policyTypes": ["Sideways"]}), {"kind": "NetworkPolicy", "spec": {}}]
    broken_pod = {"metadata": {"namespace": "x", "name": "weird", "labels": ["not", "a", "map"]}}
    compiled = compile_policies(bad, [*PODS, broken_pod], NAMESPACES, ENDPOINTS)
    assert any("NetworkPolicy x/bad" in p and "policyTypes" in p for p in compiled.problems)
    assert any("(no name)" in p and "skipped" in p for p in compiled.problems)
    assert any("Pod x/weird" in p for p in compiled.problems)
    assert compiled.ingress[IPS["x/a"]].allows == () and compiled.egress[IPS["x/a"]].allows == ()


def test_policies_selecting_a_pod_are_named() -> None:
    compiled = compile_policies(CASES["union of policies"][0], PODS, NAMESPACES, ENDPOINTS)
    assert compiled.policies_of(IPS["x/a"]) == {"ingress": ["x/p1", "x/p2"]}
    assert compiled.policies_of(IPS["y/a"]) == {}
    assert compiled.selected() == {IPS["x/a"], IPS["x/b"], IPS6["x/a"], IPS6["x/b"]}  # both addresses of each


def test_except_splits_into_merged_intervals() -> None:
    spec = {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
                                                    {"ipBlock": {"cidr": "10.1.2.0/24"}}]}]}
    allows = compile_policies([policy("b", spec)], PODS, NAMESPACES, ENDPOINTS).ingress[IPS["x/a"]].allows
    assert allows == (Allow(((0x0A000000, 0x0A00FFFF), (0x0A010200, 0x0A0102FF), (0x0A020000, 0x0AFFFFFF)), None),)


def test_a_dual_stack_pod_shares_one_chain_between_its_addresses() -> None:
    from sknf.policy import nft as policy_nft

    spec = {"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}], "ports": [{"port": 80}]}]}
    chains, maps = policy_nft.desired(compile_policies([policy("c", spec)], PODS, NAMESPACES, ENDPOINTS))
    assert maps["ingress"] == {IPS["x/a"]: next(iter(chains))} and maps["ingress6"] == {IPS6["x/a"]: next(iter(chains))}
    assert maps["egress"] == maps["egress6"] == {}
    rules = policy_nft.chain_rules(*chains[next(iter(chains))])
    peers = [(r[0]["match"]["left"]["payload"]["protocol"], r[0]["match"]["right"]) for r in rules[:2]]
    assert peers == [("ip", {"set": [IPS["x/c"]]}), ("ip6", {"set": [IPS6["x/c"]]})]


def test_a_pod_without_its_object_is_selected_by_empty_selectors_only() -> None:
    lonely = LocalEndpoint("10.244.1.99", "x", "unknown")
    policies = [policy("web", {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": []}), DENY_ALL_INGRESS]
    compiled = compile_policies(policies, PODS, NAMESPACES, [*ENDPOINTS, lonely])
    assert compiled.policies_of("10.244.1.99") == {"ingress": ["x/deny"]}


def test_endpoints_with_the_same_rules_share_one_chain() -> None:
    from sknf.policy import nft as policy_nft

    compiled = compile_policies([DENY_ALL_INGRESS], PODS, NAMESPACES, ENDPOINTS)
    chains, maps = policy_nft.desired(compiled)
    chain = next(iter(chains))
    assert maps == {"ingress": {IPS["x/a"]: chain, IPS["x/b"]: chain}, "egress": {},
                    "ingress6": {IPS6["x/a"]: chain, IPS6["x/b"]: chain}, "egress6": {}}
    assert len(policy_nft.chain_rules(*chains[next(iter(chains))])) == 3  # nothing allowed: count (per family), drop


def test_rules_render_peers_protocols_and_port_ranges() -> None:
    from sknf.policy import nft as policy_nft

    spec = {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{
        "from": [{"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}}],
        "ports": [{"port": 80}, {"protocol": "TCP", "port": 8000, "endPort": 8100}, {"protocol": "UDP"}]}]}
    compiled = compile_policies([policy("r", spec)], PODS, NAMESPACES, ENDPOINTS)
    rules = policy_nft.chain_rules("ingress", compiled.ingress[IPS["x/a"]])
    peer = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                      "right": {"set": [{"range": ["192.0.2.0", "192.0.2.127"]}]}}}
    l4 = lambda p: {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": p}}  # noqa: E731
    dport = {"payload": {"protocol": "th", "field": "dport"}}
    assert rules[:2] == [
        [peer, l4("tcp"), {"match": {"op": "==", "left": dport, "right": {"set": [80, {"range": [8000, 8100]}]}}},
         {"return": None}],
        [peer, l4("udp"), {"return": None}]]  # every UDP port: no port match at all
    nfproto = lambda f: {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": f}}  # noqa: E731
    assert rules[2:] == [
        [nfproto("ipv4"), {"set": {"op": "update", "elem": {"payload": {"protocol": "ip", "field": "daddr"}},
                                   "set": "@dropped"}}],
        [nfproto("ipv6"), {"set": {"op": "update", "elem": {"payload": {"protocol": "ip6", "field": "daddr"}},
                                   "set": "@dropped6"}}],
        [{"drop": None}]]
