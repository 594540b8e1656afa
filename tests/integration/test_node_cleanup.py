"""`sknf cleanup` on a real node, in both datapaths: everything sknf made goes (links, iptables chains and
jumps, tc programs, bpffs pins, the plugin, the conflist, state and run directories), the pods lose their
interfaces, and a second run finds nothing and succeeds. tests/unit/test_cleanup.py covers the ordering, the
Node annotations and the refusal while an agent serves, without root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cnirig import Rig, one_node_rig

from sknf import netlink, nsutil
from sknf.config import BRIDGE, VXLAN
from sknf.datapath import tc as tcmod
from sknf.iptables import FORWARD_CHAIN, NAT_CHAIN
from sknf.lab import REPO

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "skz"


def cleanup(rig: Rig) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sknf", "cleanup", "-c", rig.node.config], capture_output=True,
                          text=True, timeout=60, cwd=str(REPO), preexec_fn=nsutil.preexec_enter(rig.node.netns))


def iptables(rig: Rig, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["iptables", "-w", *args], capture_output=True, text=True,
                          preexec_fn=nsutil.preexec_enter(rig.node.netns))


def leftovers(rig: Rig) -> list[str]:
    """Everything sknf made on the node that is still there."""
    found = []
    with netlink.route(nsutil.netns_path(rig.node.netns)) as ipr:
        found += [name for name in (BRIDGE, VXLAN) if netlink.link_index(ipr, name) is not None]
        found += sorted(netlink.host_veths(ipr, "sknf"))
        found += sorted({f"tc {link.get('IFLA_IFNAME')} {name}" for link in ipr.get_links()
                         for _hook, name, _prio in tcmod.sknf_filters(ipr, link["index"])})
    for table, chain in (("filter", FORWARD_CHAIN), ("nat", NAT_CHAIN)):
        if iptables(rig, "-t", table, "-S", chain).returncode == 0:
            found.append(f"{table}/{chain}")
    for table, chain in (("filter", "FORWARD"), ("nat", "POSTROUTING")):
        found += [rule for rule in iptables(rig, "-t", table, "-S", chain).stdout.splitlines() if "SKNF" in rule]
    node_dir = rig.lab.node_dir(rig.node.name)
    paths = [node_dir / "net.d" / "10-sknf.conflist", rig.plugin, node_dir / "state", node_dir / "run",
             Path(f"/sys/fs/bpf/{PREFIX}-{rig.node.name}")]
    return found + [str(p) for p in paths if p.exists()]


@pytest.mark.parametrize("datapath", ["kernel", "bpf"])
def test_cleanup_removes_everything_and_reruns_cleanly(datapath: str) -> None:
    with one_node_rig(PREFIX, datapath=datapath) as rig:
        pod = rig.lab.state.pods[0]
        before = leftovers(rig)
        made = {BRIDGE, VXLAN, pod.host_ifname, f"filter/{FORWARD_CHAIN}", f"nat/{NAT_CHAIN}", str(rig.plugin)}
        if datapath == "bpf":
            made |= {f"tc {VXLAN} sknf_from_overlay", f"tc {VXLAN} sknf_to_overlay", f"tc {pod.host_ifname} "
                     "sknf_from_pod", f"tc {pod.host_ifname} sknf_to_pod", f"/sys/fs/bpf/{PREFIX}-{rig.node.name}"}
        # + 2 jumps, the conflist, the state and run directories
        assert made <= set(before) and len(before) == len(made) + 5, before
        rig.lab.stop_agent(rig.node)

        first = cleanup(rig)
        assert first.returncode == 0, first.stderr
        assert leftovers(rig) == []
        with netlink.route(nsutil.netns_path(pod.netns)) as ipr:
            assert netlink.link_index(ipr, "eth0") is None

        again = cleanup(rig)
        assert again.returncode == 0, again.stderr
        assert leftovers(rig) == []
