"""Doctor's pieces that need no root: exit codes, the agent verdict, nft rule matching, and sysdump's redaction."""

from __future__ import annotations

import ipaddress

import pytest

from sknf import doctor, sysdump
from sknf.config import Config


def cfg(**kw) -> Config:
    return Config(node_name="n1", cluster_cidr=ipaddress.IPv4Network("10.244.0.0/16"), peers_file="/p", **kw)


def agent(mode: str, reason: str) -> dict:
    return {"datapath": {"mode": mode, "reason": reason}}


def test_exit_codes_are_distinct_and_not_the_config_error_code() -> None:
    assert doctor.EXIT == {"OK": 0, "WARN": 3, "FAIL": 4}
    f = doctor.Finding
    assert doctor.overall([f("a", "OK", ""), f("b", "WARN", "")]) == "WARN"
    assert doctor.overall([f("a", "FAIL", ""), f("b", "WARN", "")]) == "FAIL"
    assert 2 not in doctor.EXIT.values()  # what `sknf` returns for a bad configuration


@pytest.mark.parametrize(("configured", "mode", "reason", "status"), [
    ("auto", "bpf", "", "OK"),
    ("kernel", "kernel", "datapath: kernel in config", "OK"),
    ("auto", "kernel", "no BCC (python3-bpfcc)", "WARN"),
])
def test_a_fallback_to_the_kernel_datapath_is_a_warning(configured: str, mode: str, reason: str, status: str) -> None:
    ctx = doctor.Context(cfg=cfg(datapath=configured), agent=agent(mode, reason))
    found = doctor.check_agent(ctx)
    assert found.status == status
    if status == "WARN":
        assert reason in found.message and found.fix


def test_an_agent_that_does_not_answer_fails_and_says_why() -> None:
    found = doctor.check_agent(doctor.Context(cfg=None, agent_error="no agent socket at /run/sknf/sknf.sock"))
    assert found.status == "FAIL" and "no agent socket" in found.message


def _rule(right) -> list[dict]:
    return [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": right}},
            {"drop": None}]


@pytest.mark.parametrize(("right", "hit"), [(4789, True), ({"set": [53, 4789]}, True), ({"range": [4000, 5000]}, True),
                                            (8472, False), ({"set": [53]}, False)])
def test_nft_port_matching(right, hit: bool) -> None:
    assert doctor._matches_port(_rule(right), 4789) is hit


def test_redaction_blanks_tokens_wherever_they_are() -> None:
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    text = (f"Authorization: Bearer abc.def-123\ntoken: s3cr3t\n  client-key-data: QUJD\n{jwt}\n"
            '{"password": "hunter2"}\nvxsknf mtu 1450\n')
    out = sysdump.redact(text)
    for secret in ("abc.def-123", "s3cr3t", "QUJD", jwt, "hunter2"):
        assert secret not in out
    assert "vxsknf mtu 1450" in out


CLUSTER = ipaddress.IPv4Network("10.244.0.0/16")


@pytest.mark.parametrize(("rule", "hit"), [
    ("-A FORWARD -j DROP", True),
    ('-A FORWARD -m comment --comment "block all" -j REJECT --reject-with icmp-port-unreachable', True),
    ("-A FORWARD -d 10.244.2.0/24 -j REJECT", True),
    ("-A FORWARD -s 10.0.0.0/8 -p tcp -m tcp --dport 80 -j DROP", True),
    ("-A FORWARD -i brsknf -j DROP", True),
    ("-A FORWARD -m conntrack --ctstate INVALID -j DROP", False),
    ("-A FORWARD -i docker0 -o docker0 -j DROP", False),
    ("-A FORWARD -d 192.168.0.0/16 -j DROP", False),
    ("-A FORWARD ! -s 10.244.0.0/16 -j DROP", False),
    ("-A FORWARD -j ACCEPT", False),
])
def test_which_iptables_drops_hit_pod_traffic(rule: str, hit: bool) -> None:
    assert doctor.drops_pod_traffic(rule, CLUSTER) is hit


def test_an_nft_chain_ending_in_a_bare_reject_drops_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "_backend_has_tables", lambda backend, ctx, family=4: False)  # iptables not consulted
    chain = {"family": "inet", "table": "firewalld", "name": "filter_FORWARD", "hook": "forward", "policy": "accept"}
    rule = {"family": "inet", "table": "firewalld", "chain": "filter_FORWARD"}
    established = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established"]}}
    ruleset = [{"chain": chain}, {"rule": {**rule, "expr": [established, {"accept": None}]}},
               {"rule": {**rule, "expr": [{"reject": {"type": "icmpx"}}]}}]
    ctx = doctor.Context(cfg=cfg(), agent={"iptables": "nft"}, nft=ruleset)
    assert doctor._nft_drops_by_default(ctx, chain)
    found = doctor.check_forward(ctx)
    assert found.status == "FAIL" and "firewalld filter_FORWARD (hook forward) drops by default" in found.message


def test_without_config_or_agent_every_check_that_runs_says_something() -> None:
    """The config FAIL lists what was skipped; no check crashes for want of a setting (read-only on this host)."""
    findings = doctor.diagnose(doctor.Context(cfg=None, config_error="node_name: required", nft=[],
                                              agent_error="no agent socket at /run/sknf/sknf.sock"))
    by_name = {f.check: f for f in findings}
    assert by_name["config"].status == "FAIL"
    assert "skipped: sknf-rules, mtu, routes, overlay" in by_name["config"].message
    assert by_name["agent"].status == "FAIL" and "skipped: peer-health" in by_name["agent"].message
    assert not [f for f in findings if "the check itself failed" in f.message]
    assert {"mtu", "routes", "overlay", "sknf-rules", "peer-health"}.isdisjoint(by_name)


@pytest.mark.parametrize(("used", "status"), [(0, "OK"), (79, "OK"), (80, "WARN"), (94, "WARN"), (95, "FAIL"),
                                              (100, "FAIL")])
def test_fill_levels_warn_from_80_and_fail_from_95_percent(used: int, status: str) -> None:
    assert doctor._fill("IPAM", used, 100) == (status, f"IPAM {used}/100 ({used}%)")


def test_with_node_objects_and_the_agent_down_the_subnet_is_compared_with_the_node(server, tmp_path) -> None:
    """A Node whose spec.podCIDR differs from the subnet the node's IPAM store holds is a FAIL, read from the API."""
    from kubeapi import node

    from sknf import kube
    from sknf.ipam import Store

    conf = Config(node_name="n1", cluster_cidr=ipaddress.IPv4Network("10.244.0.0/16"), peer_source="kubernetes",
                  kubeconfig=server.kubeconfig(tmp_path / "kubeconfig"), state_dir=tmp_path / "state")
    Store(conf.state_dir, ipaddress.IPv4Network("10.244.1.0/24")).allocate("c1", "eth0")  # the agent's store
    api = kube.connect(conf)
    api.create_node(node("n1", "192.0.2.1", "10.244.2.0/24"))
    found = doctor.check_pod_subnet(doctor.Context(cfg=conf, agent_error="agent down"))
    assert found.status == "FAIL"
    assert found.message.startswith("this node uses 10.244.1.0/24, its Node object says 10.244.2.0/24")

    api.delete_node("n1")
    api.create_node(node("n1", "192.0.2.1", "10.244.1.0/24"))
    found = doctor.check_pod_subnet(doctor.Context(cfg=conf, agent_error="agent down"))
    assert (found.status, found.message) == ("OK", "10.244.1.0/24, as in its Node object")
