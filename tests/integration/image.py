"""The real sknf image, built with podman the way /work/shared/image-recipe.md verified, once per content.

There is no registry here: the base is a Debian bookworm minbase made with debootstrap from the mirror
apt already uses, imported as `localhost/sknf-base:bookworm`; the image is the repository's Dockerfile
built on it (`--build-arg BASE=...`). The image's tag is a digest of everything the build reads, so a
rerun with unchanged sources finds it already built (seconds) and a change rebuilds it (about 2 min on
these machines: debootstrap ~40 s the first time, the build ~75 s). Older test images are removed.

pip inside the build cannot verify TLS here (outbound TLS is re-signed by a CA only the host trusts):
the host's bundle is mounted for the build only (the Dockerfile's PIP_CERT argument) and never baked in.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASE = "localhost/sknf-base:bookworm"
REPOSITORY = "localhost/sknf-test"
CACHE = Path(os.environ.get("SKNF_TEST_CACHE", "/var/cache/sknf-test"))
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
BUILD_CA = "/run/build-ca.crt"  # where the build sees it: not the image's own bundle (ca-certificates writes that)
CONTEXT = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "sknf", "bpf", "cni",
           "scripts/container-entrypoint")


class ImageError(RuntimeError):
    pass


def podman(*args: str, timeout: float = 900) -> str:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode:
        raise ImageError(f"podman {' '.join(args[:3])}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()


def exists(image: str) -> bool:
    return subprocess.run(["podman", "image", "exists", image], capture_output=True).returncode == 0


def mirror() -> str:
    """The Debian mirror apt uses (the same registry, no other source)."""
    text = Path("/etc/apt/sources.list.d/debian.sources").read_text()
    return re.search(r"^URIs:\s*(\S+)", text, re.MULTILINE).group(1)


def base_image() -> str:
    if exists(BASE):
        return BASE
    CACHE.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
    try:
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root), mirror()], check=True,
                       capture_output=True, timeout=900)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["podman", "import", "-", BASE], stdin=tar.stdout, check=True, capture_output=True,
                       timeout=900)
        tar.stdout.close()
        if tar.wait():
            raise ImageError("tar of the debootstrapped base failed")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return BASE


def context_digest() -> str:
    """sha256 over the paths and bytes of every file the build context holds (the plugin binary excluded:
    the Dockerfile builds its own)."""
    h = hashlib.sha256()
    for top in CONTEXT:
        path = REPO / top
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            rel = f.relative_to(REPO)
            if "__pycache__" in rel.parts or rel == Path("sknf/cni_plugin"):
                continue
            h.update(str(rel).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def sknf_image() -> tuple[str, float]:
    """The image for the current sources (built now if needed) and the seconds this call took."""
    started = time.monotonic()
    tag = f"{REPOSITORY}:{context_digest()}"
    if not exists(tag):
        base = base_image()
        podman("build", "--network", "host", "--build-arg", f"BASE={base}", "-v", f"{CA_BUNDLE}:{BUILD_CA}:ro",
               "--build-arg", f"PIP_CERT={BUILD_CA}", "-t", tag, str(REPO))
        for old in podman("images", "--format", "{{.Repository}}:{{.Tag}}", REPOSITORY).splitlines():
            if old != tag:
                subprocess.run(["podman", "rmi", "-f", old], capture_output=True, check=False)
    return tag, time.monotonic() - started


def size_mb(image: str) -> float:
    return int(podman("image", "inspect", image, "--format", "{{.Size}}")) / 1e6
