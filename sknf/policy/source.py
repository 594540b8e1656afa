"""Where NetworkPolicies, Pods and Namespaces come from: a directory of manifests, or the Kubernetes API.

Both give the compiler (sknf.policy) the same raw objects, and the agent polls changed()/objects() from
its loop, as it does the peer source, so no callback crosses threads.

- DirectorySource (the lab, bare metal): every *.yaml, *.yml and *.json file of `policy_dir`, any number of
  documents each (a `List`'s items count too). A file that does not parse keeps the objects it held
  last (logged once by file name): a typo must not silently lift the policies it holds.
- KubePolicySource: one list+watch thread per kind (Pods of every namespace, Namespaces,
  NetworkPolicies): sknf.kube.ListWatch, the Node watch's loop (resume, 410-relist, periodic relist,
  jittered backoff). Pods are kept as the projection the compiler reads (labels, IPs, named ports), not
  whole objects. Until every kind has been listed once, objects() is None and the agent enforces
  nothing new: it cannot tell a policy-free cluster from one it has not heard from.
"""

from __future__ import annotations

import contextlib
import logging
import threading
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


class _Kind:
    """What one kind's list+watch (sknf.kube.ListWatch) keeps: {(namespace, name): projected object}."""

    def __init__(self, owner: KubePolicySource, kind: str, list_fn: Any, project: Any) -> None:
        from sknf.kube import ListWatch

        self.owner, self.project = owner, project
        self.items: dict[tuple[str, str], dict] = {}
        self.synced = False
        self.watch = ListWatch(kind, list_fn, self.take_list, self.apply, stop=owner.stop, resync=owner.resync,
                               watch_timeout=owner.watch_timeout, backoff=owner.backoff,
                               thread=f"sknf-policy-{kind}", logger=log)

    def take_list(self, objs: list[dict]) -> None:
        items = {_key(obj): self.project(obj) for obj in objs}
        with self.owner.lock:
            if items != self.items or not self.synced:
                self.owner.version += 1
            self.items, self.synced = items, True

    def apply(self, kind: str, obj: dict) -> None:
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
        self._kinds = {"pods": _Kind(self, "pod", api.list_pod_for_all_namespaces, project_pod),
                       "namespaces": _Kind(self, "namespace", api.list_namespace, _plain),
                       "policies": _Kind(self, "networkpolicy", net.list_network_policy_for_all_namespaces, _plain)}
        for k in self._kinds.values():
            k.watch.thread.start()

    def changed(self) -> bool:
        with self.lock:
            return self.version != self._returned

    def objects(self) -> Objects | None:
        with self.lock:
            if not all(k.synced for k in self._kinds.values()):
                return None
            self._returned = self.version
            return Objects(**{name: list(k.items.values()) for name, k in self._kinds.items()})

    def close(self) -> None:
        self.stop.set()
        for k in self._kinds.values():
            k.watch.cut()
        for k in self._kinds.values():
            k.watch.thread.join(timeout=10)
