"""IPv6-only clusters in both datapaths: one lab per datapath with no IPv4 anywhere (nodes, pods, Services,
the Internet host), VXLAN over the nodes' IPv6 underlay. The whole matrix runs over IPv6; the overlay is
really built over IPv6 (vxsknf's local address, its flood entries, the peer routes, the ip6tables
chains that accept VXLAN only from peers); `sknf doctor` is all OK (its peer probes are ICMPv6); and a
VXLAN frame forged from an IPv6 host that is no node is dropped, with a negative control that removes
the INPUT jump and shows it delivered and learned.

Cast (a 2-node lab, 2 pods per node): the victim of the forged frame is n1p2; the Internet host forges.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from frames import ETH_P_IPV6, ether, mac_of
from leftovers import managed_lab
from test_doctor import assert_all_ok
from test_dualstack import udp6
from test_spoofing import assert_forged_vxlan_refused, in_node, node

from sknf import netlink, nsutil, overlay
from sknf.config import BRIDGE, VXLAN
from sknf.lab import REPO, Lab, LabNode, LabPod

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "sku"


@pytest.fixture(scope="module", params=["kernel", "bpf"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    with managed_lab(PREFIX, nodes=2, pods_per_node=2, datapath=request.param, ipv6_only=True) as built:
        yield built


def test_the_whole_matrix_runs_over_ipv6(lab: Lab) -> None:
    results = lab.check(bulk_bytes=1 << 20)
    bad = [r for r in results if not r.ok]
    assert not bad, "\n".join(f"{r.flow}: {r.src} -> {r.dst}: {r.detail}" for r in bad)
    flows = {r.flow for r in results}
    assert {"pod->pod same node", "pod->pod across nodes", "pod->node (other)", "pod->Internet (SNAT)",
            "node->pod (other) source", "pod->ClusterIP TCP across nodes", "pod->ClusterIP UDP across nodes",
            "pod->kubernetes API (node IP) across nodes", "pod->UDP Service, no listener: ECONNREFUSED across nodes",
            "Internet->NodePort, Local policy: client kept", "pod MTU = underlay MTU - 70",
            "full-MTU datagram across nodes", "no pod address on the underlay"} <= flows
    assert all(":" in p.ip and not p.ip6 for p in lab.state.pods)  # the matrix's addresses are IPv6 ones
    assert all(":" in n.underlay_ip and ":" in n.gateway_ip for n in lab.state.nodes)
    assert all(":" in (s.cluster_ip or "::") and s.family == 6 for s in lab.services())


def test_nothing_has_ipv4(lab: Lab) -> None:
    """No IPv4 address on a node's underlay, a pod or brsknf: nothing can quietly fall back to it."""
    for where in (*lab.state.nodes, *lab.state.pods):
        with netlink.route(nsutil.netns_path(where.netns)) as ipr:
            v4 = [a.get("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)
                  if not a.get("IFA_ADDRESS").startswith("127.")]
        assert v4 == [], (where.name, v4)


def vxlan_info(n: LabNode) -> dict:
    with netlink.route(nsutil.netns_path(n.netns)) as ipr:
        link = netlink.link_info(ipr, VXLAN)
        return {"data": link.get("IFLA_LINKINFO").get("IFLA_INFO_DATA"), "mtu": link.get("IFLA_MTU"),
                "flood": netlink.flood_entries(ipr, link["index"])}


def test_vxlan_runs_over_the_ipv6_underlay(lab: Lab) -> None:
    n1, n2 = node(lab, "n1"), node(lab, "n2")
    info = vxlan_info(n1)
    assert info["data"].get("IFLA_VXLAN_LOCAL6") == n1.underlay_ip and not info["data"].get("IFLA_VXLAN_LOCAL")
    assert info["flood"] == {n2.underlay_ip}  # the head-end replication list is the peer's IPv6 address
    assert info["mtu"] == 1500 - 70
    assert f"local {n1.underlay_ip}" in in_node(n1, "ip", "-d", "link", "show", VXLAN)
    # pod -> peer node address: the IPv6 rule and table route it via the peer's gateway over the overlay
    assert f"lookup {overlay.PEER_ROUTE_TABLE}" not in in_node(n1, "ip", "-4", "rule")
    assert "from fd00:10:244::/56 iif brsknf lookup 4789" in in_node(n1, "ip", "-6", "rule")
    assert f"{n2.underlay_ip} via {n2.gateway_ip} dev {BRIDGE}" in in_node(
        n1, "ip", "-6", "route", "show", "table", str(overlay.PEER_ROUTE_TABLE))
    # VXLAN only from peers, and untracked, in ip6tables; nothing of the overlay's in iptables
    rules6 = in_node(n1, "ip6tables-nft", "-w", "-S", "SKNF-INPUT")
    assert f"-A SKNF-INPUT -s {n2.underlay_ip}/128 -p udp -m udp --dport 4789" in rules6 and "-j DROP" in rules6
    assert "CT --notrack" in in_node(n1, "ip6tables-nft", "-w", "-t", "raw", "-S", "SKNF-RAW-PREROUTING")
    assert in_node(n1, "iptables-nft", "-w", "-S", "SKNF-INPUT", check=False) == ""
    assert f"-d {n2.underlay_ip}/128" in in_node(n1, "ip6tables-nft", "-w", "-t", "nat", "-S", "SKNF-POSTROUTING")


def test_doctor_is_all_ok_with_icmpv6_probes(lab: Lab) -> None:
    for n in lab.state.nodes:
        assert_all_ok(n)


def test_sysdump_holds_the_ipv6_overlay(lab: Lab, tmp_path: Path) -> None:
    n1, n2 = node(lab, "n1"), node(lab, "n2")
    out = tmp_path / "dump.tar.gz"
    proc = subprocess.run([sys.executable, "-m", "sknf", "sysdump", "-c", n1.config, "-o", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO),
                          preexec_fn=nsutil.preexec_enter(n1.netns))
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(out) as tar:
        members = {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode() for m in tar.getmembers()}
    assert f"{n2.underlay_ip} via {n2.gateway_ip}" in members["net/routes6.txt"]
    assert "lookup 4789" in members["net/rules6.txt"]
    assert f"-A SKNF-INPUT -s {n2.underlay_ip}/128" in members["firewall/ip6tables-nft.txt"]
    assert f"dst {n2.underlay_ip}" in members["net/fdb.txt"]


def forged_vxlan(victim: LabPod, inner_src_mac: str, payload: bytes) -> bytes:
    inner = ether(mac_of(victim), inner_src_mac, ETH_P_IPV6, udp6("fd00:10:244:2::fa", victim.ip, payload))
    return struct.pack("!B3xI", 0x08, 1 << 8) + inner


def test_forged_vxlan_from_a_non_peer_ipv6_host_is_dropped(lab: Lab) -> None:
    assert_forged_vxlan_refused(lab, "ip6tables-nft", forged_vxlan, "vx6", "02:66:00:00:06")
