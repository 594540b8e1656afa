"""Per-pod traffic shaping (the CNI `bandwidth` capability), done by sknf itself in both datapaths.

Why not the reference `bandwidth` plugin: it adds an `ingress` qdisc to the host veth, where the BPF
datapath's clsact already sits (its ADD fails with EEXIST), and its to-pod qdisc on the host veth is
skipped by `bpf_redirect_peer`. So, for each shaped pod:

- to the pod (ingress): a tbf root qdisc on the host veth. The BPF datapath delivers to such a pod
  through the bridge (ENDPOINT_SHAPED in its endpoint entry), never by redirect, so every frame
  passes the qdisc.
- from the pod (egress): shaped on the host side, because a qdisc inside the pod can be bypassed by
  a pod with CAP_NET_RAW (PACKET_QDISC_BYPASS). A u32 match-all filter on the host veth's clsact
  ingress, after sknf's own filter, redirects every frame to the pod's ifb device; its tbf root
  releases them at the rate, and ifb re-injects them as received on the host veth with tc
  classification skipped (so nothing counts or redirects them twice).
- the limits are recorded in `<state_dir>/shaping/<host veth>` before anything is built, and the
  ifb is created after its record and deleted before it: a restarted agent re-applies every
  record and removes the ones no lease accounts for, and no ifb outlives its record.

tbf parameters follow the reference plugin (bucket = burst, queue = 25 ms at the rate plus the
bucket), except that the bucket is capped where the kernel caps it anyway (2**32 ns of tokens):
containerd and CRI-O send a burst of 2**32 - 1 bits, i.e. "as much as allowed".
"""

from __future__ import annotations

import errno
import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from sknf import netlink
from sknf.cni import INVALID_CONFIG, Bandwidth, CniError
from sknf.config import HOST_VETH_PREFIX
from sknf.datapath import tc
from sknf.fsutil import atomic_write

log = logging.getLogger(__name__)

IFB_PREFIX = "sknb"  # the pod's ifb: sknb + the host veth's 11 hex digits (not sknf: not a pod veth)
RECORDS = "shaping"  # under state_dir
TBF_HANDLE = 0x10000  # 1:, the root qdisc sknf owns on the host veth and the ifb
FILTER_PRIO = 2  # after sknf's BPF filter (tc.PRIO): a shaped pod's program returns TC_ACT_UNSPEC to reach it
ETH_P_ALL = 0x0003
ETH_HLEN = 14
LATENCY_NS = 25_000_000  # the reference plugin's queue: 25 ms at the rate, on top of the bucket
MAX_BUCKET_NS = 2**32 - 1  # tbf keeps at most this much time of tokens (buffer is capped to ~0U ns)
_GONE = (errno.ENODEV, errno.ENOENT, errno.EINVAL)


@dataclass(frozen=True)
class Tbf:
    """One tbf qdisc's parameters, in bytes and bytes per second."""

    rate: int
    bucket: int
    limit: int


def tbf(rate_bits: int, burst_bits: int, mtu: int) -> Tbf:
    """The qdisc for one direction; code 7 when the bucket cannot hold one full frame (all would drop)."""
    rate = rate_bits // 8
    bucket = min(burst_bits // 8, rate * MAX_BUCKET_NS // 1_000_000_000)
    if bucket < mtu + ETH_HLEN:
        raise CniError(INVALID_CONFIG, "runtimeConfig.bandwidth: burst smaller than one frame",
                       f"{rate_bits} bit/s with {burst_bits} bits of burst give a {bucket}-byte bucket, "
                       f"frames are up to {mtu + ETH_HLEN} bytes")
    return Tbf(rate=rate, bucket=bucket, limit=rate * LATENCY_NS // 1_000_000_000 + bucket)


def plan(bw: Bandwidth, mtu: int) -> tuple[Tbf | None, Tbf | None]:
    """(to the pod, from the pod) qdiscs, None for an unlimited direction; validates both first."""
    return (tbf(bw.ingress_rate, bw.ingress_burst, mtu) if bw.ingress else None,
            tbf(bw.egress_rate, bw.egress_burst, mtu) if bw.egress else None)


def ifb_name(host_ifname: str) -> str:
    return IFB_PREFIX + host_ifname[len(HOST_VETH_PREFIX):]


# -- kernel objects ---------------------------------------------------------------------------------

def ensure(ipr: IPRoute, host_ifname: str, host_index: int, bw: Bandwidth, mtu: int) -> None:
    """The pod's shaping is exactly bw: qdiscs, ifb and redirect present where limited, absent where not."""
    to_pod, from_pod = plan(bw, mtu)
    _ensure_tbf(ipr, host_index, to_pod)
    ifb = ifb_name(host_ifname)
    if from_pod is None:
        _delete_redirect(ipr, host_index)
        netlink.delete_link(ipr, ifb)
        return
    ifb_index = netlink.ensure_ifb(ipr, ifb, mtu)
    _ensure_tbf(ipr, ifb_index, from_pod)
    tc.ensure_clsact(ipr, host_index)
    if _redirect_target(ipr, host_index) != ifb_index:
        _delete_redirect(ipr, host_index)
        redirect = {"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": ifb_index}
        ipr.tc("add-filter", "u32", host_index, parent=tc.INGRESS, prio=FILTER_PRIO, protocol=ETH_P_ALL,
               target=TBF_HANDLE | 1, keys=["0x0/0x0+0"], action=redirect)


def remove(ipr: IPRoute, host_ifname: str) -> None:
    """Undo ensure; anything already gone is fine (the host veth's own objects go with it anyway)."""
    host_index = netlink.link_index(ipr, host_ifname)
    if host_index is not None:
        _delete_redirect(ipr, host_index)
        _ensure_tbf(ipr, host_index, None)
    netlink.delete_link(ipr, ifb_name(host_ifname))


def problems(ipr: IPRoute, host_ifname: str, host_index: int, bw: Bandwidth | None, mtu: int) -> list[str]:
    """What differs from ensure's result (for CHECK); [] when the pod is shaped exactly as bw says."""
    to_pod, from_pod = plan(bw, mtu) if bw is not None else (None, None)
    found = []
    if _root_tbf(ipr, host_index) != to_pod:
        found.append(f"{host_ifname}: to-pod qdisc is not {to_pod or 'absent'}")
    ifb_index = netlink.link_index(ipr, ifb_name(host_ifname))
    if from_pod is None:
        if ifb_index is not None or _redirect_target(ipr, host_index) is not None:
            found.append(f"{host_ifname}: unshaped from the pod, yet an ifb or redirect exists")
    elif ifb_index is None or _root_tbf(ipr, ifb_index) != from_pod:
        found.append(f"{ifb_name(host_ifname)}: from-pod qdisc is not {from_pod}")
    elif _redirect_target(ipr, host_index) != ifb_index:
        found.append(f"{host_ifname}: no redirect of the pod's frames to {ifb_name(host_ifname)}")
    return found


def _root_tbf(ipr: IPRoute, index: int) -> Tbf | None:
    """The root qdisc sknf put there, as parameters; None when there is none (or someone else's)."""
    for q in ipr.get_qdiscs(index=index):
        if q["parent"] == 0xFFFFFFFF and q["handle"] == TBF_HANDLE and q.get_attr("TCA_KIND") == "tbf":
            parms = q.get_attr("TCA_OPTIONS").get_attr("TCA_TBF_PARMS")
            rate, limit = parms["rate"], parms["limit"]
            return Tbf(rate=rate, bucket=limit - rate * LATENCY_NS // 1_000_000_000, limit=limit)
    return None


def _ensure_tbf(ipr: IPRoute, index: int, want: Tbf | None) -> None:
    have = _root_tbf(ipr, index)
    if have == want:
        return
    if want is None:
        try:
            ipr.tc("del", index=index, handle=TBF_HANDLE, parent=0xFFFFFFFF)
        except NetlinkError as e:
            if e.code not in _GONE:
                raise
        return
    ipr.tc("replace", "tbf", index, handle=TBF_HANDLE, rate=want.rate, burst=want.bucket, limit=want.limit)


def _redirect_target(ipr: IPRoute, host_index: int) -> int | None:
    """The ifindex sknf's u32 filter on the host veth's ingress redirects to, None without one."""
    try:
        msgs = ipr.get_filters(index=host_index, parent=tc.INGRESS)
    except NetlinkError as e:
        if e.code in _GONE:
            return None
        raise
    for msg in msgs:
        if msg["info"] >> 16 != FILTER_PRIO or msg.get_attr("TCA_KIND") != "u32":
            continue
        options = msg.get_attr("TCA_OPTIONS")
        acts = options.get_attr("TCA_U32_ACT") if options else None
        for _, act in (acts or {}).get("attrs", []):
            parms = (act.get_attr("TCA_ACT_OPTIONS") or {}).get_attr("TCA_MIRRED_PARMS") \
                if act.get_attr("TCA_ACT_KIND") == "mirred" else None
            if parms:
                return parms["ifindex"]
    return None


def _delete_redirect(ipr: IPRoute, host_index: int) -> None:
    """By the filter's whole tcm_info (priority, protocol): given the priority alone pyroute2 sends 0, and
    the kernel then flushes the hook, sknf's BPF program (source validation, counters) included."""
    try:
        ipr.tc("del-filter", index=host_index, parent=tc.INGRESS, info=FILTER_PRIO << 16 | socket.htons(ETH_P_ALL))
    except NetlinkError as e:
        if e.code not in _GONE:
            raise


# -- records -------------------------------------------------------------------------------------

def _record_path(state_dir: Path, host_ifname: str) -> Path:
    return state_dir / RECORDS / host_ifname


def save_record(state_dir: Path, host_ifname: str, bw: Bandwidth) -> None:
    atomic_write(_record_path(state_dir, host_ifname), json.dumps(bw.to_json()).encode(), mode=0o600)


def recorded(state_dir: Path, host_ifname: str) -> bool:
    """Whether the attachment was shaped: ADD writes the record before it makes an ifb or qdisc."""
    return _record_path(state_dir, host_ifname).exists()


def remove_record(state_dir: Path, host_ifname: str) -> None:
    _record_path(state_dir, host_ifname).unlink(missing_ok=True)


def load_records(state_dir: Path) -> dict[str, Bandwidth]:
    """{host veth: limits} of every shaped attachment; an unreadable record is logged and dropped."""
    out = {}
    try:
        paths = [p for p in (state_dir / RECORDS).iterdir() if p.name.startswith(HOST_VETH_PREFIX)]
    except FileNotFoundError:
        return {}
    for path in paths:
        try:
            doc = json.loads(path.read_bytes())
            out[path.name] = Bandwidth(doc["ingressRate"], doc["ingressBurst"], doc["egressRate"], doc["egressBurst"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("dropping unreadable shaping record %s: %s", path, e)
            path.unlink(missing_ok=True)
    return out


def forget(ipr: IPRoute, state_dir: Path, host_ifname: str) -> None:
    """A pod's shaping gone for good (DEL, GC): ifb first, then its record (no ifb outlives it)."""
    remove(ipr, host_ifname)
    remove_record(state_dir, host_ifname)
