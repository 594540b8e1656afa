"""Shared test set-up: the repo on sys.path, and skips for tests the machine cannot run.

Tests marked `root` need root (namespaces, links, iptables); `bpf` ones need BCC too. A quick
unit run is `pytest -m "not root"`.

On CI (CI set) the machine was prepared by scripts/setup.sh, so nothing a test needs may be missing:
no skip markers are added, and any skip a test raises itself (pytest.skip, importorskip) fails the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the CNI plugin binary if its source changed (`make` is a no-op otherwise): the tests and the
    lab's agents install sknf/cni_plugin, and a stale one would test old code. A failed build shows here;
    the tests that need the binary then fail with install.PluginMissing."""
    proc = subprocess.run(["make", "-s", "-C", str(REPO / "cni")], capture_output=True, text=True, check=False)
    if proc.returncode:
        print(f"conftest: building the CNI plugin failed:\n{proc.stdout}{proc.stderr}", file=sys.stderr)


def _has_bcc() -> bool:
    try:
        import bcc  # noqa: F401
    except ImportError:
        return False
    return True


def _on_ci() -> bool:
    return bool(os.environ.get("CI"))


def _fail_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """On CI a skip means something scripts/setup.sh installs is missing: report it as a failure."""
    if _on_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped on CI, where scripts/setup.sh installed everything: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    _fail_skip(outcome.get_result())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _on_ci():
        return  # CI has root and BCC: a missing one must fail the run, not skip half of it
    not_root = pytest.mark.skip(reason="needs root")
    no_bcc = pytest.mark.skip(reason="needs BCC (python3-bpfcc) and kernel headers")
    bcc_ok = None
    for item in items:
        if "root" in item.keywords and os.geteuid() != 0:
            item.add_marker(not_root)
        if "bpf" in item.keywords:
            if bcc_ok is None:
                bcc_ok = _has_bcc()
            if not bcc_ok:
                item.add_marker(no_bcc)
