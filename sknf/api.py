"""The agent's root-only unix socket: one JSON request in, one reply out, per connection.

Request: the client sends one JSON object naming an "op" and shuts down its write side. The
plugin's is {"op": "cni", "env": {CNI_* variables}, "config": <netconf>} (it writes the netconf in
as the runtime sent it), validated by sknf.cni before the handler sees a `Request`; any other op's
handler (e.g. {"op": "stats"}) gets the decoded request.

Reply: one ASCII digit, the plugin's exit status, then exactly what the plugin prints: after "0"
nothing (a null result) or the result as JSON, after "1" a CNI error object. So the plugin copies
the reply to stdout without a JSON encoder (its start-up is on every pod's path); `request()`
decodes it into {"ok": true, "result": <object or None>} or {"ok": false, "error": <object>}.

Only root may talk to the agent, enforced twice: the socket is 0600 in a 0700 directory, and
each connection's SO_PEERCRED uid is checked (a file mode can be loosened by accident; the
kernel's credential cannot be forged). Every failure becomes a CNI error reply, never a
dropped connection: the plugin would have to guess what happened to an ADD.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import stat
import struct
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sknf import cni

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20  # the plugin refuses larger netconfs too
MAX_DISCARD = 64 << 20  # how much of an oversized request we swallow so the client can read our error
READ_TIMEOUT = 10.0  # for receiving the request; handlers themselves are not bounded here

Handler = Callable[[Any], dict[str, Any] | None]


def _peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return uid


def _read_request(sock: socket.socket) -> bytes:
    chunks, size = [], 0
    while chunk := sock.recv(65536):
        size += len(chunk)
        if size > MAX_REQUEST:
            # Closing with unread input would reset the connection and lose our answer: drain first.
            while size <= MAX_DISCARD and (chunk := sock.recv(1 << 20)):
                size += len(chunk)
            raise cni.CniError(cni.IO_FAILURE, "request too large", f"more than {MAX_REQUEST} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _reply(status: int, doc: dict[str, Any] | None) -> bytes:
    """The exit status digit, then the plugin's stdout: nothing for a null result, else a JSON line."""
    return str(status).encode() + (b"" if doc is None else json.dumps(doc).encode() + b"\n")


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True  # a stuck handler must not block agent shutdown
    request_queue_size = 128  # listen backlog; socketserver's 5 makes a burst of plugins fail (EAGAIN)
    block_on_close = False

    def __init__(self, path: str, handlers: Mapping[str, Handler], peer_uid: int) -> None:
        self.handlers = dict(handlers)
        self.peer_uid = peer_uid
        super().__init__(path, _Connection)


class _Connection(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        version = cni.LATEST
        try:
            sock.settimeout(READ_TIMEOUT)
            raw = _read_request(sock)  # read even a refused request: unread input would reset our answer
            sock.settimeout(None)
            uid = _peer_uid(sock)
            if uid != self.server.peer_uid:
                raise cni.CniError(cni.FORBIDDEN, "permission denied", f"peer uid {uid} is not allowed")
            try:
                payload = json.loads(raw)
            except ValueError as e:
                raise cni.CniError(cni.DECODING_FAILURE, "request is not JSON", str(e)) from None
            if not isinstance(payload, dict):
                raise cni.CniError(cni.DECODING_FAILURE, "request is not a JSON object")
            op = payload.get("op")
            handler = self.server.handlers.get(op) if isinstance(op, str) else None
            if handler is None:
                raise cni.CniError(cni.UNSUPPORTED_FIELD, f"unsupported field op={op!r}",
                                   f"known ops: {', '.join(sorted(self.server.handlers))}")
            if op == "cni":
                env, config = payload.get("env"), payload.get("config")
                version = cni.error_version(config)
                if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
                    raise cni.CniError(cni.DECODING_FAILURE, "cni request env is not a string map")
                reply = _reply(0, handler(cni.parse_request(env, config)))
            else:
                reply = _reply(0, handler(payload))
        except cni.CniError as e:
            reply = _reply(1, e.to_json(version))
        except Exception as e:
            log.exception("socket request failed")
            reply = _reply(1, cni.CniError(
                cni.INTERNAL, "internal agent error", f"{type(e).__name__}: {e}").to_json(version))
        try:
            sock.sendall(reply)
        except OSError as e:
            log.warning("could not answer socket client: %s", e)


class ApiServer:
    """A running socket server; `shutdown()` stops it and removes the socket."""

    def __init__(self, server: _Server, path: Path) -> None:
        self._server = server
        self.path = path
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="sknf-api", daemon=True)  # poll_interval bounds shutdown()
        self._thread.start()

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self.path.unlink(missing_ok=True)


def _prepare_dir(directory: Path) -> None:
    """Create the socket's directory 0700, or tighten it; refuse shared (sticky) dirs like /tmp."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = directory.stat().st_mode
    if mode & stat.S_ISVTX:
        raise ValueError(f"socket directory {directory} is a shared (sticky) directory; use a dedicated one")
    if stat.S_IMODE(mode) != 0o700:
        directory.chmod(0o700)


def _remove_stale(path: Path) -> None:
    """Remove a socket left by a dead agent; refuse to steal one a live agent still serves."""
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise ValueError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            return
    raise ValueError(f"another agent is serving on {path}")


def serve(socket_path: Path | str, handlers: Mapping[str, Handler], *, peer_uid: int = 0) -> ApiServer:
    """Start serving `handlers` (op name -> handler) on a fresh socket, in a background thread.

    `peer_uid` is the only client uid accepted: root in production, the test's own uid in tests.
    """
    path = Path(socket_path)
    _prepare_dir(path.parent)
    _remove_stale(path)
    server = _Server(str(path), handlers, peer_uid)
    path.chmod(0o600)  # bind() honours the umask; the 0700 directory covers the moment between
    return ApiServer(server, path)


def request(socket_path: Path | str, payload: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one request; return {"ok": True, "result": ...} or {"ok": False, "error": ...}.

    Raises OSError or ValueError when the agent cannot be reached or its reply is malformed.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        try:
            sock.sendall(json.dumps(payload).encode())
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading (request too large); its answer is still queued
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    reply = b"".join(chunks)
    status, body = reply[:1], reply[1:]
    if status not in (b"0", b"1"):
        raise ValueError("malformed agent reply")
    doc = json.loads(body) if body.strip() else None
    return {"ok": True, "result": doc} if status == b"0" else {"ok": False, "error": doc}
