"""The real `cni/sknf` executable, run as a runtime runs it: copied alone, bare environment, stdin.

The agent is faked with sknf.api serving a recording handler in a temp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakeagent import agent_replying

from sknf import api, cni

REPO = Path(__file__).resolve().parents[2]
BARE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # what runtimes pass


class Agent:
    """Recording fake: ADD returns a result in the request's version, `fail` makes it raise."""

    def __init__(self) -> None:
        self.requests: list[cni.Request] = []
        self.fail: cni.CniError | None = None

    def cni(self, req: cni.Request) -> dict[str, Any] | None:
        self.requests.append(req)
        if self.fail:
            raise self.fail
        if req.command != "ADD":
            return None
        return cni.build_result(req.cni_version, [{"name": req.ifname, "sandbox": req.netns}],
                                [{"address": "10.244.1.5/16", "gateway": "10.244.1.1", "interface": 0}])


class Plugin:
    def __init__(self, tmp: Path) -> None:
        self.bin = tmp / "opt-cni-bin" / "sknf"
        self.bin.parent.mkdir()
        shutil.copy2(REPO / "cni" / "sknf", self.bin)  # alone: no sknf package next to it
        self.socket = tmp / "run" / "sknf.sock"
        self.state = tmp / "state"
        self.cwd = tmp

    def conf(self, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
        return {"cniVersion": version, "name": "sknf", "type": "sknf", "agentSocket": str(self.socket),
                "stateDir": str(self.state), **extra}

    def run(self, command: str | None, stdin: bytes | dict | None = None, **env: str) -> tuple[int, Any, str]:
        """Exec the plugin; return (exit code, decoded stdout or None, stderr)."""
        full = {"PATH": BARE_PATH, "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/run/netns/pod",
                "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin", **env}
        if command is not None:
            full["CNI_COMMAND"] = command
        data = stdin if isinstance(stdin, bytes) else json.dumps(self.conf() if stdin is None else stdin).encode()
        proc = subprocess.run([str(self.bin)], input=data, env=full, capture_output=True, cwd=self.cwd,
                              timeout=120, check=False)
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
        return proc.returncode, out, proc.stderr.decode()


@pytest.fixture
def plugin(tmp_path: Path) -> Plugin:
    return Plugin(tmp_path)


@pytest.fixture
def agent(plugin: Plugin) -> Iterator[Agent]:
    fake = Agent()
    server = api.serve(plugin.socket, {"cni": fake.cni}, peer_uid=os.getuid())
    try:
        yield fake
    finally:
        server.shutdown()


def test_plugin_is_executable_and_stdlib_only() -> None:
    source = (REPO / "cni" / "sknf").read_text()
    assert source.startswith("#!/usr/bin/python3 -S\n")
    assert os.access(REPO / "cni" / "sknf", os.X_OK)
    assert "sknf." not in "".join(line for line in source.splitlines() if line.startswith(("import", "from")))


def imported(argv: list[str], **run: Any) -> set[str]:
    proc = subprocess.run(["/usr/bin/python3", "-S", "-X", "importtime", *argv], capture_output=True, check=False,
                          **run)
    return {line.split("|")[-1].strip() for line in proc.stderr.decode().splitlines() if line.startswith("import")}


def test_plugin_imports_only_c_modules_beyond_start_up(plugin: Plugin, agent: Agent) -> None:
    """Start-up is on every pod's path: `import json, socket` alone would cost more than the interpreter."""
    env = {"PATH": BARE_PATH, "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/run/netns/pod",
           "CNI_IFNAME": "eth0"}
    extra = imported([str(plugin.bin)], input=json.dumps(plugin.conf()).encode(), env=env) - imported(["-c", "pass"])
    assert extra == {"_json", "_socket"}
    assert [r.command for r in agent.requests] == ["ADD"]  # the whole path ran, up to the agent's reply


@pytest.mark.parametrize("version", cni.SUPPORTED_VERSIONS)
def test_version_is_answered_without_the_agent(plugin: Plugin, version: str) -> None:
    assert plugin.run("VERSION", {"cniVersion": version}) == (0, cni.version_result(version), "")


def test_version_with_empty_stdin(plugin: Plugin) -> None:
    assert plugin.run("VERSION", b"")[:2] == (0, cni.version_result())


def test_add_round_trip(plugin: Plugin, agent: Agent) -> None:
    args = "K8S_POD_NAMESPACE=web;K8S_POD_NAME=front-0"
    code, out, _ = plugin.run("ADD", plugin.conf("0.4.0"), CNI_ARGS=args)
    assert code == 0
    assert out == {"cniVersion": "0.4.0", "interfaces": [{"name": "eth0", "sandbox": "/run/netns/pod"}],
                   "ips": [{"version": "4", "address": "10.244.1.5/16", "gateway": "10.244.1.1", "interface": 0}],
                   "dns": {}}
    (req,) = agent.requests
    assert (req.command, req.container_id, req.netns, req.ifname) == ("ADD", "c0ffee", "/run/netns/pod", "eth0")
    assert (req.pod_namespace, req.pod_name) == ("web", "front-0")


@pytest.mark.parametrize("command,version", [("DEL", "1.0.0"), ("CHECK", "1.0.0"), ("STATUS", "1.1.0")])
def test_verbs_without_result_print_nothing(plugin: Plugin, agent: Agent, command: str, version: str) -> None:
    assert plugin.run(command, plugin.conf(version, prevResult={"cniVersion": version}))[:2] == (0, None)
    assert [r.command for r in agent.requests] == [command]


def test_gc_forwards_the_keep_list(plugin: Plugin, agent: Agent) -> None:
    keep = [{"containerID": "c0ffee", "ifname": "eth0"}]
    assert plugin.run("GC", plugin.conf("1.1.0", **{"cni.dev/valid-attachments": keep}))[:2] == (0, None)
    assert agent.requests[0].valid_attachments == {("c0ffee", "eth0")}


def test_agent_error_is_printed_with_exit_1(plugin: Plugin, agent: Agent) -> None:
    agent.fail = cni.CniError(cni.IPAM_EXHAUSTED, "no free address", "253 leased")
    assert plugin.run("ADD", plugin.conf("0.3.1"))[:2] == (1, {
        "cniVersion": "0.3.1", "code": 100, "msg": "no free address", "details": "253 leased"})


@pytest.mark.parametrize("stdin", [
    b"{not json", b"", b"  \n", b"[1, 2]", b'"text"', b'{"cniVersion": "1.0.0"} x', b'{"a": 1}{"b": 2}',
    b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": "\x01"}', b'{"a": 1,}', b'{"a": "\xff"}', b"\xef\xbb\xbf{}",
    b"[" * 100_000,
])
def test_malformed_json_is_code_6(plugin: Plugin, agent: Agent, stdin: bytes) -> None:
    code, out, err = plugin.run("ADD", stdin)
    assert (code, out["code"], out["cniVersion"], err) == (1, cni.DECODING_FAILURE, "1.1.0", "")
    assert out["details"]
    assert agent.requests == []


def test_whitespace_around_the_netconf_is_fine(plugin: Plugin, agent: Agent) -> None:
    assert plugin.run("DEL", b" \n\t" + json.dumps(plugin.conf()).encode() + b"\r\n ")[:2] == (0, None)
    assert [r.command for r in agent.requests] == ["DEL"]


def test_the_netconf_reaches_the_agent_as_the_runtime_wrote_it(plugin: Plugin, agent: Agent) -> None:
    conf = plugin.conf(args={"x": "\u00e9\U0001f600\\\"", "n": 12345678901234567890, "f": 0.1})
    raw = json.dumps(conf, ensure_ascii=False, indent=2).encode()  # UTF-8, not \\u escapes
    assert plugin.run("DEL", raw, CNI_ARGS="K8S_POD_NAME=\u00e9")[:2] == (0, None)
    (req,) = agent.requests
    assert (req.config, req.pod_name) == (conf, "\u00e9")


@pytest.mark.parametrize("key", ["agentSocket", "stateDir"])
@pytest.mark.parametrize("value", ["", None, False, 0, 5, [], ["/run/x"], {}])
@pytest.mark.parametrize("command", ["ADD", "DEL"])
def test_location_that_is_not_a_non_empty_string_is_code_7(plugin: Plugin, agent: Agent, key: str, value: Any,
                                                           command: str) -> None:
    code, out, _ = plugin.run(command, plugin.conf("0.4.0", **{key: value}))
    assert (code, out["code"], out["cniVersion"]) == (1, cni.INVALID_CONFIG, "0.4.0")
    assert key in out["msg"]
    assert agent.requests == []
    assert set(plugin.cwd.iterdir()) == {plugin.bin.parent, plugin.socket.parent}  # nothing parked anywhere


def test_missing_locations_mean_the_defaults(plugin: Plugin) -> None:
    """STATUS (harmless even if a real agent serves the default socket) goes to /run/sknf/sknf.sock: only an
    agent there can answer it, and an unreachable one is named in the error."""
    conf = {k: v for k, v in plugin.conf("1.1.0").items() if k not in ("agentSocket", "stateDir")}
    code, out, _ = plugin.run("STATUS", conf)
    if code != 0:
        assert out["code"] == cni.NOT_AVAILABLE, out
        assert out["details"].startswith("/run/sknf/sknf.sock: "), out


@pytest.mark.parametrize("command", [None, "", "FROB"])
def test_missing_or_unknown_command_is_code_4(plugin: Plugin, command: str | None) -> None:
    code, out, _ = plugin.run(command)
    assert (code, out["code"]) == (1, cni.INVALID_ENVIRONMENT)


def test_missing_cni_variable_is_code_4(plugin: Plugin, agent: Agent) -> None:
    code, out, _ = plugin.run("ADD", CNI_NETNS="")
    assert (code, out["code"]) == (1, cni.INVALID_ENVIRONMENT)
    assert "CNI_NETNS" in out["msg"]


def test_unsupported_version_is_code_1(plugin: Plugin, agent: Agent) -> None:
    code, out, _ = plugin.run("ADD", plugin.conf("0.2.0"))
    assert (code, out["code"]) == (1, cni.INCOMPATIBLE_VERSION)


def test_huge_input_is_refused(plugin: Plugin, agent: Agent) -> None:
    code, out, _ = plugin.run("ADD", plugin.conf(pad="x" * (2 << 20)))
    assert (code, out["code"]) == (1, cni.IO_FAILURE)
    assert agent.requests == []


@pytest.mark.parametrize("command,version,want", [
    ("ADD", "1.0.0", cni.TRY_AGAIN_LATER), ("CHECK", "1.0.0", cni.TRY_AGAIN_LATER),
    ("GC", "1.1.0", cni.TRY_AGAIN_LATER), ("STATUS", "1.1.0", cni.NOT_AVAILABLE),
])
def test_agent_down(plugin: Plugin, command: str, version: str, want: int) -> None:
    code, out, _ = plugin.run(command, plugin.conf(version))
    assert (code, out["code"], out["cniVersion"]) == (1, want, version)
    assert not (plugin.state / cni.PENDING_DEL_DIR).exists()


def test_del_with_agent_down_is_parked_and_replayable(plugin: Plugin) -> None:
    conf = plugin.conf(prevResult={"cniVersion": "1.0.0"})
    code, out, err = plugin.run("DEL", conf, CNI_ARGS="K8S_POD_NAME=p")
    assert (code, out) == (0, None)
    assert "parked" in err
    (record,) = cni.drain_pending_dels(plugin.state)
    assert record["config"] == conf
    req = cni.parse_request(record["env"], record["config"])  # what the agent does at start
    assert (req.command, req.container_id, req.ifname, req.pod_name) == ("DEL", "c0ffee", "eth0", "p")
    assert list((plugin.state / cni.PENDING_DEL_DIR).iterdir()) == []


def test_del_that_cannot_be_parked_fails(plugin: Plugin, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    code, out, _ = plugin.run("DEL", plugin.conf() | {"stateDir": str(tmp_path / "file")})
    assert (code, out["code"]) == (1, cni.IO_FAILURE)


@pytest.mark.parametrize("reply", [b"", b'{"ok": true}', b"2"])
def test_agent_that_hangs_up_or_answers_garbage(plugin: Plugin, reply: bytes) -> None:
    plugin.socket.parent.mkdir(mode=0o700)
    with agent_replying(plugin.socket, reply):
        code, out, _ = plugin.run("ADD")
    assert (code, out["code"]) == (1, cni.TRY_AGAIN_LATER)
