"""A BPF-mode agent compiles its programs in a short-lived child (sknf.datapath.bpfload): the running agent
has neither libbcc nor LLVM/clang mapped, yet its filters are attached and its maps are in use."""

from __future__ import annotations

from pathlib import Path

import pytest
from leftovers import managed_lab

from sknf import netlink, nsutil
from sknf.datapath import tc

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.bpf]

COMPILER_LIBRARIES = ("libbcc", "libLLVM", "libclang")


def test_bpf_agent_maps_no_compiler() -> None:
    with managed_lab("skk", nodes=1, pods_per_node=1, datapath="bpf") as lab:
        node, pod = lab.state.nodes[0], lab.state.pods[0]
        with nsutil.entered(node.netns), netlink.route() as ipr:
            names = {name for _hook, name, _prio in tc.sknf_filters(ipr, netlink.link_index(ipr, pod.host_ifname))}
        assert names == {"sknf_from_pod", "sknf_to_pod"}
        mapped = {line.split()[-1] for line in Path(f"/proc/{node.agent_pid}/maps").read_text().splitlines()
                  if len(line.split()) > 5}
        assert any("libbpf" in path for path in mapped)  # it does use the maps, through libbpf
        assert [path for path in mapped if any(lib in path for lib in COMPILER_LIBRARIES)] == []
        status = Path(f"/proc/{node.agent_pid}/status").read_text().splitlines()
        print(next(line for line in status if line.startswith("VmRSS:")))
