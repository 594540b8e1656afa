"""Which iptables backend sknf uses: kube-proxy's iptables-wrapper rule, on each backend's iptables-save."""

from __future__ import annotations

import subprocess

import pytest

from sknf import iptables

EMPTY = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
DROP = EMPTY.replace(":FORWARD ACCEPT", ":FORWARD DROP")
RULES = EMPTY.replace("COMMIT", "-A INPUT -p tcp --dport 22 -j ACCEPT\n-A INPUT -i lo -j ACCEPT\nCOMMIT")
KUBE = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"
SKNF = EMPTY.replace("COMMIT", ":SKNF-FORWARD - [0:0]\n-A FORWARD -m comment --comment sknf -j SKNF-FORWARD\n"
                     "-A SKNF-FORWARD -s 10.244.0.0/16 -m comment --comment sknf -j ACCEPT\nCOMMIT")


@pytest.mark.parametrize("nft,legacy,want", [
    (EMPTY, EMPTY, "nft"),  # an empty host: nft, as the wrapper and today's distributions default
    (EMPTY, DROP, "legacy"),  # a legacy firewall's DROP policy (Docker on such hosts)
    (DROP, EMPTY, "nft"),
    (RULES, DROP, "nft"),  # more rules in nft
    (EMPTY, RULES, "legacy"),
    (KUBE, RULES + DROP, "nft"),  # kubelet's hint chain wins over any count
    (RULES, KUBE, "legacy"),
    (KUBE, KUBE, "nft"),  # nft is looked at first, as the wrapper does
    (SKNF, DROP, "legacy"),  # sknf's own rules never count: a restart decides as the first start did
    (SKNF + SKNF, EMPTY, "nft"),
])
def test_detect(monkeypatch: pytest.MonkeyPatch, nft: str, legacy: str, want: str) -> None:
    saves = {"iptables-nft-save": nft, "iptables-legacy-save": legacy}

    def fake_run(argv: list[str], **_kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 0, saves[argv[0]], "")

    monkeypatch.setattr(iptables.shutil, "which", lambda name: f"/usr/sbin/{name}")
    monkeypatch.setattr(iptables.subprocess, "run", fake_run)
    backend = iptables.detect()
    assert backend.mode == want
    assert backend.reason
    assert (backend.iptables, backend.restore) == (f"iptables-{want}", f"iptables-{want}-restore")


def test_a_missing_backend_is_not_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iptables.shutil, "which", lambda name: None if "nft" in name else f"/usr/sbin/{name}")
    monkeypatch.setattr(iptables.subprocess, "run",
                        lambda argv, **_kw: subprocess.CompletedProcess(argv, 0, EMPTY, ""))
    assert iptables.detect().mode == "legacy"
    monkeypatch.setattr(iptables.shutil, "which", lambda name: None)
    with pytest.raises(iptables.IptablesError, match="neither"):
        iptables.detect()
