"""The tbf parameters sknf derives from a pod's limits, and the shaping records (no root needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sknf import shaping
from sknf.cni import INVALID_CONFIG, Bandwidth, CniError

MTU = 1450


def test_kubelet_burst_is_capped_where_the_kernel_caps_it() -> None:
    t = shaping.tbf(50_000_000, 2**32 - 1, MTU)
    assert t.rate == 6_250_000
    assert t.bucket == 6_250_000 * (2**32 - 1) // 10**9  # ~4.29 s of tokens, not 512 MiB
    assert t.limit == t.bucket + 6_250_000 // 40  # 25 ms of queue at the rate on top


def test_small_burst_is_taken_as_given() -> None:
    assert shaping.tbf(8_000_000, 800_000, MTU).bucket == 100_000


@pytest.mark.parametrize(("rate", "burst"), [(2000, 2**32 - 1), (50_000_000, 8 * MTU)])
def test_bucket_below_one_frame_is_refused(rate: int, burst: int) -> None:
    with pytest.raises(CniError) as err:
        shaping.tbf(rate, burst, MTU)
    assert err.value.code == INVALID_CONFIG


def test_plan_validates_both_directions() -> None:
    assert shaping.plan(Bandwidth(egress_rate=8000, egress_burst=1 << 20), MTU)[0] is None
    with pytest.raises(CniError):
        shaping.plan(Bandwidth(1_000_000, 1 << 20, 2000, 1 << 20), MTU)


def test_ifb_is_named_for_the_host_veth_outside_the_pod_prefix() -> None:
    name = shaping.ifb_name("sknf0123456789a")
    assert name == "sknb0123456789a" and len(name) <= 15 and not name.startswith("sknf")


def test_records_round_trip_and_drop_garbage(tmp_path: Path) -> None:
    bw = Bandwidth(1000, 2000, 3000, 4000)
    shaping.save_record(tmp_path, "sknf0123456789a", bw)
    (tmp_path / shaping.RECORDS / "sknfbbbbbbbbbbb").write_text("{not json")
    assert shaping.load_records(tmp_path) == {"sknf0123456789a": bw}
    assert not (tmp_path / shaping.RECORDS / "sknfbbbbbbbbbbb").exists()
    shaping.remove_record(tmp_path, "sknf0123456789a")
    shaping.remove_record(tmp_path, "sknf0123456789a")  # already gone: fine
    assert shaping.load_records(tmp_path) == {}
