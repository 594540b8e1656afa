"""The neighbour-table sizing: raised to fit the node's pods and peers, never lowered, skipped (with the
reason) where the sysctls do not exist (any namespace but the initial one, as in the lab)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from sknf.overlay import ensure_neighbour_capacity, neighbour_thresholds

POD_CIDR = ipaddress.IPv4Network("10.244.1.0/24")


def fake_neigh(tmp_path: Path, **values: int) -> Path:
    for name in ("gc_thresh1", "gc_thresh2", "gc_thresh3"):
        (tmp_path / name).write_text(f"{values.get(name, 0)}\n")
    return tmp_path


def read(d: Path) -> dict[str, int]:
    return {p.name: int(p.read_text()) for p in sorted(d.iterdir())}


def test_thresholds_fit_every_possible_pod_and_node_with_headroom() -> None:
    want = neighbour_thresholds(POD_CIDR, 100)
    assert want["gc_thresh3"] >= 2 * (254 * 16 + 200)
    assert want["gc_thresh3"] & (want["gc_thresh3"] - 1) == 0  # a power of two
    assert want["gc_thresh1"] < want["gc_thresh2"] < want["gc_thresh3"]
    assert neighbour_thresholds(ipaddress.IPv4Network("10.244.1.0/26"), 3)["gc_thresh3"] < want["gc_thresh3"]


def test_defaults_are_raised(tmp_path: Path) -> None:
    d = fake_neigh(tmp_path, gc_thresh1=128, gc_thresh2=512, gc_thresh3=1024)
    assert ensure_neighbour_capacity(POD_CIDR, 10, str(d)) is None
    assert read(d) == neighbour_thresholds(POD_CIDR, 10)


def test_higher_values_are_kept(tmp_path: Path) -> None:
    d = fake_neigh(tmp_path, gc_thresh1=1 << 20, gc_thresh2=1 << 21, gc_thresh3=1 << 22)
    ensure_neighbour_capacity(POD_CIDR, 10, str(d))
    assert read(d) == {"gc_thresh1": 1 << 20, "gc_thresh2": 1 << 21, "gc_thresh3": 1 << 22}


def test_outside_the_initial_namespace_nothing_is_written(tmp_path: Path) -> None:
    why = ensure_neighbour_capacity(POD_CIDR, 10, str(tmp_path / "absent"))
    assert why is not None and "initial network namespace" in why
    assert list(tmp_path.iterdir()) == []


def test_a_dual_stack_node_sizes_both_tables(tmp_path: Path, monkeypatch) -> None:
    from sknf import overlay
    from sknf.config import Config

    for family in ("4", "6"):
        (tmp_path / family).mkdir()
    v4, v6 = fake_neigh(tmp_path / "4"), fake_neigh(tmp_path / "6")
    monkeypatch.setattr(overlay, "NEIGH_DIR", str(v4))
    monkeypatch.setattr(overlay, "NEIGH_DIR6", str(v6))
    dual = (POD_CIDR.supernet(8), ipaddress.IPv6Network("fd00:10:244::/56"))
    cfg = Config(node_name="n1", cluster_cidr=dual[0], cluster_cidrs=dual)
    assert overlay.ensure_neighbour_tables(cfg, POD_CIDR, 10) is None
    assert read(v4) == read(v6) == neighbour_thresholds(POD_CIDR, 10)
    only6 = Config(node_name="n1", cluster_cidr=dual[1])
    assert overlay.ensure_neighbour_tables(only6, ipaddress.IPv6Network("fd00:10:244::/64"), 10) is None
