"""The real image, built from the Dockerfile and run: a 2-node lab whose agents run from it (podman, the
BPF datapath compiled inside the image into a fresh pin directory), so the pods are set up by the image's
agent and the image's static plugin binary, which the agent installed on the "host". The matrix passes.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from leftovers import managed_lab

from sknf.lab import Lab, print_matrix

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.bpf]

PREFIX = "ski"


@pytest.fixture(scope="module")
def lab(sknf_image: str) -> Iterator[Lab]:
    try:
        with managed_lab(PREFIX, nodes=2, pods_per_node=2, datapath="bpf", agent_image=sknf_image) as built:
            yield built
    finally:
        names = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True,
                               check=True).stdout.split()
        assert [n for n in names if n.startswith(f"{PREFIX}-")] == []


def test_the_images_agent_and_plugin_serve_the_lab(lab: Lab, sknf_image: str) -> None:
    image_plugin = subprocess.run(["podman", "run", "--rm", "--runtime", "runc", "--ulimit", "nofile=1024:1024",
                                   "--ulimit", "nproc=1024:1024", "--entrypoint", "cat", sknf_image,
                                   "/opt/sknf/src/sknf/cni_plugin"], capture_output=True, check=True).stdout
    assert image_plugin[:4] == b"\x7fELF"
    assert (lab.root / "bin" / "sknf").read_bytes() == image_plugin  # installed by the image's agent
    for node in lab.state.nodes:
        log = (lab.node_dir(node.name) / "agent.log").read_text()
        assert "datapath bpf" in log, log[-2000:]
        running = subprocess.run(["podman", "inspect", "--format", "{{.ImageName}}", f"{PREFIX}-{node.name}-agent"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        assert running == sknf_image
    results = lab.check(bulk_bytes=4 << 20)
    assert print_matrix(results), [r for r in results if not r.ok]
