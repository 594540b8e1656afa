"""The agent's NetworkPolicy loop: source -> compiler -> nftables (+ the BPF datapath's policy maps).

Why it works this way:
- Local endpoints are the node's IPAM leases (namespace, pod and address as the runtime gave them), so
  a pod is governed from its ADD on, before any API object shows its address: the agent applies right
  after each ADD, and whenever the source or the leases change (the reconcile).
- Order on a change: nftables first, then the BPF datapath's policy maps and endpoint flags
  (sknf.datapath.bpf set_policy: the programs decide the endpoint's fast-path flows, or leave them to
  the kernel path where those rules are). A newly selected pod therefore never runs on the fast path
  past rules that exist; a deselected one is fast-pathed unchecked again only once its rules are gone,
  which loosens nothing that should hold.
- Each compile problem is logged once, by object name (the compile repeats every reconcile).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from sknf.config import Config
from sknf.ipam import Lease
from sknf.policy import Compiled, LocalEndpoint, compile_policies
from sknf.policy import nft as policy_nft
from sknf.policy.source import DirectorySource, Objects, PolicySource

log = logging.getLogger(__name__)


def source_for(cfg: Config, kube_api: Any = None) -> PolicySource | None:
    """policy_dir when set, else the API server with the Kubernetes peer source; None: no policy."""
    if not cfg.network_policy:
        return None
    if cfg.policy_dir is not None:
        return DirectorySource(cfg.policy_dir)
    if cfg.peer_source == "kubernetes":
        from sknf.kube import connect
        from sknf.policy.source import KubePolicySource

        return KubePolicySource(kube_api or connect(cfg))
    return None


class Enforcer:
    def __init__(self, source: PolicySource, datapath: Any) -> None:
        self.source = source
        self.datapath = datapath
        self.lock = threading.Lock()
        self.compiled = Compiled()
        self._said: set[str] = set()
        self._inputs: tuple[Objects, list[LocalEndpoint]] | None = None  # what self.compiled was made of

    def sync(self, leases: Iterable[Lease]) -> None:
        """Compile what the source holds for these local endpoints and enforce it."""
        local = [LocalEndpoint(str(lease.ip), lease.namespace, lease.pod, str(lease.ip6 or "")) for lease in leases]
        with self.lock:
            if self._inputs is not None and self._inputs[1] == local and not self.source.changed():
                objects, compiled = self._inputs[0], self.compiled  # same inputs: only repair the table
            else:
                objects = self.source.objects()
                if objects is None:
                    return  # not heard from the API server yet
                compiled = compile_policies(objects.policies, objects.pods, objects.namespaces, local)
                for problem in compiled.problems:
                    if problem not in self._said:
                        log.warning("network policy: %s", problem)
                self._said = set(compiled.problems)
            if policy_nft.apply(compiled):
                policy_nft.forget_drops({ip for ep in local for ip in (ep.ip, ep.ip6) if ip})
            program = getattr(self.datapath, "set_policy", None)  # the BPF datapath's own maps
            if program is not None:
                program(compiled)
            if compiled.selected() != self.compiled.selected():
                log.info("network policy: %d of %d local endpoints selected (%d policies)",
                         sum(ep.ip in compiled.selected() for ep in local), len(local), len(objects.policies))
            self.compiled, self._inputs = compiled, (objects, local)

    def drops(self) -> dict[str, int]:
        return policy_nft.drops()

    def policies_of(self, ip: str) -> dict[str, list[str]]:
        return self.compiled.policies_of(ip)

    def annotate(self, reply: dict) -> dict:
        """The stats reply's rows, each with the policies selecting its pod (`sknf stats --pod X`)."""
        for row in reply.get("pods", []):
            row["policies"] = self.policies_of(row["ip"])
        return reply

    def close(self) -> None:
        self.source.close()
