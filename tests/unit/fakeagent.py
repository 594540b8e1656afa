"""A one-shot fake agent for tests of the clients of sknf's socket (the plugin, api.request)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def agent_replying(path: Path, reply: bytes, timeout: float = 60) -> Iterator[None]:
    """A fake agent on `path` that reads one request and answers `reply` verbatim (garbage included).

    The accept times out, so a client that never connects cannot hang the suite.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        listener.settimeout(timeout)

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.makefile("rb").read()
                conn.sendall(reply)

        t = threading.Thread(target=answer)
        t.start()
        try:
            yield
        finally:
            t.join()
