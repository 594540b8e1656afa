"""Compiling and loading sknf's tc programs in a short-lived process of its own.

Why a separate process: BCC drags libbcc and LLVM/clang into the process that compiles (~130 MiB of
mappings that stay after the one compile at start). The agent runs `python -m sknf.datapath.bpfload
<bpf_dir> <pin_dir> <max_flows>`; this process compiles all of bpf/, loads the programs, pins them
next to the maps BCC pins by name (BPF_TABLE_PINNED), and exits. The agent then works on the pins
alone (bpfmaps for map entries, tc attach by program fd) and never imports bcc.

- The sources are compiled as ONE text: BCC rewrites map operations (`endpoints.lookup(...)`) only in
  its main file, not in included headers, so the headers and the per-attach-point files are
  concatenated in dependency order. `#line` markers keep compiler and verifier messages pointing at
  the real file and line; each file still compiles on its own.
- A marker directory `src-<digest>` (bpffs holds no regular files) records which sources and flags
  the pinned programs were built from: a restart with unchanged sources needs no compile at all.
- The learned-flow maps' size is fixed when they are created, and BCC reuses a pin of any size: a pinned
  kernel_flows (or kernel_flows6) of another size is moved aside to its name + RETIRED first, so the new
  programs get a map of the wanted size; the agent copies the old entries over once every filter runs
  the new programs.
- On failure the process prints the reason (clang's first error or the verifier's complaint) as its
  stdout and exits with FAILED; the agent reports it as its fallback reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sknf.datapath import bpfmaps

log = logging.getLogger(__name__)

# Dependency order: each file after everything it includes.
UNITS = ("lib/common.h", "lib/maps.h", "lib/events.h", "lib/counters.h", "lib/flows.h", "lib/deliver.h", "lib/guard.h",
         "lib/policy.h", "from_pod.c", "to_pod.c", "overlay.c")
PROGRAMS = ("from_pod", "from_shaped_pod", "to_pod", "from_overlay", "to_overlay")
MAPS = ("config", "config6", "endpoints", "endpoints6", "local_macs", "pod_counters", "kernel_flows", "kernel_flows6",
        "flow_guard", "pod_identity", "pod_sources", "pod_sources6", "pod_refused", "events", "events_enabled",
        "events_lost", "events_seen", "events_seen6", "policy_rules", "policy_flows", "policy_drops")
FLOW_MAPS = ("kernel_flows", "kernel_flows6")  # learned flows, IPv4 and IPv6: sized by max_flows
RETIRED = "_retired"  # a flow map of another size is pinned as its name + this until the agent copied it
MARKER_PREFIX = "src-"
FAILED = 3  # exit status: the reason is on stdout


class LoadFailed(RuntimeError):
    """The programs cannot be compiled, loaded or pinned; the message is the reason."""


def sources(bpf_dir: Path) -> str:
    """All of bpf/ as one compilation unit; LoadFailed naming the file that cannot be read."""
    try:
        return "".join(f'#line 1 "{bpf_dir / unit}"\n{(bpf_dir / unit).read_text()}' for unit in UNITS)
    except OSError as e:
        raise LoadFailed(f"BPF sources: {e.filename}: {e.strerror}") from None


def cflags(bpf_dir: Path, pin_dir: Path, max_flows: int) -> list[str]:
    return [f"-I{bpf_dir}", f"-I{bpf_dir / 'lib'}", f'-DSKNF_PIN_DIR="{pin_dir}"', f"-DSKNF_MAX_FLOWS={max_flows}"]


def marker(bpf_dir: Path, pin_dir: Path, max_flows: int) -> str:
    """The name of the marker that pinned programs built from these sources and flags carry."""
    digest = hashlib.sha256("\0".join([sources(bpf_dir), *cflags(bpf_dir, pin_dir, max_flows)]).encode())
    return MARKER_PREFIX + digest.hexdigest()[:32]


def pins_current(bpf_dir: Path, pin_dir: Path, max_flows: int) -> bool:
    """Every program and map is pinned, built from exactly these sources and flags."""
    names = (marker(bpf_dir, pin_dir, max_flows), *MAPS, *(f"prog_{p}" for p in PROGRAMS))
    return all((pin_dir / name).exists() for name in names)


def compile_bpf(bpf_dir: Path, pin_dir: Path, max_flows: int):
    """The BCC object of bpf/ (its maps opened from, or pinned to, pin_dir)."""
    from bcc import BPF

    return BPF(text=sources(bpf_dir).encode(), cflags=cflags(bpf_dir, pin_dir, max_flows))


def load(bpf_dir: Path, pin_dir: Path, max_flows: int) -> None:
    """Compile, load and pin every program, then mark the pins with the sources' digest."""
    try:
        from bcc import BPF, libbcc
    except ImportError as e:
        raise LoadFailed(f"no BCC Python module ({e}); install python3-bpfcc") from None
    tag = marker(bpf_dir, pin_dir, max_flows)
    retire_resized_flows(pin_dir, max_flows)
    failure = None
    with _stderr_captured() as output:
        try:
            bpf = compile_bpf(bpf_dir, pin_dir, max_flows)
            fds = {name: bpf.load_func(name.encode(), BPF.SCHED_CLS).fd for name in PROGRAMS}
        except Exception as e:  # BCC raises bare Exception for compile and verifier failures
            failure = e
    if failure is not None:
        detail = _diagnostic(output[0])
        raise LoadFailed(f"{failure}{': ' + detail if detail else ''}")
    for old in pin_dir.glob(MARKER_PREFIX + "*"):  # from here until the new marker: pins are not current
        old.rmdir()
    for name, fd in fds.items():
        path = pin_dir / f"prog_{name}"
        path.unlink(missing_ok=True)
        if libbcc.lib.bpf_obj_pin(fd, str(path).encode()) != 0:
            err = ctypes.get_errno()
            raise LoadFailed(f"cannot pin {path}: {os.strerror(err) if err else 'failed'}")
    (pin_dir / tag).mkdir()


def retire_resized_flows(pin_dir: Path, max_flows: int) -> None:
    """Move each pinned flow map of another size than max_flows aside (see the module docstring)."""
    for name in FLOW_MAPS:
        path = pin_dir / name
        if not path.exists():
            continue
        with bpfmaps.pinned(path) as fd:
            if bpfmaps.map_info(fd).max_entries == max_flows:
                continue
        if (pin_dir / (name + RETIRED)).exists():
            # An earlier resize whose copy has not happened yet: that map still holds the older entries,
            # this one only flows learned since, which conntrack re-seeds (NATed flows are all that matter).
            path.unlink()
        else:
            path.rename(pin_dir / (name + RETIRED))


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Collect what clang and the verifier print on fd 2 (BCC writes there, not through Python)."""
    output: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield output
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            output.append(sink.read())


def _diagnostic(text: str) -> str:
    """The line that explains a failure: clang's first error, else the verifier's last complaint."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    print("\n".join(lines), file=sys.stderr)  # the whole output, for the agent's debug log
    errors = [line for line in lines if "error:" in line]
    if errors:
        return errors[0]
    for i, line in enumerate(lines):
        if line.startswith("processed ") and i > 0:
            return lines[i - 1]
    return lines[-1] if lines else ""


def main(argv: list[str]) -> int:
    bpf_dir, pin_dir, max_flows = Path(argv[0]), Path(argv[1]), int(argv[2])
    try:
        load(bpf_dir, pin_dir, max_flows)
    except LoadFailed as e:
        print(e)  # stdout carries nothing else: all of it is the reason
        return FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
