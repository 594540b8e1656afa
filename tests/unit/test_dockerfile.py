"""The Dockerfile cannot be built here (no container engine with registry access in CI); this checks what
can be checked without building: it parses, and everything it copies exists and is not .dockerignored."""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import subprocess
import tomllib
from pathlib import Path

from sknf.datapath.bpf import BPF_DIR

REPO = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, args = text.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def copies() -> list[tuple[list[str], str]]:
    """What COPY/ADD take from the build context (not --from another stage)."""
    out = []
    for keyword, args in instructions():
        if keyword in ("COPY", "ADD") and "--from=" not in args:
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            out.append((words[:-1], words[-1]))
    return out


def ignored(path: str) -> bool:
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = Path(path).parts
    return any(fnmatch.fnmatch("/".join(parts[:i]), p.lstrip("/")) for p in patterns for i in range(1, len(parts) + 1))


def test_it_parses_into_known_instructions() -> None:
    keywords = [k for k, _ in instructions()]
    assert keywords[:2] == ["ARG", "FROM"]
    assert set(keywords) <= {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "ENTRYPOINT", "CMD"}


def test_base_is_debian_bookworm_slim() -> None:
    """Both stages start from BASE (a build argument, so a local or digest-pinned base can be given)."""
    args = [a for k, a in instructions() if k == "ARG"]
    assert args[0].split("=", 1) == ["BASE", "debian:bookworm-slim"]
    assert args[1:] == ["PIP_CERT"]  # no default: unset unless a build passes one
    assert [a.split()[0] for k, a in instructions() if k == "FROM"] == ["${BASE}", "${BASE}"]


def test_the_plugin_is_built_static_in_its_own_stage() -> None:
    """The compiler stays in the first stage; the image gets only the binary, where the package reads it."""
    runs = [a for k, a in instructions() if k == "RUN"]
    assert "musl-tools" in runs[0] and "make -C /src/cni" in runs[1]
    (copy,) = [a for k, a in instructions() if k == "COPY" and "--from=" in a]
    assert copy == "--from=plugin /src/cni_plugin sknf/cni_plugin"
    assert "musl" not in " ".join(runs[2:])
    assert ignored("sknf/cni_plugin")  # never a binary from the checkout


def test_every_copied_path_exists_and_reaches_the_build_context() -> None:
    for sources, _dest in copies():
        for source in sources:
            path = REPO / source
            assert path.exists(), f"COPY {source}: not in the repository"
            assert not ignored(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"


def test_what_the_package_reads_outside_itself_is_copied() -> None:
    """pyproject's readme (the build needs it), the plugin's source, the BPF sources."""
    copied = {s.rstrip("/") for sources, _ in copies() for s in sources}
    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["readme"]
    assert {"pyproject.toml", readme, "cni"} <= copied
    assert str(BPF_DIR.relative_to(REPO)) in copied


def test_packages_are_debian_ones_without_recommends_or_caches() -> None:
    runs = " ".join(a for k, a in instructions() if k == "RUN" and "musl" not in a)
    install = runs[runs.index("apt-get install"):].split("&&")[0].split()
    assert "--no-install-recommends" in install
    assert {"python3", "python3-venv", "python3-bpfcc", "iproute2", "iptables"} <= set(install)
    assert "linux-headers-amd64" in runs
    assert "rm -rf /tmp/headers /var/lib/apt/lists/*" in runs
    assert "python3 -m venv --system-site-packages" in runs  # the venv must see Debian's BCC
    env = " ".join(a for k, a in instructions() if k == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in env


def test_entrypoint_runs_the_agent_through_the_headers_script() -> None:
    entry = json.loads(next(a for k, a in instructions() if k == "ENTRYPOINT"))
    cmd = json.loads(next(a for k, a in instructions() if k == "CMD"))
    (script,) = [sources[0] for sources, dest in copies() if dest == entry[0]]
    path = REPO / script
    assert os.access(path, os.X_OK)
    subprocess.run(["sh", "-n", str(path)], check=True)
    assert path.read_text().rstrip().endswith('exec sknf "$@"')
    assert cmd == ["agent", "--config", "/etc/sknf/config.yaml"]
