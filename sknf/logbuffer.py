"""The agent's recent log lines, kept in memory for `sknf sysdump` (served as {"op": "logs"}).

Bounded twice: at most LINES lines of at most WIDTH characters (2,000 x 1,000: under 2 MiB even when
every line is full), so a log storm cannot grow the agent; a container runtime's log may be rotated
away or unreadable from the node, this buffer is what the agent itself saw.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

LINES = 2000
WIDTH = 1000
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogBuffer(logging.Handler):
    def __init__(self, lines: int = LINES, width: int = WIDTH) -> None:
        super().__init__()
        self.width = width
        self._lines: deque[str] = deque(maxlen=lines)
        self._guard = threading.Lock()
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a bad format argument must not break the caller's logging
            line = f"{record.levelname} {record.name}: {record.msg!r} (unformattable)"
        with self._guard:
            self._lines.append(line[: self.width])

    def tail(self, n: int | None = None) -> list[str]:
        with self._guard:
            lines = list(self._lines)
        return lines if n is None else lines[-n:]
