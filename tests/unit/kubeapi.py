"""A Kubernetes API server emulation on a real localhost HTTP port, for tests that use the real client.

kmock's KubernetesEmulator keeps objects in memory and serves list/watch/get/patch/delete over HTTP.
It runs on an asyncio loop in its own thread, so synchronous code under test (the kubernetes client,
KubePeerSource's watch thread) talks to it exactly as it would to an API server. Two gaps in kmock's
watch are closed here: it ignored timeoutSeconds, and it could drop a write racing a new watch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock
import yaml
from kmock._internal import parsing as kmock_parsing

NODES = "v1/nodes"


def _parse_path(path: str, _original=kmock_parsing.parse_path) -> kmock_parsing.ParsedPath:
    """kmock's path parser, taught the Namespace resource itself: it read /api/v1/namespaces[/name] as
    a namespaced path missing its resource, so listing, reading or patching Namespaces failed."""
    parts = path.split("?")[0].strip("/").split("/")
    if parts[:2] == ["api", "v1"] and parts[2:3] == ["namespaces"] and len(parts) <= 4:
        return kmock_parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None, None)
    return _original(path)


kmock_parsing.parse_path = _parse_path


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with a watch that behaves like the API server's where tests depend on it."""

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        """Existing objects, then changes -- with no gap between the two (kmock subscribes to changes
        only after sending the existing objects, so a write meanwhile was lost) -- until ?timeoutSeconds=.
        Uses kmock's internal event bus and lock: there is no public hook for this."""
        yield b""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(request.params.get("timeoutSeconds") or 3600)
        bus = self._buses[request.resource]
        async with self._lock:
            mark = await bus.mark()
            existing = [obj.raw for (res, _, _), obj in self.objects.items()
                        if res == request.resource and not obj.deleted]
        try:
            for raw in existing:
                yield {"type": "ADDED", "object": raw}
            changes = bus.stream(since=mark)
            while (left := deadline - loop.time()) > 0:
                try:
                    yield await asyncio.wait_for(anext(changes), left)
                except (TimeoutError, StopAsyncIteration):
                    return
        finally:
            await bus.unmark(mark)


class ApiServer:
    """The emulator plus helpers to feed it Nodes, script failures and read back the requests it got."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the API emulator did not start")

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with Emulator() as emu, kmock.Server(emu) as server:
            self.emu = emu
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the server's loop (kmock's DSL and state are not thread-safe) and return its result."""
        done: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except Exception as e:
                done.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return done.result(10)

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emu",
            "clusters": [{"name": "emu", "cluster": {"server": self.url}}],
            "users": [{"name": "emu", "user": {"token": "test-token"}}],
            "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu"}}],
        }))
        return path

    def requests(self, criteria: str) -> list[kmock.Request]:
        """Requests received so far that match kmock criteria, e.g. 'watch v1/nodes' or 'patch'."""
        return self.call(lambda: list(self.emu[criteria]))

    def script(self, criteria: str, count: int, *payload: Any) -> None:
        """Answer the next `count` requests matching `criteria` with `payload` instead of the emulation."""
        def add() -> None:
            view = self.emu[criteria]
            start = len(list(view))
            reaction = view[start:start + count]
            for item in payload:
                reaction = reaction << item
        self.call(add)

    def fail(self, criteria: str, count: int, status: int = 500) -> None:
        self.script(criteria, count, status, {"apiVersion": "v1", "kind": "Status", "status": "Failure",
                                              "code": status, "message": "scripted failure"})

    def drop_silently(self, name: str) -> None:
        """Forget a Node without telling watchers, as if its DELETED event had been missed."""
        self.call(lambda: self.emu.objects[NODES, None, name].delete())


def node(name: str, ip: str | None = None, pod_cidr: str | None = None, annotations: dict | None = None,
         rv: str | None = None) -> dict:
    """A Node object as the API server stores it (only the fields sknf reads, plus one it must keep)."""
    meta: dict[str, Any] = {"name": name, "labels": {"kubernetes.io/hostname": name}}
    if annotations:
        meta["annotations"] = annotations
    if rv:
        meta["resourceVersion"] = rv
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "Node", "metadata": meta, "spec": {}, "status": {}}
    if pod_cidr:
        obj["spec"] = {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]}
    if ip:
        obj["status"] = {"addresses": [{"type": "InternalIP", "address": ip},
                                       {"type": "Hostname", "address": name}]}
    return obj


def eventually(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll until check() returns something truthy (the watch thread applies events asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last value {result!r}")
        time.sleep(0.02)
