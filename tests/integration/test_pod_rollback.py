"""A failure at ADD's last step (the datapath refusing the pod) unwinds every earlier step:
no lease, no host veth, no interface left in the pod's namespace."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import netns as pnetns

from sknf import cni, ipam, iptables, netlink, nsutil, overlay, pod
from sknf.config import HOST_VETH_PREFIX, load
from sknf.datapath.kernel import KernelDatapath

pytestmark = pytest.mark.root
NODE, POD = "skr-node", "skr-pod"
POD_CIDR = ipaddress.IPv4Network("10.244.1.0/24")


class RefusingDatapath(KernelDatapath):
    """A datapath whose attach fails, as a BPF attach can (verifier, clsact gone)."""

    def attach_pod(self, ep) -> None:
        raise OSError("attach refused")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[pod.PodNetwork]:
    for ns in (NODE, POD):
        pnetns.create(ns)
    try:
        with netlink.route(nsutil.netns_path(NODE)) as ipr:
            netlink.create_veth(ipr, "eth0", "peer0", nsutil.netns_path(POD), 1500)
            idx = netlink.link_index(ipr, "eth0")
            ipr.addr("add", index=idx, address="198.51.100.11", prefixlen=24)
            ipr.link("set", index=idx, state="up")
        (tmp_path / "peers.yaml").write_text("nodes: []\n")
        cfg = load(env={"NODE_NAME": "n1", "CLUSTER_CIDR": "10.244.0.0/16", "HOST_PHYSICAL_IF": "eth0",
                        "SKNF_PEERS_FILE": str(tmp_path / "peers.yaml"), "SKNF_STATE_DIR": str(tmp_path / "state")})
        with nsutil.entered(NODE):
            built = overlay.ensure_node(cfg, POD_CIDR)
        yield pod.PodNetwork(cfg, ipam.Store(cfg.state_dir, POD_CIDR), RefusingDatapath(cfg), lambda: built)
    finally:
        with nsutil.entered(NODE):
            iptables.teardown()
        for ns in (NODE, POD):
            pnetns.remove(ns)


def test_failed_attach_rolls_back_lease_and_links(node: pod.PodNetwork) -> None:
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": nsutil.netns_path(POD),
           "CNI_IFNAME": "eth0", "CNI_ARGS": "", "CNI_PATH": "/usr/lib/cni"}
    req = cni.parse_request(env, {"cniVersion": "1.0.0", "name": "sknf", "type": "sknf"})
    with netlink.route(nsutil.netns_path(POD)) as p:
        before = sorted(link.get("IFLA_IFNAME") for link in p.get_links())
    with nsutil.entered(NODE), pytest.raises(OSError, match="attach refused"):
        pod.add(node, req)
    assert node.store.leases() == []
    with netlink.route(nsutil.netns_path(NODE)) as ipr:
        assert netlink.host_veths(ipr, HOST_VETH_PREFIX) == {}
    with netlink.route(nsutil.netns_path(POD)) as p:
        assert sorted(link.get("IFLA_IFNAME") for link in p.get_links()) == before
