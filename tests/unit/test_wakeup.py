"""sknf.wakeup: the agent's loop wakes as the peers file changes (inotify) or when poked, and sleeps
its full period otherwise; StaticPeerSource sees a file replaced in place of another."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from sknf.peers import StaticPeerSource
from sknf.wakeup import Wakeup

PEERS = "nodes:\n- {name: n1, underlay_ip: 198.51.100.11}\n"


@pytest.fixture
def wakeup() -> Wakeup:
    w = Wakeup()
    yield w
    w.close()


def woken_within(wakeup: Wakeup, action, timeout: float = 5.0) -> float | None:
    """Seconds until the sleep returned early after action() ran in another thread; None if it did not."""
    threading.Timer(0.1, action).start()
    started = time.monotonic()
    if not wakeup.sleep(timeout):
        return None
    return time.monotonic() - started


def test_sleeps_the_whole_timeout_when_nothing_happens(wakeup: Wakeup, tmp_path: Path) -> None:
    assert wakeup.watch_dir(tmp_path)
    started = time.monotonic()
    assert wakeup.sleep(0.3) is False
    assert time.monotonic() - started >= 0.29


def test_a_file_renamed_into_place_wakes_at_once(wakeup: Wakeup, tmp_path: Path) -> None:
    assert wakeup.watch_dir(tmp_path)

    def replace() -> None:
        (tmp_path / "peers.yaml.new").write_text(PEERS)
        os.replace(tmp_path / "peers.yaml.new", tmp_path / "peers.yaml")

    took = woken_within(wakeup, replace)
    assert took is not None and took < 2.0


def test_a_file_written_in_place_wakes_when_closed(wakeup: Wakeup, tmp_path: Path) -> None:
    (tmp_path / "peers.yaml").write_text(PEERS)
    assert wakeup.watch_dir(tmp_path)
    assert wakeup.sleep(0.05) is False  # the write above happened before the watch
    took = woken_within(wakeup, lambda: (tmp_path / "peers.yaml").write_text(PEERS + "# edited\n"))
    assert took is not None and took < 2.0


def test_poke_wakes_without_any_watch(wakeup: Wakeup) -> None:
    took = woken_within(wakeup, wakeup.poke)
    assert took is not None and took < 2.0
    assert wakeup.sleep(0.05) is False  # the poke was consumed


def test_an_unwatchable_directory_falls_back_to_the_period(wakeup: Wakeup, tmp_path: Path) -> None:
    assert wakeup.watch_dir(tmp_path / "missing") is False
    assert wakeup.sleep(0.05) is False


def test_static_source_sees_a_replacement_with_the_same_size_and_mtime(tmp_path: Path) -> None:
    path = tmp_path / "peers.yaml"
    path.write_text(PEERS)
    source = StaticPeerSource(path)
    assert [n.name for n in source.nodes()] == ["n1"] and not source.changed()
    st = path.stat()
    other = tmp_path / "other.yaml"
    other.write_text(PEERS.replace("n1", "n2"))
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, path)  # same size, same mtime: only the inode tells
    assert source.changed()
    assert [n.name for n in source.nodes()] == ["n2"]
