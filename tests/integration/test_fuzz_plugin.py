"""Property-based fuzzing of the real plugin talking to a real agent (a 1-node lab, store empty).

Every run must end in exit 0 with nothing or one JSON object on stdout, or exit 1 with a spec error
object; never a traceback. A failed ADD leaves the node exactly as it was (no lease, no host veth,
nothing in the pod namespace); a successful ADD is undone by DEL, after which the same holds. The
near-valid run counts its outcomes and must have reached both: ADDs that succeeded, and ADDs the agent
rolled back (a lease taken, then the veth refused because the pod already holds that interface).

agentSocket and stateDir are confined to the lab's socket or paths in a temp dir: the plugin falls back
to /run/sknf/sknf.sock and /var/lib/sknf when they are missing, and a DEL it cannot deliver is parked
under stateDir; those are the host's real paths, which a test must not touch. Values the plugin must
refuse (present but not a non-empty string: code 7, before it connects or parks) are left as drawn.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cnirig import Outcome, Rig, assert_spec_error, one_node_rig
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from sknf.cni import ALREADY_EXISTS

pytestmark = [pytest.mark.root, pytest.mark.slow]

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)
COMMANDS = st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "add", "", "ADD "]) | TEXT
CONTAINER_IDS = st.sampled_from(["ske-fz-1", "ske-fz-2", "ske_fz.3"]) | TEXT
IFNAMES = st.sampled_from(["eth0", "eth1", "net-a", "lo", "x" * 15, "x" * 16, "a/b", "a:b", "..", "ske%d"]) | TEXT
ARGS = st.sampled_from(["", "K8S_POD_NAMESPACE=fz;K8S_POD_NAME=p", "IgnoreUnknown=1;K8S_POD_NAME=p", "bad", ";=;"]) \
    | TEXT
VERSIONS = st.sampled_from(["0.3.1", "0.4.0", "1.0.0", "1.1.0", "0.2.0", "2.0.0", ""]) | JSON
VERBS = ("ADD", "DEL", "CHECK", "GC", "STATUS")
LOCATIONS = ("agentSocket", "stateDir")


class Fuzz:
    """The rig plus a temp dir standing in for the host paths the plugin would fall back to."""

    def __init__(self, rig: Rig, tmp: Path) -> None:
        self.rig, self.tmp = rig, tmp
        self.real_socket = rig.netconf()["agentSocket"]
        self.state_dir = tmp / "state"
        self.baseline = rig.state()

    def confine(self, config: Any) -> Any:
        if isinstance(config, dict):
            for key, safe in zip(LOCATIONS, (str(self.tmp / "absent.sock"), str(self.state_dir)), strict=True):
                if key not in config or (usable(config[key]) and config[key] != self.real_socket):
                    config[key] = safe
        return config

    def parked(self) -> list[dict]:
        pending = self.state_dir / "pending-del"
        docs = [json.loads(p.read_bytes()) for p in sorted(pending.glob("*.json"))] if pending.exists() else []
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return docs


@pytest.fixture(scope="module")
def fuzz() -> Iterator[Fuzz]:
    tmp = Path(tempfile.mkdtemp(prefix="ske-f-"))
    try:
        with one_node_rig("ske-f", keep_lab_pod=False) as rig:
            yield Fuzz(rig, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def usable(location: Any) -> bool:
    return isinstance(location, str) and location != ""


def not_json(name: str) -> float:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: the plugin refuses them (code 6)


def refused_location(stdin: bytes) -> bool:
    """Whether stdin is a netconf whose agentSocket or stateDir is present but not a non-empty string."""
    try:
        doc = json.loads(stdin.decode(), parse_constant=not_json)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and any(key in doc and not usable(doc[key]) for key in LOCATIONS)


def env_strategy(fuzz: Fuzz) -> st.SearchStrategy[dict[str, str]]:
    netns = st.sampled_from([fuzz.rig.pod_path, "/run/netns/ske-f-absent", "/etc/hostname", ""]) | TEXT
    optional = {"CNI_CONTAINERID": CONTAINER_IDS, "CNI_NETNS": netns, "CNI_IFNAME": IFNAMES, "CNI_ARGS": ARGS,
                "CNI_PATH": st.just(str(fuzz.rig.plugin.parent)) | TEXT}
    return st.fixed_dictionaries({"CNI_COMMAND": COMMANDS}, optional=optional)


def netconf_strategy(fuzz: Fuzz) -> st.SearchStrategy[dict]:
    """Near-valid: the installed netconf with one or two keys dropped or given values of other types."""
    base = fuzz.rig.netconf()
    replaced = {"cniVersion": VERSIONS, "name": st.sampled_from(["sknf", "n.1", "-x", ""]) | JSON,
                "type": st.sampled_from(["sknf", "bridge"]) | JSON, "agentSocket": JSON, "stateDir": JSON,
                "prevResult": JSON,
                "runtimeConfig": JSON, "args": JSON, "cni.dev/valid-attachments": JSON}

    @st.composite
    def mutate(draw: st.DrawFn) -> dict:
        doc = dict(base)
        for key in draw(st.lists(st.sampled_from(sorted(replaced)), max_size=2, unique=True)):
            if draw(st.booleans()):
                doc.pop(key, None)
            else:
                doc[key] = draw(replaced[key])
        return doc

    return mutate()


def stdin_strategy(fuzz: Fuzz) -> st.SearchStrategy[bytes]:
    raw = st.binary(max_size=512)
    shaped = JSON.map(lambda doc: json.dumps(fuzz.confine(doc)).encode())
    near = netconf_strategy(fuzz).map(lambda doc: json.dumps(fuzz.confine(doc)).encode())
    return raw.map(lambda b: _confine_bytes(fuzz, b)) | shaped | near


def _confine_bytes(fuzz: Fuzz, data: bytes) -> bytes:
    """Random bytes that happen to decode to an object get the same confinement as JSON input."""
    try:
        doc = json.loads(data)
    except ValueError:
        return data
    return json.dumps(fuzz.confine(doc)).encode() if isinstance(doc, dict) else data


def assert_well_formed(out: Outcome, command: str) -> Any:
    assert "Traceback" not in out.stdout + out.stderr, out
    assert out.rc in (0, 1), out
    if out.rc == 1:
        return assert_spec_error(out)
    if not out.stdout.strip():
        assert command not in ("ADD", "VERSION"), out  # those must print a result
        return None
    doc = json.loads(out.stdout)
    assert isinstance(doc, dict) and isinstance(doc.get("cniVersion"), str), out
    if command == "VERSION":
        assert "1.0.0" in doc["supportedVersions"], out
    if command == "ADD":
        assert doc["ips"] and doc["interfaces"], out
    return doc


def outcome(command: str, out: Outcome, doc: Any) -> str:
    """What an ADD came to: "added", "rolled back" (failed at the veth, after its lease was taken), or other."""
    if command != "ADD":
        return "other"
    if out.rc == 0:
        return "added"
    if doc["code"] == ALREADY_EXISTS and doc["msg"].startswith("interface "):
        return "rolled back"
    return "other"


def check_one(fuzz: Fuzz, stdin: bytes, env: dict[str, str]) -> str:
    rig = fuzz.rig
    out = rig.run(stdin, env)
    command = env.get("CNI_COMMAND", "")
    doc = assert_well_formed(out, command)
    event(f"{command[:8]!r} exit {out.rc}" + (f" code {doc['code']}" if out.rc else ""))
    if command in VERBS and refused_location(stdin):
        assert (out.rc, doc["code"]) == (1, 7), out
    if command == "ADD" and out.rc == 0:
        assert len(rig.state().leases) == 1  # the one this ADD made
        undo = rig.run(stdin, {**env, "CNI_COMMAND": "DEL"})
        assert (undo.rc, undo.stdout) == (0, ""), undo
    assert rig.state() == fuzz.baseline
    for parked in fuzz.parked():  # only DELs that could not reach the agent may be parked
        assert command == "DEL" and parked["env"]["CNI_COMMAND"] == "DEL", parked
    return outcome(command, out, doc)


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.data())
def test_random_stdin_and_environment(fuzz: Fuzz, data: st.DataObject) -> None:
    check_one(fuzz, data.draw(stdin_strategy(fuzz), "stdin"), data.draw(env_strategy(fuzz), "env"))


def test_near_valid_requests(fuzz: Fuzz) -> None:
    """Mostly well-formed requests, so the agent's deeper paths (netns, veth, IPAM, rollback) are reached.

    Half use the installed netconf as it is. "lo" is an interface every pod namespace holds: an ADD naming it
    is refused at the veth, after its lease was taken. The two explicit examples make sure each run has both
    outcomes to count, however the random draws fall.
    """
    outcomes: Counter[str] = Counter()

    @st.composite
    def requests(draw: st.DrawFn) -> tuple[dict, dict[str, str]]:
        command = draw(st.sampled_from(["ADD", "ADD", "ADD", "DEL", "CHECK", "GC", "STATUS"]), "command")
        cid = draw(st.sampled_from(["ske-fz-1", "ske-fz-2"]) | CONTAINER_IDS, "cid")
        ifname = draw(st.sampled_from(["eth0", "net-a", "lo"]) | IFNAMES, "ifname")
        env = {**fuzz.rig.env(command, cid, ifname), "CNI_ARGS": draw(st.just("K8S_POD_NAME=p") | ARGS, "args")}
        netconf = fuzz.rig.netconf() if draw(st.booleans(), "pristine") else {**draw(netconf_strategy(fuzz))}
        if "cniVersion" in netconf and netconf["cniVersion"] == "1.0.0":
            netconf["cniVersion"] = draw(st.sampled_from(["0.3.1", "0.4.0", "1.0.0", "1.1.0"]), "version")
        return netconf, env

    def add(ifname: str) -> tuple[dict, dict[str, str]]:
        return fuzz.rig.netconf(), {**fuzz.rig.env("ADD", "ske-fz-1", ifname), "CNI_ARGS": "K8S_POD_NAME=p"}

    @FUZZ
    @given(request=requests())
    @example(request=add("eth0"))
    @example(request=add("lo"))
    def run(request: tuple[dict, dict[str, str]]) -> None:
        netconf, env = request
        outcomes[check_one(fuzz, json.dumps(fuzz.confine(dict(netconf))).encode(), env)] += 1

    run()
    assert outcomes["added"] and outcomes["rolled back"], outcomes
