"""The eBPF datapath: BCC-compiled tc programs that fast-path pod traffic and count it per pod.

Why it works this way:
- Compiled once per agent start (BCC, ~0.7 s), all of bpf/ as ONE text: BCC rewrites map operations
  (`endpoints.lookup(...)`) only in its main file, not in included headers, so the headers and the
  per-attach-point files are concatenated in dependency order. `#line` markers keep compiler and
  verifier messages pointing at the real file and line; each file still compiles on its own.
- Maps are pinned under cfg.bpf_pin_dir and the programs stay attached when the agent exits (tc
  holds them), so a restart neither stops forwarding nor loses counters: the next agent compiles
  again, BCC reopens the pinned maps, and every filter is replaced in place by the new program.
- Runtime settings (CIDRs, gateway MAC, vxsknf's ifindex) go into the `config` map; the only -D
  flags are the pin directory and the learned-flow map's size (nf_conntrack_max).
- The agent keeps no state of its own: endpoints, counters and learned flows live in the pinned
  maps, and interface names come from the kernel when counters are read.
- bcc is imported only here, inside BpfDatapath (it costs ~0.3 s), never by the kernel datapath.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError

from sknf import netlink
from sknf.config import Config
from sknf.datapath import Endpoint, NodeNet, PodCounters, bpfmaps, flows, pins, tc
from sknf.datapath.kernel import BR_NETFILTER, host_veth_stats, remove_bpf_leftovers

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
# Dependency order: each file after everything it includes.
UNITS = ("lib/common.h", "lib/maps.h", "lib/counters.h", "lib/flows.h", "lib/deliver.h",
         "from_pod.c", "to_pod.c", "overlay.c")
POD_PROGRAMS = {"from_pod": tc.INGRESS, "to_pod": tc.EGRESS}  # on each pod's host veth
OVERLAY_PROGRAMS = {"from_overlay": tc.INGRESS, "to_overlay": tc.EGRESS}  # on vxsknf
PROGRAMS = (*POD_PROGRAMS, *OVERLAY_PROGRAMS)
DEFAULT_MAX_FLOWS = 262144
PROBE_LINK = "probe-sknf"  # a throwaway veth proving clsact + cls_bpf work in this namespace


class BpfUnavailable(RuntimeError):
    """The eBPF datapath cannot run here; the message is the reason the agent reports."""


class BpfDatapath:
    mode = "bpf"

    def __init__(self, cfg: Config, bpf_dir: Path = BPF_DIR) -> None:
        self.reason = ""
        self.pin_dir = cfg.bpf_pin_dir
        self.sweep_interval = cfg.reconcile_interval
        ensure_bpffs(self.pin_dir)
        self.bpf, fds = _load(bpf_dir, self.pin_dir, _max_flows())
        self.fds: dict[str, int] = fds
        _probe_tc(fds["from_pod"])
        for name, fd in fds.items():
            _pin(fd, self.pin_dir / f"prog_{name}")
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    # -- Datapath protocol ---------------------------------------------------------------------
    def setup_node(self, node: NodeNet) -> None:
        netlink.sysctl(BR_NETFILTER, 1)  # the kernel path's Service NAT must see bridged frames
        table = self.bpf[b"config"]
        leaf = table.Leaf()
        cluster, pods = ipaddress.IPv4Network(node.cluster_cidr), ipaddress.IPv4Network(node.pod_cidr)
        leaf.cluster_net, leaf.cluster_mask = _be32(cluster.network_address), _be32(cluster.netmask)
        leaf.pod_net, leaf.pod_mask = _be32(pods.network_address), _be32(pods.netmask)
        leaf.vxlan_ifindex = node.vxlan_ifindex
        leaf.gateway_mac[:] = _mac(node.gateway_mac)
        table[table.Key(0)] = leaf
        with netlink.route() as ipr:
            for name, hook in OVERLAY_PROGRAMS.items():
                tc.attach(ipr, node.vxlan_ifindex, hook, self.fds[name], f"sknf_{name}")
        if self._sweeper is None:
            # Started here, in the calling thread's namespace: conntrack is per namespace.
            self._sweeper = threading.Thread(target=self._sweep_loop, name="sknf-flow-sweep", daemon=True)
            self._sweeper.start()

    def attach_pod(self, ep: Endpoint) -> None:
        """Filters first, then the endpoint entry: nothing is fast-pathed into a pod before its rx is counted."""
        with netlink.route() as ipr:
            for name, hook in POD_PROGRAMS.items():
                tc.attach(ipr, ep.host_ifindex, hook, self.fds[name], f"sknf_{name}")
        table = self.bpf[b"endpoints"]
        leaf = table.Leaf()
        leaf.ifindex = ep.host_ifindex
        leaf.mac[:] = _mac(ep.mac)
        table[table.Key(_be32(ep.ip))] = leaf

    def detach_pod(self, ep: Endpoint) -> None:
        """Endpoint entry first (no new fast-path deliveries), then the pod's own hooks, then its counters:
        in this order no frame in flight can re-create the counters of a pod that is gone."""
        endpoints = self.bpf[b"endpoints"]
        key = endpoints.Key(_be32(ep.ip))
        ifindex = ep.host_ifindex
        with contextlib.suppress(KeyError):
            entry = endpoints[key]
            if ifindex in (0, entry.ifindex):  # leave a newer pod that reuses the address alone
                ifindex = entry.ifindex
                _delete(endpoints, key)
        if ifindex:
            with netlink.route() as ipr:
                tc.detach(ipr, ifindex)
            _delete(self.bpf[b"pod_counters"], self.bpf[b"pod_counters"].Key(ifindex))

    def sync_endpoints(self, eps: list[Endpoint]) -> None:
        for ep in eps:
            self.attach_pod(ep)
        wanted = {_be32(ep.ip): ep.host_ifindex for ep in eps}
        endpoints = self.bpf[b"endpoints"]
        for key, entry in list(endpoints.items()):
            if wanted.get(key.value) != entry.ifindex:
                _delete(endpoints, key)
        live = set(wanted.values())
        counters = self.bpf[b"pod_counters"]
        for key in list(counters.keys()):
            if key.value not in live:
                _delete(counters, key)

    def read_counters(self) -> dict[str, PodCounters]:
        return _pod_counters(self.bpf[b"endpoints"].map_fd, self.bpf[b"pod_counters"].map_fd)

    def cleanup(self) -> None:
        self.close()
        remove_bpf_leftovers(self.pin_dir)

    def close(self) -> None:
        """Stop the flow sweeper; programs, filters and pins stay (that is what a restart relies on)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join()
        self.bpf.cleanup()

    def learned_flows(self) -> dict[flows.FlowTuple, bool]:
        """{tuple: exempt} of the kernel_flows map."""
        return {_flow_tuple(k): bool(v.exempt) for k, v in self.bpf[b"kernel_flows"].items()}

    def sweep_flows(self) -> tuple[int, int]:
        """One sweep of the learned-flow map against conntrack; returns (marked exempt, deleted).

        The map is read before conntrack: an entry is learned only after its conntrack entry
        exists, so a fresh flow can never look dead.
        """
        table = self.bpf[b"kernel_flows"]
        snapshot = table.items()
        keys = {_flow_tuple(k): k for k, _ in snapshot}
        learned = {_flow_tuple(k): bool(v.exempt) for k, v in snapshot}
        alive = flows.read_conntrack()
        if alive is None:
            return 0, 0
        plan = flows.plan_sweep(learned, alive)
        for t, exempt in [(t, 1) for t in plan.mark] + [(t, 0) for t in plan.unmark]:
            table[keys[t]] = table.Leaf(exempt)
        for t in plan.delete:
            with contextlib.suppress(KeyError):
                if table[keys[t]].exempt:  # not re-learned while conntrack was being read
                    _delete(table, keys[t])
        if plan.mark or plan.delete:
            log.debug("learned flows: %d marked exempt, %d deleted", len(plan.mark), len(plan.delete))
        return len(plan.mark), len(plan.delete)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.sweep_interval):
            try:
                self.sweep_flows()
            except Exception:  # keep sweeping: a failed round only delays forgetting
                log.exception("learned-flow sweep failed")


def read_pinned_counters(pin_dir: Path) -> dict[str, PodCounters]:
    """Per-pod counters of a node whose agent is not running, read from the pinned maps in place.

    Nothing is compiled or loaded (see bpfmaps); FileNotFoundError when the maps are not pinned.
    """
    with bpfmaps.pinned(pin_dir / "endpoints") as endpoints, bpfmaps.pinned(pin_dir / "pod_counters") as counters:
        return _pod_counters(endpoints, counters)


def _pod_counters(endpoints_fd: int, counters_fd: int) -> dict[str, PodCounters]:
    """Every attached pod (a pod without traffic yet reads zero), per-CPU values summed, keyed by host veth."""
    links = host_veth_stats()
    counted = dict(bpfmaps.read_map(counters_fd, ctypes.c_uint32, bpfmaps.CounterValues))
    out = {}
    for _, entry in bpfmaps.read_map(endpoints_fd, ctypes.c_uint32, bpfmaps.EndpointInfo):
        try:
            name = socket.if_indextoname(entry.ifindex)
        except OSError:
            continue  # the pod's veth is gone: its DEL is under way
        if (stats := links.get(name)) is None:
            continue  # not a pod's host veth (a stale entry whose ifindex was reused)
        per_cpu = counted.get(entry.ifindex)
        sums = bpfmaps.sum_cpus(per_cpu) if per_cpu is not None else dict.fromkeys(bpfmaps.COUNTER_FIELDS, 0)
        sums["drops"] += stats.get("rx_dropped", 0) + stats.get("tx_dropped", 0)
        out[name] = PodCounters(**sums)
    return out


def _load(bpf_dir: Path, pin_dir: Path, max_flows: int):
    """Compile, then load the programs; returns (the BCC object, {program: fd}) or raises BpfUnavailable."""
    try:
        from bcc import BPF
    except ImportError as e:
        raise BpfUnavailable(f"no BCC Python module ({e}); install python3-bpfcc") from None
    try:
        text = "".join(f'#line 1 "{bpf_dir / unit}"\n{(bpf_dir / unit).read_text()}' for unit in UNITS)
    except OSError as e:
        raise BpfUnavailable(f"BPF sources: {e.filename}: {e.strerror}") from None
    cflags = [f"-I{bpf_dir}", f"-I{bpf_dir / 'lib'}", f'-DSKNF_PIN_DIR="{pin_dir}"',
              f"-DSKNF_MAX_FLOWS={max_flows}"]
    failure = None
    with _stderr_captured() as output:
        try:
            bpf = BPF(text=text.encode(), cflags=cflags)
            fds = {name: bpf.load_func(name.encode(), BPF.SCHED_CLS).fd for name in PROGRAMS}
        except Exception as e:  # BCC raises bare Exception for compile and verifier failures
            failure = e
    if failure is not None:
        detail = _diagnostic(output[0])
        raise BpfUnavailable(f"{failure}{': ' + detail if detail else ''}")
    return bpf, fds


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
    log.debug("BCC output:\n%s", "\n".join(lines))
    errors = [line for line in lines if "error:" in line]
    if errors:
        return errors[0]
    for i, line in enumerate(lines):
        if line.startswith("processed ") and i > 0:
            return lines[i - 1]
    return lines[-1] if lines else ""


def _probe_tc(fd: int) -> None:
    """Attach a loaded program to a throwaway veth: proves clsact and cls_bpf exist before we rely on them."""
    with netlink.route() as ipr:
        netlink.delete_link(ipr, PROBE_LINK)  # left by a crash mid-probe
        try:
            ipr.link("add", ifname=PROBE_LINK, kind="veth", peer=f"{PROBE_LINK}-p")
            tc.attach(ipr, netlink.link_index(ipr, PROBE_LINK), tc.INGRESS, fd, "sknf_probe")
        except NetlinkError as e:
            raise BpfUnavailable(f"cannot attach a tc program (clsact qdisc, cls_bpf): {os.strerror(e.code)}") from None
        finally:
            netlink.delete_link(ipr, PROBE_LINK)


def _pin(fd: int, path: Path) -> None:
    from bcc import libbcc

    path.unlink(missing_ok=True)
    if libbcc.lib.bpf_obj_pin(fd, str(path).encode()) != 0:
        err = ctypes.get_errno()
        raise BpfUnavailable(f"cannot pin {path}: {os.strerror(err) if err else 'failed'}")


def ensure_bpffs(pin_dir: Path) -> None:
    """The pin directory exists on a bpf filesystem; /sys/fs/bpf is mounted if nothing is (fresh boot)."""
    if pins.fs_type(pin_dir) != "bpf":
        if not pin_dir.is_relative_to(pins.BPFFS):
            raise BpfUnavailable(f"bpf_pin_dir {pin_dir} is not on a bpf filesystem")
        libc = ctypes.CDLL(None, use_errno=True)
        if pins.fs_type(pins.BPFFS) != "bpf" and libc.mount(b"bpf", str(pins.BPFFS).encode(), b"bpf", 0, None):
            raise BpfUnavailable(f"cannot mount bpffs on {pins.BPFFS}: {os.strerror(ctypes.get_errno())}")
    pin_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


def _max_flows() -> int:
    """One learned flow per conntrack entry at most (the module may be absent: then the default)."""
    try:
        return int(Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())
    except (OSError, ValueError):
        return DEFAULT_MAX_FLOWS


def _be32(addr: str | ipaddress.IPv4Address) -> int:
    """An IPv4 address as the native integer whose bytes are in network order (__be32 in C)."""
    return int.from_bytes(ipaddress.IPv4Address(addr).packed, sys.byteorder)


def _ip(be32: int) -> str:
    return str(ipaddress.IPv4Address(be32.to_bytes(4, sys.byteorder)))


def _port(be16: int) -> int:
    return int.from_bytes(be16.to_bytes(2, sys.byteorder), "big")


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _flow_tuple(key) -> flows.FlowTuple:
    return _ip(key.saddr), _ip(key.daddr), _port(key.sport), _port(key.dport), key.proto


def _delete(table, key) -> None:
    """Delete a map entry that may already be gone (a racing packet, sweep or DEL)."""
    try:
        del table[key]
    except KeyError:
        pass
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
