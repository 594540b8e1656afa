"""What the agent's loop sleeps on: a deadline, a change in a watched directory, or a poke.

Why: the peers file was polled once a second, so a change waited up to a second before the reconcile
even began. inotify (through libc with ctypes: no dependency) wakes the loop as the file is written or
renamed into place; a watch thread (the Kubernetes source) or a signal handler pokes it through a pipe.
Where inotify is unavailable (no instances left), a watched directory falls back to the loop's own
period, which is what polling gave.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import select
from pathlib import Path

log = logging.getLogger(__name__)

IN_ATTRIB, IN_CLOSE_WRITE = 0x004, 0x008
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x040, 0x080, 0x100, 0x200
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
# Closed after writing, renamed into place (atomic writers), a ConfigMap's symlink swapped, removed.
# Not IN_MODIFY: a file written in place would wake the loop halfway through the write (the loop's
# one-second tick still looks, should a writer keep the file open).
DIR_EVENTS = IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class Wakeup:
    """Sleep until a timeout, unless a watched directory changes or poke() is called first."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._inotify: int | None = None

    def watch_dir(self, directory: Path) -> bool:
        """Wake on any change of an entry in directory; False (and logged) when inotify cannot."""
        try:
            if self._inotify is None:
                fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
                if fd < 0:
                    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
                self._inotify = fd
            if _libc.inotify_add_watch(self._inotify, os.fsencode(directory), DIR_EVENTS) < 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        except OSError as e:
            log.warning("cannot watch %s (%s): changes there are seen within a second", directory, e.strerror)
            return False
        return True

    def poke(self) -> None:
        """Wake the sleeper now (from any thread, or a signal handler)."""
        with contextlib.suppress(BlockingIOError):  # the pipe is full: a wake-up is pending anyway
            os.write(self._w, b"\0")

    def sleep(self, timeout: float) -> bool:
        """Sleep at most timeout seconds; True when woken early (the events are consumed)."""
        fds = [self._r] if self._inotify is None else [self._r, self._inotify]
        ready, _, _ = select.select(fds, [], [], max(0.0, timeout))
        for fd in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(fd, 4096):
                    pass
        return bool(ready)

    def close(self) -> None:
        for fd in (self._r, self._w, self._inotify):
            if fd is not None:
                os.close(fd)
        self._inotify = None
