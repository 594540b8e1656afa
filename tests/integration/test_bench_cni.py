"""`sknf bench cni` end to end on a few pods: it reports both sides and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from leftovers import assert_lab_gone

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_small_run_reports_ratios_and_cleans_up() -> None:
    proc = subprocess.run([sys.executable, "-m", "sknf", "bench", "cni", "--pods", "4", "--parallel", "2",
                           "--rounds", "1", "--prefix", "ske-bt"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in proc.stdout.splitlines()
            if line.startswith(("sequential ", "parallel ")) and len(line.split()) == 9}
    assert set(rows) == {(p, v) for p in ("sequential", "parallel") for v in ("ADD", "DEL")}
    for values in rows.values():
        assert all(float(v) > 0 for v in values)  # latencies, ratios and the agent's own time all measured
    assert "plugin start-up alone" in proc.stdout
    assert_lab_gone("ske-bt", [])
    assert not list(Path("/tmp").glob("ske-bt-*"))
