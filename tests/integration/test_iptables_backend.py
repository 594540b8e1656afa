"""A host whose firewall lives in one iptables backend, with FORWARD policy DROP there: sknf finds that
backend (kube-proxy's iptables-wrapper rule, sknf/iptables.py), puts its rules in it, and the lab's whole
matrix passes in kernel mode (the mode where every pod packet crosses FORWARD). Both backends, one lab each;
the DROP is set in each node before its agent starts, as a host's firewall is there before sknf.

Negative control in each lab: with sknf's FORWARD jump taken out of the chosen backend, traffic between
nodes' pods stops (the DROP is real), and it flows again once the agent's reconcile puts the jump back.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from leftovers import managed_lab

from sknf import iptables, nsutil
from sknf.lab import REPO, Lab, print_matrix, who

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module", params=["legacy", "nft"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    backend = iptables.Backend(request.param)
    prefix = f"skl-{request.param[0]}"
    with managed_lab(prefix, nodes=2, pods_per_node=2, datapath="kernel",
                     node_setup=[[backend.iptables, "-w", "-P", "FORWARD", "DROP"]]) as built:
        yield built


@pytest.fixture
def backend(lab: Lab) -> iptables.Backend:
    """The backend this lab's host firewall (its FORWARD DROP) lives in."""
    return iptables.Backend(lab.node_setup[0][0].removeprefix("iptables-"))


def in_node(lab: Lab, argv: list[str], node: int = 0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, preexec_fn=nsutil.preexec_enter(lab.state.nodes[node].netns), capture_output=True,
                          text=True, timeout=60, check=False)


def test_the_agent_chose_the_hosts_backend(lab: Lab, backend: iptables.Backend) -> None:
    other = iptables.Backend("nft" if backend.mode == "legacy" else "legacy")
    for i, node in enumerate(lab.state.nodes):
        log = (lab.node_dir(node.name) / "agent.log").read_text()
        assert f"iptables backend {backend.mode} (" in log
        assert "-P FORWARD DROP" in in_node(lab, [backend.iptables, "-w", "-S", "FORWARD"], i).stdout
        assert iptables.FORWARD_CHAIN in in_node(lab, [backend.iptables, "-w", "-S", "FORWARD"], i).stdout
        assert iptables.FORWARD_CHAIN not in in_node(lab, [other.save], i).stdout  # nothing in the other one
        stats = subprocess.run([sys.executable, "-m", "sknf", "stats", "-c", node.config],
                               preexec_fn=nsutil.preexec_enter(node.netns), capture_output=True, text=True,
                               timeout=60, cwd=str(REPO), check=True)
        assert f"  iptables {backend.mode}  " in stats.stdout.splitlines()[0]


def test_the_matrix_passes_with_forward_drop(lab: Lab) -> None:
    results = lab.check(bulk_bytes=4 << 20)
    assert print_matrix(results), [r for r in results if not r.ok]


def test_without_sknfs_jump_the_drop_bites(lab: Lab, backend: iptables.Backend) -> None:
    """The agents are stopped first (pods keep their network): their 2-second reconcile would put the jump
    back before the SYN's retransmission, and hide the drop. Their restart restores it."""
    a = next(p for p in lab.state.pods if p.node == "n1")
    b = next(p for p in lab.state.pods if p.node == "n2")
    jump = ["FORWARD", *iptables.COMMENT, "-j", iptables.FORWARD_CHAIN]
    for node in lab.state.nodes:
        lab.stop_agent(node)
    for i in range(len(lab.state.nodes)):
        assert in_node(lab, [backend.iptables, "-w", "-D", *jump], i).returncode == 0
    with pytest.raises(TimeoutError):
        who(a.netns, b.ip)
    for node in lab.state.nodes:
        lab.restart_agent(node)
    assert all(in_node(lab, [backend.iptables, "-w", "-C", *jump], i).returncode == 0
               for i in range(len(lab.state.nodes)))
    assert who(a.netns, b.ip) == (a.ip, b.name)
