"""The agent socket: a real unix socket in a temp dir, fake handlers."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakeagent import agent_replying

from sknf import api, cni


def cni_payload(command: str = "ADD", version: str = "1.0.0", **env: str) -> dict[str, Any]:
    base = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0"}
    return {"op": "cni", "env": {**base, **env}, "config": {"cniVersion": version, "name": "sknf", "type": "sknf"}}


class Fake:
    """Handlers that record what they were given; `fail` makes the cni handler raise it."""

    def __init__(self) -> None:
        self.requests: list[cni.Request] = []
        self.fail: BaseException | None = None

    def cni(self, req: cni.Request) -> dict[str, Any] | None:
        self.requests.append(req)
        if self.fail is not None:
            raise self.fail
        if req.command != "ADD":
            return None
        return cni.build_result(req.cni_version, [{"name": req.ifname}], [{"address": "10.244.1.5/16"}])


@pytest.fixture
def fake() -> Fake:
    return Fake()


@pytest.fixture
def sock(tmp_path: Path, fake: Fake) -> Iterator[Path]:
    path = tmp_path / "run" / "sknf.sock"
    server = api.serve(path, {"cni": fake.cni, "stats": lambda req: {"echo": req}}, peer_uid=os.getuid())
    try:
        yield path
    finally:
        server.shutdown()


def exchange(sock: Path, raw: bytes) -> bytes:
    """One request as raw bytes, the raw reply back (what the plugin sees)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        return s.makefile("rb").read()


def test_reply_is_the_exit_status_then_what_the_plugin_prints(sock: Path, fake: Fake) -> None:
    add = exchange(sock, json.dumps(cni_payload()).encode())
    assert add[:1] == b"0" and add.endswith(b"\n")
    assert json.loads(add[1:]) == cni.build_result("1.0.0", [{"name": "eth0"}], [{"address": "10.244.1.5/16"}])
    assert exchange(sock, json.dumps(cni_payload("DEL")).encode()) == b"0"  # null result: print nothing
    fake.fail = cni.CniError(cni.IPAM_EXHAUSTED, "no free address")
    failed = exchange(sock, json.dumps(cni_payload()).encode())
    assert failed[:1] == b"1" and json.loads(failed[1:]) == {"cniVersion": "1.0.0", "code": 100,
                                                              "msg": "no free address"}


def test_cni_request_reaches_the_handler_parsed(sock: Path, fake: Fake) -> None:
    response = api.request(sock, cni_payload(CNI_ARGS="K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p"))
    assert response == {"ok": True, "result": {
        "cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": [{"address": "10.244.1.5/16"}], "dns": {}}}
    (req,) = fake.requests
    assert isinstance(req, cni.Request) and (req.pod_namespace, req.pod_name) == ("ns", "p")


def test_other_ops_get_the_raw_request(sock: Path) -> None:
    assert api.request(sock, {"op": "stats", "x": 1}) == {"ok": True, "result": {"echo": {"op": "stats", "x": 1}}}


def test_null_result(sock: Path) -> None:
    assert api.request(sock, cni_payload("DEL")) == {"ok": True, "result": None}


@pytest.mark.parametrize("reply", [b"", b"{}", b"2{}", b"0{torn"])
def test_request_refuses_a_malformed_reply(tmp_path: Path, reply: bytes) -> None:
    path = tmp_path / "fake.sock"
    with agent_replying(path, reply), pytest.raises(ValueError):
        api.request(path, {"op": "stats"})


def test_validation_errors_come_back_with_their_code_and_version(sock: Path, fake: Fake) -> None:
    response = api.request(sock, cni_payload(version="9.9.9"))
    assert response["ok"] is False
    assert response["error"]["code"] == cni.INCOMPATIBLE_VERSION
    assert response["error"]["cniVersion"] == "1.1.0"
    response = api.request(sock, cni_payload("ADD", "0.4.0", CNI_IFNAME=""))
    assert response["error"]["code"] == cni.INVALID_ENVIRONMENT
    assert response["error"]["cniVersion"] == "0.4.0"
    assert fake.requests == []


def test_handler_cni_error_passes_through(sock: Path, fake: Fake) -> None:
    fake.fail = cni.CniError(cni.IPAM_EXHAUSTED, "no free address", "253 leased")
    assert api.request(sock, cni_payload(version="0.3.1")) == {"ok": False, "error": {
        "cniVersion": "0.3.1", "code": 100, "msg": "no free address", "details": "253 leased"}}


def test_unexpected_exception_is_an_internal_error_and_logged(sock: Path, fake: Fake,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    fake.fail = KeyError("boom")
    with caplog.at_level(logging.ERROR, logger="sknf.api"):
        response = api.request(sock, cni_payload())
    assert response["error"]["code"] == cni.INTERNAL
    assert "KeyError" in response["error"]["details"]
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)


@pytest.mark.parametrize("raw,code", [
    (b"not json", cni.DECODING_FAILURE),
    (b"[1, 2]", cni.DECODING_FAILURE),
    (b"", cni.DECODING_FAILURE),
    (json.dumps({"op": "nope"}).encode(), cni.UNSUPPORTED_FIELD),
    (json.dumps({"x": 1}).encode(), cni.UNSUPPORTED_FIELD),
    (json.dumps({"op": "cni", "env": ["x"], "config": {}}).encode(), cni.DECODING_FAILURE),
    (json.dumps({"op": "cni", "env": {"CNI_COMMAND": 1}, "config": {}}).encode(), cni.DECODING_FAILURE),
])
def test_malformed_requests_get_an_answer(sock: Path, raw: bytes, code: int) -> None:
    reply = exchange(sock, raw)
    assert reply[:1] == b"1" and json.loads(reply[1:])["code"] == code


def test_oversized_request_is_refused_with_an_answer(sock: Path, fake: Fake) -> None:
    response = api.request(sock, {"op": "stats", "blob": "x" * (api.MAX_REQUEST + 1)})
    assert response["error"]["code"] == cni.IO_FAILURE
    assert "too large" in response["error"]["msg"]
    huge = api.request(sock, {"op": "stats", "blob": "x" * (8 * api.MAX_REQUEST)})  # far past the limit
    assert huge["error"]["code"] == cni.IO_FAILURE
    assert api.request(sock, {"op": "stats"})["ok"] is True  # the server is still fine


def test_wrong_peer_uid_is_refused(tmp_path: Path, fake: Fake) -> None:
    path = tmp_path / "run" / "sknf.sock"
    server = api.serve(path, {"cni": fake.cni}, peer_uid=os.getuid() + 1)
    try:
        response = api.request(path, cni_payload())
    finally:
        server.shutdown()
    assert response["error"]["code"] == cni.FORBIDDEN
    assert fake.requests == []


def test_socket_and_directory_are_private(tmp_path: Path, fake: Fake) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    run.chmod(0o755)
    server = api.serve(run / "sknf.sock", {"cni": fake.cni}, peer_uid=os.getuid())
    try:
        assert stat.S_IMODE((run / "sknf.sock").stat().st_mode) == 0o600
        assert stat.S_ISSOCK((run / "sknf.sock").stat().st_mode)
        assert stat.S_IMODE(run.stat().st_mode) == 0o700
    finally:
        server.shutdown()
    assert not (run / "sknf.sock").exists()


def test_refuses_a_shared_sticky_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(ValueError, match="sticky"):
        api.serve(shared / "sknf.sock", {})


def test_stale_socket_is_replaced_but_a_live_one_is_not_stolen(tmp_path: Path, fake: Fake) -> None:
    path = tmp_path / "run" / "sknf.sock"
    path.parent.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # leaves the socket file with nobody listening, like a killed agent
    server = api.serve(path, {"cni": fake.cni}, peer_uid=os.getuid())
    try:
        with pytest.raises(ValueError, match="another agent"):
            api.serve(path, {"cni": fake.cni}, peer_uid=os.getuid())
        assert api.request(path, cni_payload("DEL"))["ok"] is True
    finally:
        server.shutdown()
    path.write_text("not a socket")
    with pytest.raises(ValueError, match="not a socket"):
        api.serve(path, {})


def test_a_burst_of_connections_is_not_refused(sock: Path) -> None:
    """Plugins connect with a timeout (non-blocking): a full listen backlog fails them at once with EAGAIN."""
    clients = []
    try:
        for _ in range(64):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(client)
            client.settimeout(30)
            client.connect(str(sock))
        for client in clients:
            client.sendall(json.dumps({"op": "stats"}).encode())
            client.shutdown(socket.SHUT_WR)
        assert all(client.makefile("rb").read().startswith(b"0") for client in clients)
    finally:
        for client in clients:
            client.close()


def test_requests_are_served_concurrently(tmp_path: Path) -> None:
    """Two requests meet at a barrier inside the handler: a serial server would break it."""
    barrier = threading.Barrier(2, timeout=30)

    def meet(_req: dict[str, Any]) -> dict[str, Any]:
        return {"slot": barrier.wait()}

    path = tmp_path / "run" / "sknf.sock"
    server = api.serve(path, {"meet": meet}, peer_uid=os.getuid())
    results: list[dict[str, Any]] = []
    try:
        threads = [threading.Thread(target=lambda: results.append(api.request(path, {"op": "meet"})))
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.shutdown()
    assert sorted(r["result"]["slot"] for r in results) == [0, 1]
