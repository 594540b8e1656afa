"""The guard between the lease-changing verbs (shared) and a store rebuild (exclusive)."""

from __future__ import annotations

import threading

from sknf.pod import SharedLock


def test_a_rebuild_waits_for_running_verbs_and_new_verbs_wait_for_it() -> None:
    lock, order = SharedLock(), []
    verb_running, release_verb = threading.Event(), threading.Event()

    def verb(name: str, hold: threading.Event | None = None) -> None:
        with lock.shared():
            order.append(f"{name} in")
            if hold is not None:
                verb_running.set()
                hold.wait(5)
            order.append(f"{name} out")

    def rebuild() -> None:
        with lock.exclusive():
            order.append("rebuild")

    first = threading.Thread(target=verb, args=("first", release_verb))
    first.start()
    verb_running.wait(5)
    rebuilding = threading.Thread(target=rebuild)
    rebuilding.start()
    while not lock._exclusive:  # the rebuild has announced itself and now waits for `first`
        threading.Event().wait(0.001)
    second = threading.Thread(target=verb, args=("second",))
    second.start()
    release_verb.set()
    for t in (first, rebuilding, second):
        t.join(5)

    assert order == ["first in", "first out", "rebuild", "second in", "second out"]


def test_shared_holders_do_not_exclude_each_other() -> None:
    lock = SharedLock()
    with lock.shared(), lock.shared():
        pass
    with lock.exclusive():
        pass
