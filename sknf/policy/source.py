"""Where NetworkPolicies, Pods and Namespaces come from: a directory of manifests, or the Kubernetes API.

Both give the compiler (sknf.policy) the same raw objects, and the agent polls changed()/objects() from
its loop, as it does the peer source, so no callback crosses threads.

- DirectorySource (the lab, bare metal): every *.yaml, *.yml and *.json file of `policy_dir`, any number of
  documents each (a `List`'s items count too). A file that does not parse keeps the objects it held
  last (logged once by file name): a typo must not silently lift the policies it holds.
- KubePolicySource: one list+watch thread per kind (Pods of every namespace, Namespaces,
  NetworkPolicies), with the Node watch's resume, 410-relist, periodic relist and jittered backoff
  (sknf.kube). Pods are kept as the projection the compiler reads (labels, IPs, named ports), not
  whole objects. Until every kind has been listed once, objects() is None and the agent enforces
  nothing new: it cannot tell a policy-free cluster from one it has not heard from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

log = logging.getLogger(__name__)

KINDS = {"Pod": "pods", "Namespace": "namespaces", "NetworkPolicy": "policies"}
SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class Objects:
    pods: list[dict] = field(default_factory=list)
    namespaces: list[dict] = field(default_factory=list)
    policies: list[dict] = field(default_factory=list)


class PolicySource(Protocol):
    def changed(self) -> bool: ...

    def objects(self) -> Objects | None:
        """Everything known now; None until the source has been read completely once."""

    def close(self) -> None: ...


def _sort(docs: list[Any], into: Objects, where: str) -> None:
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        if doc.get("kind") == "List" or (isinstance(doc.get("kind"), str) and doc["kind"].endswith("List")):
            _sort(list(doc.get("items") or []), into, where)
            continue
        kind = KINDS.get(doc.get("kind"))
        if kind is None:
            log.debug("%s: ignoring a %s", where, doc.get("kind"))
            continue
        getattr(into, kind).append(doc)


class DirectorySource:
    """Manifests in a directory; re-read when any file's name, size or mtime changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature: tuple | None = None
        self._files: dict[str, Objects] = {}  # last good content of each file
        self._broken: set[tuple[str, int]] = set()  # (file, mtime) already complained about

    def _scan(self) -> tuple:
        try:
            entries = sorted(p for p in self.path.iterdir() if p.suffix in SUFFIXES and p.is_file())
        except OSError:
            return ()
        out = []
        for p in entries:
            with contextlib.suppress(OSError):
                st = p.stat()
                out.append((p.name, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def changed(self) -> bool:
        return self._scan() != self._signature

    def objects(self) -> Objects:
        signature = self._scan()
        files: dict[str, Objects] = {}
        for name, _, mtime in signature:
            got = Objects()
            try:
                _sort(list(yaml.safe_load_all((self.path / name).read_text())), got, name)
            except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
                if (name, mtime) not in self._broken:
                    self._broken.add((name, mtime))
                    log.error("policy manifest %s: %s; keeping what it held before", self.path / name, e)
                got = self._files.get(name, Objects())
            files[name] = got
        self._files, self._signature = files, signature
        out = Objects()
        for got in files.values():
            out.pods += got.pods
            out.namespaces += got.namespaces
            out.policies += got.policies
        return out

    def close(self) -> None:
        """Nothing runs in the background."""


def project_pod(obj: dict) -> dict:
    """What the compiler reads of a Pod: labels, addresses, named ports, hostNetwork and phase."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    ports = [{"ports": [p for p in (c or {}).get("ports") or [] if isinstance(p, dict) and p.get("name")]}
             for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]]
    return {"metadata": {k: meta.get(k) for k in ("namespace", "name", "labels")},
            "spec": {"hostNetwork": bool(spec.get("hostNetwork")), "containers": [c for c in ports if c["ports"]]},
            "status": {k: status.get(k) for k in ("podIP", "podIPs", "phase")}}


def _key(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


class _Watch:
    """One kind's list+watch loop (sknf.kube's pattern), keeping {(namespace, name): object}."""

    def __init__(self, owner: KubePolicySource, kind: str, list_fn: Any, project: Any) -> None:
        self.owner, self.kind, self.list_fn, self.project = owner, kind, list_fn, project
        self.items: dict[tuple[str, str], dict] = {}
        self.synced = False
        self.resp: Any = None
        self.thread = threading.Thread(target=self.run, name=f"sknf-policy-{kind}", daemon=True)

    def run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        from sknf.kube import _api_errors

        o = self.owner
        delay, version, relist_at = o.backoff[0], None, 0.0
        while not o.stop.is_set():
            try:
                if version is None or time.monotonic() >= relist_at:
                    version = self.list()
                    relist_at = time.monotonic() + o.resync
                version = self.watch(version, relist_at)
                delay = o.backoff[0]
            except ApiException as e:
                if e.status == 410:
                    log.info("%s watch expired (410 Gone); relisting", self.kind)
                    version = None
                    continue
                delay = self.pause(e, delay)
            except _api_errors() as e:
                delay = self.pause(e, delay)
            except Exception as e:  # a garbled event must not end the thread: policy would freeze silently
                log.exception("%s list/watch: unexpected error", self.kind)
                delay = self.pause(e, delay)

    def pause(self, e: BaseException, delay: float) -> float:
        from sknf.kube import _describe

        o = self.owner
        if not o.stop.is_set():
            wait = random.uniform(delay / 2, delay)
            log.warning("%s list/watch failed (%s); retrying in %.1fs", self.kind, _describe(e), wait)
            o.stop.wait(wait)
        return min(delay * 2, o.backoff[1])

    def list(self) -> str | None:
        from sknf.kube import REQUEST_TIMEOUT

        doc = json.loads(self.list_fn(_preload_content=False, _request_timeout=REQUEST_TIMEOUT).data)
        items = {_key(obj): self.project(obj) for obj in doc.get("items") or []}
        with self.owner.lock:
            if items != self.items or not self.synced:
                self.owner.version += 1
            self.items, self.synced = items, True
        return (doc.get("metadata") or {}).get("resourceVersion")

    def watch(self, version: str | None, relist_at: float) -> str | None:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import ReadTimeoutError

        from sknf.kube import REQUEST_TIMEOUT

        timeout = max(1, int(min(self.owner.watch_timeout, relist_at - time.monotonic())))
        self.resp = resp = self.list_fn(watch=True, resource_version=version, timeout_seconds=timeout,
                                        allow_watch_bookmarks=True, _preload_content=False,
                                        _request_timeout=(REQUEST_TIMEOUT[0], timeout + 15))
        try:
            for line in resp:
                if self.owner.stop.is_set():
                    break
                if not line.strip():
                    continue
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                self.apply(event.get("type"), obj)
        except ReadTimeoutError:
            log.debug("%s watch idle past its timeout; reconnecting", self.kind)
        finally:
            self.resp = None
            resp.release_conn()
        return version

    def apply(self, kind: str | None, obj: dict) -> None:
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            return  # BOOKMARK: only its resourceVersion matters
        key = _key(obj)
        with self.owner.lock:
            if kind == "DELETED":
                if self.items.pop(key, None) is not None:
                    self.owner.version += 1
                return
            projected = self.project(obj)
            if self.items.get(key) != projected:
                self.items[key] = projected
                self.owner.version += 1

    def cut(self) -> None:
        sock = getattr(getattr(self.resp, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _plain(obj: dict) -> dict:
    meta = obj.get("metadata") or {}
    return {**{k: v for k, v in obj.items() if k not in ("metadata", "status")},
            "metadata": {k: meta.get(k) for k in ("namespace", "name", "labels")}}


class KubePolicySource:
    """Pods, Namespaces and NetworkPolicies from the API server; RBAC: get/list/watch of each."""

    def __init__(self, api: Any, *, resync: float = 300.0, watch_timeout: float = 240.0,
                 backoff: tuple[float, float] = (0.5, 30.0)) -> None:
        from kubernetes import client

        self.resync, self.watch_timeout, self.backoff = resync, watch_timeout, backoff
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.version = 0
        self._returned = -1
        net = client.NetworkingV1Api(api.api_client)
        self._watches = {"pods": _Watch(self, "pod", api.list_pod_for_all_namespaces, project_pod),
                         "namespaces": _Watch(self, "namespace", api.list_namespace, _plain),
                         "policies": _Watch(self, "networkpolicy", net.list_network_policy_for_all_namespaces,
                                            _plain)}
        for w in self._watches.values():
            w.thread.start()

    def changed(self) -> bool:
        with self.lock:
            return self.version != self._returned

    def objects(self) -> Objects | None:
        with self.lock:
            if not all(w.synced for w in self._watches.values()):
                return None
            self._returned = self.version
            return Objects(**{k: list(w.items.values()) for k, w in self._watches.items()})

    def close(self) -> None:
        self.stop.set()
        for w in self._watches.values():
            w.cut()
        for w in self._watches.values():
            w.thread.join(timeout=10)
