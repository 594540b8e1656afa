"""Entering network namespaces from Python threads and child processes.

setns(2) changes the namespace of the calling thread only, and Python threads are OS threads, so a
thread can step into a pod's or node's namespace, open a socket there (the socket stays bound to
that namespace), and step back. Python 3.11 has no os.setns, hence ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(name_or_path: str) -> str:
    """`ip netns` names live under /run/netns; anything with a slash is already a path."""
    return name_or_path if "/" in name_or_path else f"{NETNS_RUN_DIR}/{name_or_path}"


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def is_netns(path: str) -> bool:
    """True if path names a namespace (a file on nsfs), so garbage paths fail early and clearly."""
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return False


@contextlib.contextmanager
def entered(name_or_path: str) -> Iterator[None]:
    """Run the block with the calling thread inside the namespace; always step back out."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(netns_path(name_or_path), os.O_RDONLY)
    try:
        setns(target)
        try:
            yield
        finally:
            setns(back)
    finally:
        os.close(target)
        os.close(back)


def preexec_enter(name_or_path: str):
    """A subprocess preexec_fn that moves the child into the namespace before exec."""
    path = netns_path(name_or_path)

    def enter() -> None:
        fd = os.open(path, os.O_RDONLY)
        setns(fd)
        os.close(fd)

    return enter
