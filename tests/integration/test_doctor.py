"""`sknf doctor` against a real lab: every check is broken on a node, must FAIL or WARN naming what and
where, then is repaired and must be OK again. Doctor runs as an operator runs it: `sknf doctor -o json`
as a process inside the node's network namespace, with the node's config file.

One BPF-datapath lab for the module (its pins are what the bpffs check reads); a healthy kernel-datapath
lab once, for "all OK" in both datapaths.
"""

from __future__ import annotations

import ctypes
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from leftovers import managed_lab

from sknf import doctor, netlink, nsutil
from sknf.config import VXLAN
from sknf.iptables import INPUT_CHAIN, NAT_CHAIN
from sknf.lab import INTERNET_HOST, METRICS_PORT, REPO, SERVER_PORT, UNDERLAY, Lab, LabNode, who

pytestmark = [pytest.mark.root, pytest.mark.bpf]

PREFIX = "skx"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with managed_lab(PREFIX, nodes=2, pods_per_node=1, datapath="bpf") as built:
        yield built


def _without_bpffs() -> None:
    """preexec: a private mount namespace in which /sys/fs/bpf is unmounted (the machine's stays)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x00020000):  # CLONE_NEWNS (Python 3.11 has no os.unshare)
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None):  # MS_REC | MS_PRIVATE
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    while libc.umount2(b"/sys/fs/bpf", 2) == 0:  # MNT_DETACH, until no bpffs is stacked there
        pass


def run_doctor(node: LabNode, *args: str, bpffs: bool = True, config: str | None = None
               ) -> tuple[int, dict[str, doctor.Finding]]:
    enter = nsutil.preexec_enter(node.netns)

    def preexec() -> None:
        if not bpffs:
            _without_bpffs()
        enter()

    proc = subprocess.run([sys.executable, "-m", "sknf", "doctor", "-c", config or node.config, "-o", "json", *args],
                          capture_output=True, text=True, timeout=60, cwd=str(REPO), preexec_fn=preexec)
    doc = json.loads(proc.stdout)
    assert doc["exit_code"] == proc.returncode, proc.stderr
    return proc.returncode, {c["check"]: doctor.Finding(**c) for c in doc["checks"]}


def assert_all_ok(node: LabNode) -> None:
    rc, found = run_doctor(node)
    bad = {name: f"{f.status} {f.message}" for name, f in found.items() if f.status != doctor.OK}
    assert (rc, bad) == (0, {})


def in_node(node: LabNode, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), preexec_fn=nsutil.preexec_enter(node.netns), capture_output=True, text=True,
                          check=check, timeout=30)


def eventually(fn, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got or time.monotonic() > deadline:
            assert got, f"timed out waiting for {what}"
            return got
        time.sleep(0.3)


def reaches(netns: str, ip: str) -> bool:
    """A TCP connection to the lab's server at ip succeeds within a second."""
    with nsutil.entered(netns):
        sock = socket.socket()
    sock.settimeout(1.0)
    try:
        sock.connect((ip, SERVER_PORT))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def pods_of(lab: Lab, node: LabNode):
    return [p for p in lab.state.pods if p.node == node.name]


def test_a_healthy_lab_is_all_ok_and_peer_health_is_exported(lab: Lab) -> None:
    for node in lab.state.nodes:
        assert_all_ok(node)
    n1 = lab.state.nodes[0]
    _, found = run_doctor(n1)
    assert found["agent"].message == "running, datapath bpf"
    assert "pins under" in found["bpffs"].message
    assert "flow map " in found["capacity"].message  # the learned-flow map's fill level, from the agent
    assert found["peer-health"].message.startswith("1/1 peers reachable (probed now)")

    def scrape() -> str:
        with nsutil.entered(n1.netns):
            return urllib.request.urlopen(f"http://{n1.underlay_ip}:{METRICS_PORT}/metrics", timeout=5).read().decode()

    body = scrape()
    assert 'sknf_peers_reachable{node="n1"} 1.0' in body
    assert 'sknf_peers_unreachable{fault="overlay",node="n1"} 0.0' in body
    rtt_counts = [line for line in body.splitlines() if line.startswith("sknf_peer_rtt_seconds_count")]
    assert {'path="overlay"' in line for line in rtt_counts} == {True, False}  # both paths, no per-peer series
    assert "peer=" not in body


def test_healthy_kernel_lab_is_all_ok() -> None:
    prefix = f"{PREFIX}k"
    with managed_lab(prefix, nodes=2, pods_per_node=1, datapath="kernel") as built:
        for node in built.state.nodes:
            assert_all_ok(node)
        _, found = run_doctor(built.state.nodes[0])
        assert found["agent"].message == "running, datapath kernel (datapath: kernel in config)"
        assert found["bpffs"].message == "not used (kernel datapath)"


def test_forward_policy_drop_in_the_other_backend(lab: Lab) -> None:
    n1 = lab.state.nodes[0]
    a = pods_of(lab, n1)[0]
    in_node(n1, "iptables-legacy", "-w", "-P", "FORWARD", "DROP")
    try:
        rc, found = run_doctor(n1)
        assert rc == 4 and found["forward"].status == doctor.FAIL
        assert ("FORWARD policy DROP in iptables-legacy, where sknf's rules are not (sknf uses iptables-nft)"
                in found["forward"].message)  # the agent chose nft at start: the lab's kube-proxy rules are there
        assert not reaches(a.netns, INTERNET_HOST)  # the finding is real: what n1 routes for its pod is dropped
    finally:
        in_node(n1, "iptables-legacy", "-w", "-P", "FORWARD", "ACCEPT")
    assert run_doctor(n1)[1]["forward"].status == doctor.OK
    assert who(a.netns, INTERNET_HOST) == (n1.underlay_ip, "inet")


def test_a_drop_rule_ahead_of_sknfs_jump(lab: Lab) -> None:
    n1 = lab.state.nodes[0]
    rule = ["FORWARD", "-d", "10.244.2.0/24", "-j", "REJECT"]
    in_node(n1, "iptables", "-w", "-I", *rule[:1], "1", *rule[1:])
    try:
        found = run_doctor(n1)[1]["forward"]
        assert found.status == doctor.FAIL
        assert "`-A FORWARD -d 10.244.2.0/24 -j REJECT" in found.message and "before sknf's jump" in found.message
    finally:
        in_node(n1, "iptables", "-w", "-D", *rule)
    assert run_doctor(n1)[1]["forward"].status == doctor.OK


def nft(node: LabNode, *commands: str) -> None:
    for command in commands:
        in_node(node, "nft", command)


def test_vxlan_port_blocked_by_an_nft_rule(lab: Lab) -> None:
    n1, n2 = lab.state.nodes
    nft(n2, "add table inet skxblock", "add chain inet skxblock in { type filter hook input priority 0; }",
        "add rule inet skxblock in udp dport 4789 drop")
    try:
        rc, found = run_doctor(n2)
        assert rc == 4
        assert found["vxlan-port"].status == doctor.FAIL
        assert "nft chain inet skxblock in drops UDP 4789" in found["vxlan-port"].message
        health = run_doctor(n1)[1]["peer-health"]
        assert health.status == doctor.FAIL
        assert ("n2: its underlay 198.51.100.12 answers but its overlay gateway 10.244.2.1 does not: UDP 4789 is "
                "blocked") in health.message
    finally:
        nft(n2, "delete table inet skxblock")
    assert run_doctor(n2)[1]["vxlan-port"].status == doctor.OK
    assert run_doctor(n1)[1]["peer-health"].status == doctor.OK


def test_peer_health_tells_the_underlay_from_the_overlay(lab: Lab) -> None:
    """Pings to n2's node address filtered (its overlay works): fine, noted. n2's underlay link down: both fail."""
    n1, n2 = lab.state.nodes
    nft(n2, "add table inet skxicmp", "add chain inet skxicmp in { type filter hook input priority 0; }",
        f"add rule inet skxicmp in iifname eth0 ip saddr {n1.underlay_ip} icmp type echo-request drop")
    try:
        health = run_doctor(n1)[1]["peer-health"]
        assert health.status == doctor.OK and "1 ignore pings on the underlay but their overlay works" in health.message
    finally:
        nft(n2, "delete table inet skxicmp")
    in_node(n2, "ip", "link", "set", "eth0", "down")
    try:
        health = run_doctor(n1)[1]["peer-health"]
        assert health.status == doctor.FAIL
        assert "n2 (198.51.100.12) answers on neither path" in health.message
    finally:
        in_node(n2, "ip", "link", "set", "eth0", "up")
        in_node(n2, "ip", "route", "replace", "default", "via", str(UNDERLAY.network_address + 1))  # gone with the link
    eventually(lambda: run_doctor(n1)[1]["peer-health"].status == doctor.OK, what="n2 reachable again")


def test_a_peer_publishing_another_mtu(lab: Lab) -> None:
    n1 = lab.state.nodes[0]
    peers = lab.root / "peers.yaml"
    original = peers.read_text()
    doc = yaml.safe_load(original)
    doc["nodes"][1]["mtu"] = 1400
    peers.write_text(yaml.safe_dump(doc))
    try:
        found = eventually(lambda: (f := run_doctor(n1)[1]["mtu"]).status == doctor.FAIL and f, what="mtu FAIL")
        assert "this node uses MTU 1450; n2 publishes 1400" in found.message
    finally:
        peers.write_text(original)
    eventually(lambda: run_doctor(n1)[1]["mtu"].status == doctor.OK, what="mtu OK")


def test_a_previous_cnis_cni0_with_a_route_and_its_conflist_sorting_first(lab: Lab) -> None:
    n1, n2 = lab.state.nodes
    b = pods_of(lab, n2)[0]
    other = lab.node_dir(n1.name) / "net.d" / "05-flannel.conflist"
    other.write_text(json.dumps({"cniVersion": "1.0.0", "name": "cbr0", "plugins": [{"type": "flannel"}]}))
    with netlink.route(nsutil.netns_path(n1.netns)) as ipr:
        ipr.link("add", ifname="cni0", kind="bridge")
        idx = netlink.link_index(ipr, "cni0")
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst="10.244.2.0/24", oif=idx)
    try:
        rc, found = run_doctor(n1)
        assert rc == 4
        assert found["leftovers"].status == doctor.WARN and "cni0" in found["leftovers"].message
        assert found["routes"].status == doctor.FAIL
        assert "10.244.2.0/24 dev cni0 (table main)" in found["routes"].message
        assert found["cni-config"].status == doctor.FAIL
        assert f"{other} (type flannel) sorts before 10-sknf.conflist" in found["cni-config"].message
        assert not reaches(n1.netns, b.ip)  # the route is real: node->pod across nodes goes into cni0
    finally:
        other.unlink()
        with netlink.route(nsutil.netns_path(n1.netns)) as ipr:
            netlink.delete_link(ipr, "cni0")
    found = run_doctor(n1)[1]
    assert {found[c].status for c in ("leftovers", "routes", "cni-config")} == {doctor.OK}
    assert reaches(n1.netns, b.ip)


def test_a_warning_alone_exits_3(lab: Lab) -> None:
    n1 = lab.state.nodes[0]
    with netlink.route(nsutil.netns_path(n1.netns)) as ipr:
        ipr.link("add", ifname="flannel.1", kind="bridge")  # a name-only leftover: no address, no route
    try:
        rc, found = run_doctor(n1)
        assert found["leftovers"].status == doctor.WARN and "flannel.1" in found["leftovers"].message
        assert rc == 3
    finally:
        with netlink.route(nsutil.netns_path(n1.netns)) as ipr:
            netlink.delete_link(ipr, "flannel.1")
    assert run_doctor(n1)[0] == 0


def test_bpffs_missing_in_a_private_mount_namespace(lab: Lab) -> None:
    n1 = lab.state.nodes[0]
    rc, found = run_doctor(n1, bpffs=False)
    assert rc == 4 and found["bpffs"].status == doctor.FAIL
    assert found["bpffs"].message.startswith("no bpf filesystem mounted at /sys/fs/bpf")
    assert Path("/sys/fs/bpf").is_mount()  # the machine's is untouched
    assert run_doctor(n1)[1]["bpffs"].status == doctor.OK


def test_a_peer_without_its_overlay_device_and_a_node_without_its_agent(lab: Lab) -> None:
    """n2's agent stops and its vxsknf is deleted: n1 says the overlay to n2 fails while n2's underlay
    answers; n2's own doctor (agent down) says so, and what else the stopped agent no longer repairs."""
    n1, n2 = lab.state.nodes
    lab.stop_agent(n2)
    try:
        with netlink.route(nsutil.netns_path(n2.netns)) as ipr:
            netlink.delete_link(ipr, VXLAN)
        in_node(n2, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.brsknf.rp_filter=1")
        in_node(n2, "iptables", "-w", "-t", "nat", "-F", NAT_CHAIN)
        in_node(n2, "iptables", "-w", "-D", INPUT_CHAIN, "-s", f"{n1.underlay_ip}/32", "-p", "udp", "-m", "udp",
                "--dport", "4789", "-m", "comment", "--comment", "sknf", "-j", "RETURN")
        health = run_doctor(n1)[1]["peer-health"]
        assert health.status == doctor.FAIL
        assert "n2: its underlay 198.51.100.12 answers but its overlay gateway 10.244.2.1 does not" in health.message
        rc, found = run_doctor(n2)
        assert rc == 4
        assert found["agent"].status == doctor.FAIL and "no agent socket" in found["agent"].message
        assert "skipped: peer-health" in found["agent"].message and "peer-health" not in found
        assert found["overlay"].status == doctor.FAIL and "vxsknf is missing" in found["overlay"].message
        assert found["sysctls"].status == doctor.FAIL and "strict rp_filter on brsknf" in found["sysctls"].message
        assert found["sknf-rules"].status == doctor.FAIL
        assert "nat/SKNF-POSTROUTING: masquerade" in found["sknf-rules"].message
        assert f"filter/SKNF-INPUT: VXLAN from n1 ({n1.underlay_ip}) is dropped" in found["sknf-rules"].message
        assert found["pod-subnet"].status == doctor.OK  # read from the lease store without the agent
    finally:
        lab.restart_agent(n2)
    eventually(lambda: run_doctor(n2)[0] == 0, what="n2 all OK after the agent's restart")
    assert_all_ok(n1)


def test_an_unloadable_config_is_a_failure_and_the_other_checks_still_run(lab: Lab, tmp_path: Path) -> None:
    n1 = lab.state.nodes[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("node_name: n1\ncluster_cidr: not-a-cidr\n")
    rc, found = run_doctor(n1, config=str(bad))
    assert rc == 4
    assert found["config"].status == doctor.FAIL
    assert "cluster_cidr" in found["config"].message and "skipped: sknf-rules, mtu, routes, overlay" in \
        found["config"].message
    assert {"forward", "vxlan-port", "sysctls", "leftovers", "capacity"} <= set(found)
    assert "mtu" not in found
    assert found["sysctls"].status == doctor.OK


JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJza3gtc2VjcmV0In0.c2t4LXNpZ25hdHVyZQ"


def test_sysdump_has_everything_and_no_secret(lab: Lab, tmp_path: Path) -> None:
    n1 = lab.state.nodes[0]
    pod = pods_of(lab, n1)[0]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"users:\n- name: admin\n  user:\n    token: skx-kubeconfig-secret\n    client-key-data: "
                          f"c2t4LWtleQ==\n# {JWT}\n")
    config = tmp_path / "config.yaml"
    settings = yaml.safe_load(Path(n1.config).read_text()) | {"kubeconfig": str(kubeconfig)}
    config.write_text(f"# token: skx-comment-secret, Authorization: Bearer {JWT}\n" + yaml.safe_dump(settings))
    out = tmp_path / "dump.tar.gz"
    proc = subprocess.run([sys.executable, "-m", "sknf", "sysdump", "-c", str(config), "-o", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO),
                          preexec_fn=nsutil.preexec_enter(n1.netns))
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    import tarfile

    with tarfile.open(out) as tar:
        members = {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode() for m in tar.getmembers()}
    wanted = {
        "net/links.txt": "vxsknf", "net/addresses.txt": n1.gateway_ip, "net/routes.txt": "table 4789",
        "net/neighbours.txt": "", "net/fdb.txt": "dst 198.51.100.12", "net/tc.txt": "sknf_",
        "firewall/iptables-nft.txt": "SKNF-FORWARD", "firewall/nft-ruleset.txt": "table ip filter",
        "bpf/map-endpoints.txt": "key", "sysctls.txt": "net.ipv4.ip_forward = 1",
        "agent/config.txt": "node_name: n1", "agent/leases.json": pod.ip, "agent/metrics.txt": "sknf_build_info",
        "agent/health.json": '"peers"', "agent/stats.json": pod.ip, "agent/log.txt": "ready: serving CNI",
        "doctor.txt": "peer-health",
    }
    found = {name: text in members.get(name, "<missing>") for name, text in wanted.items()}
    assert found == dict.fromkeys(wanted, True)
    everything = "\n".join(members.values())
    for secret in ("skx-kubeconfig-secret", "c2t4LWtleQ==", JWT, "skx-comment-secret"):
        assert secret not in everything
    assert str(kubeconfig) in members["agent/config.txt"]  # named, never read
