"""The agent's NetworkPolicy loop without a kernel: what it hands nftables and the datapath, in which order,
and what it logs."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import pytest

from sknf.config import Config
from sknf.ipam import Lease
from sknf.policy import Compiled
from sknf.policy import enforcer as policy_enforcer
from sknf.policy import nft as policy_nft
from sknf.policy.source import DirectorySource, Objects

LEASES = [Lease(ipaddress.IPv4Address("10.244.1.2"), "c1", "eth0", "lab", "a"),
          Lease(ipaddress.IPv4Address("10.244.1.3"), "c2", "eth0", "lab", "b")]
DENY_A = {"kind": "NetworkPolicy", "metadata": {"namespace": "lab", "name": "deny"},
          "spec": {"podSelector": {"matchLabels": {"pod": "a"}}}}
BROKEN = {"kind": "NetworkPolicy", "metadata": {"namespace": "lab", "name": "bad"},
          "spec": {"podSelector": {}, "policyTypes": ["Up"]}}
PODS = [{"kind": "Pod", "metadata": {"namespace": "lab", "name": n, "labels": {"pod": n}}} for n in ("a", "b")]


class Datapath:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def set_policy(self, compiled: Compiled) -> None:
        self.calls.append(("flags", sorted(compiled.selected())))


class Source:
    def __init__(self, objects: Objects | None) -> None:
        self.objects_value, self.reads, self.dirty = objects, 0, True

    def changed(self) -> bool:
        return self.dirty

    def objects(self) -> Objects | None:
        self.reads += 1
        self.dirty = False
        return self.objects_value

    def close(self) -> None:
        pass


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list:
    made: list = []
    monkeypatch.setattr(policy_nft, "apply", lambda compiled: made.append(("nft", sorted(compiled.selected()))) or True)
    monkeypatch.setattr(policy_nft, "forget_drops", lambda live: made.append(("forget", sorted(live))))
    return made


def test_rules_before_flags_and_the_compile_reused_while_inputs_stay(calls: list) -> None:
    source = Source(Objects(pods=PODS, policies=[DENY_A]))
    enforcer = policy_enforcer.Enforcer(source, Datapath(calls))
    enforcer.sync(LEASES)
    assert calls == [("nft", ["10.244.1.2"]), ("forget", ["10.244.1.2", "10.244.1.3"]), ("flags", ["10.244.1.2"])]
    enforcer.sync(LEASES)  # nothing changed: the table is still checked, nothing recompiled
    assert source.reads == 1 and calls[-2:] == [("forget", ["10.244.1.2", "10.244.1.3"]), ("flags", ["10.244.1.2"])]
    enforcer.sync(LEASES[1:])  # a pod went: compiled again
    assert source.reads == 2 and calls[-1] == ("flags", [])
    assert enforcer.annotate({"pods": [{"ip": "10.244.1.3"}]}) == {"pods": [{"ip": "10.244.1.3", "policies": {}}]}


def test_nothing_is_done_before_the_source_answered(calls: list) -> None:
    policy_enforcer.Enforcer(Source(None), Datapath(calls)).sync(LEASES)
    assert calls == []


def test_each_problem_is_logged_once(calls: list, caplog: pytest.LogCaptureFixture) -> None:
    source = Source(Objects(pods=PODS, policies=[BROKEN]))
    enforcer = policy_enforcer.Enforcer(source, Datapath(calls))
    with caplog.at_level(logging.WARNING, logger="sknf.policy.enforcer"):
        enforcer.sync(LEASES)
        source.dirty = True
        enforcer.sync(LEASES)
    assert caplog.text.count("NetworkPolicy lab/bad") == 1
    assert calls[-1] == ("flags", ["10.244.1.2", "10.244.1.3"])  # failed closed: both pods selected


def test_source_follows_the_settings(tmp_path: Path) -> None:
    base = {"node_name": "n1", "cluster_cidr": ipaddress.IPv4Network("10.244.0.0/16"), "peers_file": tmp_path}
    assert isinstance(policy_enforcer.source_for(Config(**base, policy_dir=tmp_path)), DirectorySource)
    assert policy_enforcer.source_for(Config(**base)) is None  # static peers, no directory: nothing to enforce
    assert policy_enforcer.source_for(Config(**base, policy_dir=tmp_path, network_policy=False)) is None
