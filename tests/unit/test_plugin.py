"""The real plugin binary (`sknf/cni_plugin`, built from cni/sknf.c), run as a runtime runs it: copied
alone, bare environment, stdin. Every test runs twice: the static binary the agent installs, and the
same source built with ASan + UBSan (a dynamic glibc build; any report fails the run).

The agent is faked with sknf.api serving a recording handler in a temp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from fakeagent import agent_replying
from hypothesis import given, settings
from hypothesis import strategies as st

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
    def __init__(self, tmp: Path, binary: Path) -> None:
        self.bin = tmp / "opt-cni-bin" / "sknf"
        self.bin.parent.mkdir()
        shutil.copy2(binary, self.bin)  # alone: nothing of sknf next to it
        self.socket = tmp / "run" / "sknf.sock"
        self.state = tmp / "state"
        self.cwd = tmp
        self.sanitized = binary != STATIC

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
        proc = self.exec(data, full)
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
        return proc.returncode, out, proc.stderr.decode()

    def exec(self, stdin: bytes, env: Mapping[str | bytes, str | bytes]) -> subprocess.CompletedProcess[bytes]:
        """One exec; under the sanitizers a report fails the test whatever the plugin printed."""
        if self.sanitized:
            env = {**env, **SANITIZER_ENV}
        proc = subprocess.run([str(self.bin)], input=stdin, env=env, capture_output=True, cwd=self.cwd,
                              timeout=120, check=False)
        assert proc.returncode != SANITIZER_EXIT and b"Sanitizer" not in proc.stderr \
            and b"runtime error" not in proc.stderr, proc.stderr.decode(errors="replace")
        return proc


STATIC = REPO / "sknf" / "cni_plugin"
SANITIZER_EXIT = 99
# Leak checking is off: the plugin is a one-shot process whose buffers the exit frees.
SANITIZER_ENV = {"ASAN_OPTIONS": f"exitcode={SANITIZER_EXIT}:detect_leaks=0:abort_on_error=0",
                 "UBSAN_OPTIONS": f"halt_on_error=1:print_stacktrace=1:exitcode={SANITIZER_EXIT}"}


@pytest.fixture(scope="session")
def sanitized_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("asan") / "sknf"
    subprocess.run(["make", "-s", "-C", str(REPO / "cni"), "asan", f"OUT={out}"], check=True, capture_output=True)
    return out


@pytest.fixture(params=["static", "sanitized"])
def binary(request: pytest.FixtureRequest) -> Path:
    return STATIC if request.param == "static" else request.getfixturevalue("sanitized_build")


@pytest.fixture
def plugin(tmp_path: Path, binary: Path) -> Plugin:
    return Plugin(tmp_path, binary)


@pytest.fixture
def agent(plugin: Plugin) -> Iterator[Agent]:
    fake = Agent()
    server = api.serve(plugin.socket, {"cni": fake.cni}, peer_uid=os.getuid())
    try:
        yield fake
    finally:
        server.shutdown()


def test_plugin_is_a_static_executable() -> None:
    """No program interpreter and no dynamic section: it runs on a host with no libc, no Python."""
    elf = STATIC.read_bytes()
    assert elf[:4] == b"\x7fELF" and elf[4] == 2  # ELF64
    assert os.access(STATIC, os.X_OK)
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    types = {struct.unpack_from("<I", elf, phoff + i * phentsize)[0] for i in range(phnum)}
    assert not types & {2, 3}  # PT_DYNAMIC, PT_INTERP
    assert len(elf) < 200_000


def test_plugin_runs_with_an_empty_environment(plugin: Plugin) -> None:
    proc = plugin.exec(b"", {})
    assert (proc.returncode, json.loads(proc.stdout)["code"]) == (1, cni.INVALID_ENVIRONMENT)


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


# -- property tests: the plugin's JSON checks against Python's json, and the sanitizers on random input ----

FRAGMENTS = [b"{", b"}", b"[", b"]", b",", b":", b" ", b"\t", b"\n", b'"a"', b'"cniVersion"', b'"agentSocket"',
             b'"stateDir"', b'"1.0.0"', b'"0.4.0"', b'"9"', b'""', b'"\\u0031.1.0"', b"1", b"-", b"0", b".5", b"e",
             b"E+", b"01", b"-0.0e-0", b"true", b"false", b"null", b"nul", b"NaN", b"Infinity", b'"\\u00e9"',
             b'"\\ud800"', b'"\\ud83d\\ude00"', b'"\\x"', b'"\\u12"', b'"\xc3\xa9"', b'"\xed\xa0\x80"',
             b'"\xf4\x90\x80\x80"', b'"\xe0\x80\xaf"', b'"\x01"', b'"\x7f"', b"\xef\xbb\xbf", b'"\\"', b'"\\/"']
ALMOST_JSON = st.lists(st.sampled_from(FRAGMENTS), max_size=14).map(b"".join)
LEAVES = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(["cniVersion", "agentSocket", "stateDir", "x"]) | st.text(
                          max_size=4), inner, max_size=4), max_leaves=10)
SERIALIZED = st.tuples(VALUES, st.booleans(), st.sampled_from([None, 0, 2])).map(
    lambda t: json.dumps(t[0], ensure_ascii=t[1], indent=t[2]).encode())


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """Valid JSON with one byte dropped, doubled or replaced, or a fragment inserted: the validator's edges."""
    text = draw(SERIALIZED)
    i = draw(st.integers(0, len(text)))
    return draw(st.sampled_from([text[:i] + text[i + 1:], text[:i + 1] + text[i:],
                                 text[:i] + bytes([draw(st.integers(0, 255))]) + text[i + 1:],
                                 text[:i] + draw(st.sampled_from(FRAGMENTS)) + text[i:]]))


# Near-JSON built from lexemes, valid and not, in a valid structure: where a strict validator's bugs hide.
LEXEMES = [b"0", b"-0", b"01", b"-", b"1.", b".5", b"1e", b"1e+", b"1E-2", b"2.5e3", b"-01.0", b"1.0e+1000", b"NaN",
           b"-Infinity", b"true", b"tru", b"null", b"nulll", b"false", b'"ok"', b'"\\u00e9"', b'"\\ud800"',
           b'"\\uDFFF"', b'"\\u12g4"', b'"\\x"', b'"\xc3\xa9"', b'"\xc3"', b'"\xed\xa0\x80"', b'"\xf4\x90\x80\x80"',
           b'"\xe0\x80\xaf"', b'"\xc0\xaf"', b'"\x01"', b'"\x7f"', b'"\t"', b'"', b'"\\"', b'"1.0.0"', b'"0.4.0"',
           b'""', b"[]", b"{}", b"[,]", b"{,}"]
KEYS = [b'"cniVersion"', b'"agentSocket"', b'"stateDir"', b'"a"', b'"\\u0063niVersion"', b"a", b"1", b'"\xff"']
COMMA = st.sampled_from([b","] * 6 + [b", ", b" ,\n", b"", b",,"])
COLON = st.sampled_from([b":"] * 6 + [b" : ", b"", b"::"])
TREE = st.recursive(
    st.sampled_from(LEXEMES),
    lambda inner: st.tuples(st.lists(inner, max_size=3), COMMA).map(lambda t: b"[" + t[1].join(t[0]) + b"]")
    | st.tuples(st.lists(st.tuples(st.sampled_from(KEYS), COLON, inner).map(b"".join), max_size=4), COMMA).map(
        lambda t: b"{" + t[1].join(t[0]) + b"}"),
    max_leaves=8)
STDIN = TREE | ALMOST_JSON | SERIALIZED | mutated() | st.binary(max_size=64)


def python_reading(raw: bytes) -> tuple[bool, Any]:
    """(well-formed, value) as json.loads sees it with NaN/Infinity refused: the plugin's rule."""
    try:
        return True, json.loads(raw.decode(), parse_constant=lambda name: not_json(name))
    except (ValueError, RecursionError):
        return False, None


def not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


@pytest.fixture(scope="module")
def static_plugin(tmp_path_factory: pytest.TempPathFactory) -> Plugin:
    return Plugin(tmp_path_factory.mktemp("static"), STATIC)


@settings(max_examples=600, deadline=None)
@given(raw=STDIN)
def test_json_checks_agree_with_python(static_plugin: Plugin, raw: bytes) -> None:
    """VERSION echoes the netconf's cniVersion exactly when Python reads an object with a string there;
    ADD refuses with code 6 exactly what Python cannot read or what is not an object, code 7 a location
    that is present but not a non-empty string. Only inputs that never reach an agent are sent as ADD."""
    plugin = static_plugin
    ok, doc = python_reading(raw)
    asked = doc.get("cniVersion") if isinstance(doc, dict) else None
    code, out, _ = plugin.run("VERSION", raw)
    assert (code, out["cniVersion"]) == (0, asked if isinstance(asked, str) else cni.LATEST)
    if isinstance(doc, dict) and all(key not in doc or usable(doc[key]) for key in ("agentSocket", "stateDir")):
        return  # it would be sent to the agent (the host's default socket when the key is missing)
    code, out, _ = plugin.run("ADD", raw)
    want = cni.INVALID_CONFIG if isinstance(doc, dict) else cni.DECODING_FAILURE
    assert (code, out["code"]) == (1, want), (ok, doc)
    assert out["cniVersion"] == (asked if asked in cni.SUPPORTED_VERSIONS else cni.LATEST)


def usable(location: Any) -> bool:
    return isinstance(location, str) and location != ""


ENV_VALUES = st.binary(min_size=0, max_size=24).filter(lambda b: b"\0" not in b)
ENVS = st.fixed_dictionaries(
    {b"CNI_COMMAND": st.sampled_from([b"ADD", b"DEL", b"CHECK", b"GC", b"STATUS", b"VERSION", b""]) | ENV_VALUES},
    optional={key: ENV_VALUES for key in (b"CNI_CONTAINERID", b"CNI_NETNS", b"CNI_IFNAME", b"CNI_ARGS", b"CNI_PATH")})


@settings(max_examples=200, deadline=None)
@given(raw=STDIN, env=ENVS, up=st.booleans())
def test_random_input_under_the_sanitizers(sanitized_build: Path, tmp_path_factory: pytest.TempPathFactory,
                                           raw: bytes, env: dict[bytes, bytes], up: bool) -> None:
    """Random stdin and environment (any bytes, not only UTF-8) against the fake agent, or with the agent
    down (DELs parked): the sanitized build never reports, always exits 0 or 1 with JSON or nothing on
    stdout, and the agent receives only requests its own decoder reads (the plugin's encoding is sound)."""
    tmp = tmp_path_factory.mktemp("fz")
    plugin = Plugin(tmp, sanitized_build)
    _, doc = python_reading(raw)
    if isinstance(doc, dict):  # confined: never the host's default socket or state directory
        doc.update({key: value for key, value in (("agentSocket", str(plugin.socket)), ("stateDir", str(plugin.state)))
                    if key not in doc or usable(doc[key])})
        raw = json.dumps(doc).encode()
    fake = Agent()
    server = api.serve(plugin.socket, {"cni": fake.cni}, peer_uid=os.getuid()) if up else None
    try:
        proc = plugin.exec(raw, {b"PATH": BARE_PATH.encode(), **env})
    finally:
        if server:
            server.shutdown()
    assert proc.returncode in (0, 1), proc
    if proc.stdout.strip():
        assert isinstance(json.loads(proc.stdout), dict)
    parked = cni.drain_pending_dels(plugin.state)  # what the agent would replay: readable, and only DELs
    assert all(record["env"]["CNI_COMMAND"] == "DEL" for record in parked)
    if parked:
        assert not up and env[b"CNI_COMMAND"] == b"DEL"
        (record,) = parked
        assert record["env"]["CNI_ARGS"] == env.get(b"CNI_ARGS", b"").decode("utf-8", "surrogateescape")
