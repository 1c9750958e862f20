"""agent.http: the loopback inference API on a real server, a real Agent and a real model."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.http import MAX_BODY, EchoServer, InferenceServer, load_token, predict_via_http
from edgefleet.agent.identity import DeviceIdentity
from edgefleet.agent.runtime import Runtime, load_runtime
from edgefleet.agent.store import InstalledVersion
from edgefleet.agent.trust import TrustStore
from edgefleet.coordinator.home import Coordinator
from edgefleet.models.digits import write_digits_artifacts
from edgefleet.protocol.keys import decode_public_key

from edgefleet import _cli_agent
from edgefleet.cli import main
from tests.conftest import NOW, Fleet

Response = tuple[int, dict[str, str], Any]


@dataclass(frozen=True)
class Homes:
    active: Path  # an agent home with digits 1 installed
    empty: Path  # an enrolled agent home with nothing installed
    x: np.ndarray  # the digits test split, float32 [450, 64]


def _agent_home(home: Path, device_id: str, coord: Coordinator) -> None:
    ident = DeviceIdentity.create(home / "keys", device_id)
    TrustStore.pin(home / "trust", decode_public_key((coord.home / "root.pub").read_bytes()))
    (home / "agent.toml").write_text(AgentConfig(home=home, device_id=device_id).to_toml())
    coord.enroll(ident.public())


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> Homes:
    work = tmp_path_factory.mktemp("http")
    art = write_digits_artifacts(work / "models")
    coord = Coordinator.init(work / "coordinator")
    coord.register_model("digits", art.onnx_path, version="1")
    _agent_home(work / "active", "dev-1", coord)
    _agent_home(work / "empty", "dev-2", coord)
    _, built = coord.build("digits", "1", "dev-1")
    coord.write_bundle(built, work / "digits-1.efb")
    agent = Agent.open(work / "active")
    agent.install_file(work / "digits-1.efb")
    agent.close()
    with np.load(art.test_path) as npz:
        return Homes(work / "active", work / "empty", np.asarray(npz["x"], dtype=np.float32))


@pytest.fixture(scope="module")
def agent(homes: Homes) -> Iterator[Agent]:
    a = Agent.open(homes.active)
    yield a
    a.close()


@pytest.fixture(scope="module")
def server(agent: Agent, homes: Homes) -> Iterator[InferenceServer]:
    with InferenceServer(agent, home=homes.active) as s:
        yield s


def auth(home: Path) -> dict[str, str]:
    return {"Authorization": f"Bearer {load_token(home)}"}


def call(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Response:
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request(method, path, body, headers or {})
        resp = c.getresponse()
        data = resp.read()
        assert resp.getheader("Content-Length") == str(len(data))
        return resp.status, dict(resp.getheaders()), json.loads(data)
    finally:
        if conn is None:
            c.close()


def assert_outputs(doc: dict[str, Any], expected: np.ndarray) -> None:
    np.testing.assert_array_equal(np.asarray(doc["outputs"], dtype=np.float32), expected)


def post_predict(server: InferenceServer, payload: Any, **kw: Any) -> Response:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return call(
        server.port, "POST", "/v1/predict", body, kw.pop("headers", auth(server.home)), **kw
    )


# --- predictions ----------------------------------------------------------------------------


def test_predict_matches_in_process(server: InferenceServer, agent: Agent, homes: Homes) -> None:
    status, _, doc = post_predict(server, {"inputs": homes.x.tolist()})
    assert status == 200
    expected = agent.predict(homes.x)
    got = np.asarray(doc["outputs"], dtype=np.float32)
    np.testing.assert_array_equal(got, expected)  # float32 -> JSON -> float32 is exact
    assert doc["argmax"] == expected.argmax(axis=1).tolist()
    assert doc["model"] == {"name": "digits", "version": "1", "sequence": 1}


def test_single_row_is_a_batch_of_one(server: InferenceServer, agent: Agent, homes: Homes) -> None:
    status, _, doc = post_predict(server, {"inputs": homes.x[0].tolist()})
    assert status == 200
    assert_outputs(doc, agent.predict(homes.x[:1]))


def test_client_matches_in_process(server: InferenceServer, agent: Agent, homes: Homes) -> None:
    got = predict_via_http(homes.active, homes.x[:50])
    assert got is not None and got.dtype == np.float32
    np.testing.assert_array_equal(got, agent.predict(homes.x[:50]))


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer wrong",
        "Basic abc",
        "bearer {token}",
        "Bearer {token}x",
        "Bearer  {token}",
        "Bearer é",
    ],
)
@pytest.mark.parametrize("method,path", [("POST", "/v1/predict"), ("GET", "/v1/status")])
def test_token_required(
    server: InferenceServer, homes: Homes, header: str | None, method: str, path: str
) -> None:
    headers = (
        {} if header is None else {"Authorization": header.format(token=load_token(homes.active))}
    )
    body = json.dumps({"inputs": homes.x[:1].tolist()}).encode() if method == "POST" else None
    status, h, doc = call(server.port, method, path, body, headers)
    assert status == 401 and h["WWW-Authenticate"] == "Bearer"
    assert doc == {"error": "missing or wrong bearer token"}


def test_oversize_body_refused_unread(server: InferenceServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        token = load_token(server.home)
        s.sendall(
            f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode()
        )  # and no body at all
        reply = s.makefile("rb").read()  # to EOF: the server closes the connection
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in head
    assert b"1048576-byte limit" in body


def test_oversize_expect_continue_refused(server: InferenceServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(
            f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode()
        )
        reply = s.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 413 ")


@pytest.mark.parametrize(
    "body,phrase",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\xfa", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b"[[0.0]]", "expected a JSON object"),
        (b'{"rows": [[0.0]]}', "expected a JSON object"),
        (b'{"inputs": [[0.0, 1.0], [0.0]]}', "equal-length rows"),
        (b'{"inputs": [["a", "b"]]}', "equal-length rows"),
        (b'{"inputs": [{"a": 1}]}', "equal-length rows"),
        (b'{"inputs": 3}', "got shape ()"),
        (b'{"inputs": [[[0.0]]]}', "got shape (1, 1, 1)"),
        (json.dumps({"inputs": [[0.0] * 63]}).encode(), "expected input of shape (batch, 64)"),
        (json.dumps({"inputs": [0.0] * 65}).encode(), "expected input of shape (batch, 64)"),
    ],
)
def test_bad_input_is_400(server: InferenceServer, body: bytes, phrase: str) -> None:
    status, _, doc = post_predict(server, body)
    assert status == 400 and phrase in doc["error"], doc


def test_no_active_model_is_503(homes: Homes) -> None:
    with InferenceServer(Agent.open(homes.empty), home=homes.empty) as s:
        status, _, doc = post_predict(s, {"inputs": homes.x[:1].tolist()})
        assert status == 503 and "no model is active" in doc["error"]
        assert call(s.port, "GET", "/healthz")[2] == {"ok": True, "active": False}
        with pytest.raises(RuntimeError, match="no model is active"):
            predict_via_http(homes.empty, homes.x[:1])


def test_unknown_route_and_method(server: InferenceServer) -> None:
    assert call(server.port, "GET", "/v1/nope", headers=auth(server.home))[0] == 404
    assert call(server.port, "GET", "/v1/predict", headers=auth(server.home))[0] == 405


def test_client_raises_value_error_on_400(server: InferenceServer, homes: Homes) -> None:
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, 64\)"):
        predict_via_http(homes.active, np.zeros((2, 10), np.float32))


# --- status, health, connections ------------------------------------------------------------


def test_healthz_needs_no_token(server: InferenceServer) -> None:
    assert call(server.port, "GET", "/healthz")[::2] == (200, {"ok": True, "active": True})


def test_status(server: InferenceServer, agent: Agent) -> None:
    status, _, doc = call(server.port, "GET", "/v1/status", headers=auth(server.home))
    assert status == 200 and doc == agent.status().to_dict()
    assert doc["active"]["name"] == "digits" and doc["device_id"] == "dev-1"


def test_keep_alive(server: InferenceServer, homes: Homes) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        before = server.requests
        assert post_predict(server, {"inputs": homes.x[:2].tolist()}, conn=conn)[0] == 200
        sock = conn.sock
        assert post_predict(server, b"{bad", conn=conn)[0] == 400  # errors keep it open too
        assert call(server.port, "GET", "/healthz", conn=conn)[0] == 200
        assert conn.sock is sock is not None  # http.client reconnects if the server closed
        assert server.requests == before + 3
    finally:
        conn.close()


# --- files, lifecycle -----------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_run_file_and_token(homes: Homes) -> None:
    run = homes.empty / "run" / "http.json"
    s = InferenceServer(Agent.open(homes.empty), home=homes.empty)
    s.start()
    try:
        info = json.loads(run.read_bytes())
        assert (info["port"], info["pid"]) == (s.port, os.getpid()) and s.port != 0
        assert mode(run) == 0o600 and mode(homes.empty / "http.token") == 0o600
        assert s.url == f"http://127.0.0.1:{s.port}"
        token = load_token(homes.empty)
    finally:
        s.stop()
    assert not run.exists()
    s.stop()  # idempotent
    assert load_token(homes.empty) == token  # reused, not remade


def test_token_made_once(tmp_path: Path) -> None:
    token = load_token(tmp_path)
    assert len(token) >= 43 and mode(tmp_path / "http.token") == 0o600
    assert load_token(tmp_path) == token
    assert [p.name for p in tmp_path.iterdir()] == ["http.token"]  # no temporary left behind


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "::1", "example.com", ""])
def test_non_loopback_refused(agent: Agent, homes: Homes, host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        InferenceServer(agent, home=homes.active, host=host)


def test_client_without_server(homes: Homes, tmp_path: Path) -> None:
    assert predict_via_http(tmp_path, homes.x[:1]) is None  # no run file
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "http.json").write_text(json.dumps({"port": port, "pid": os.getpid()}))
    load_token(tmp_path)
    assert predict_via_http(tmp_path, homes.x[:1]) is None  # stale: connection refused
    assert (tmp_path / "run" / "http.json").exists()  # left alone


# --- CLI ------------------------------------------------------------------------------------


def cli_predict(home: Path, row: np.ndarray, capsys: pytest.CaptureFixture[str]) -> Any:
    rc = main(
        ["agent", "predict", "--home", str(home), "--input", json.dumps(row.tolist()), "--json"]
    )
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def test_cli_predict_uses_running_server(
    server: InferenceServer,
    agent: Agent,
    homes: Homes,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_in_process(home: Path) -> None:
        raise AssertionError("the CLI loaded the model in-process")

    monkeypatch.setattr(_cli_agent, "_open", no_in_process)
    before = server.requests
    doc = cli_predict(homes.active, homes.x[3], capsys)
    assert server.requests == before + 1
    assert_outputs(doc, agent.predict(homes.x[3:4]))


def test_cli_predict_falls_back_in_process(
    agent: Agent, homes: Homes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "agent"  # the same device and model, no daemon
    shutil.copytree(homes.active, home, ignore=shutil.ignore_patterns("run"))
    opened: list[Path] = []
    real_open = _cli_agent._open

    def spy(h: Path) -> Any:
        opened.append(h)
        return real_open(h)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_cli_agent, "_open", spy)
        doc = cli_predict(home, homes.x[:4], capsys)
    assert opened == [home]
    assert_outputs(doc, agent.predict(homes.x[:4]))


# --- echo baseline --------------------------------------------------------------------------


def test_echo_server(homes: Homes, tmp_path: Path) -> None:
    body = json.dumps({"inputs": homes.x[:2].tolist()}).encode()
    with EchoServer(home=tmp_path) as s:
        status, _, doc = call(s.port, "POST", "/v1/echo", body, auth(tmp_path))
        assert status == 200 and json.dumps(doc).encode() == body
        assert call(s.port, "POST", "/v1/echo", body)[0] == 401
        assert call(s.port, "GET", "/healthz", headers=auth(tmp_path))[0] == 404
    assert [p.name for p in tmp_path.iterdir()] == ["http.token"]  # no run file: not the API


# --- a swap during a request ----------------------------------------------------------------


class SwapAfterLook(Agent):
    """An agent whose model is swapped right after anyone asks which one is active."""

    pending: tuple[InstalledVersion, Runtime] | None = None

    @property
    def active(self) -> InstalledVersion | None:
        seen = super().active
        if self.pending is not None:
            swap, self.pending = self.pending, None
            self._swap(*swap)
        return seen


def test_predict_is_labelled_with_the_model_that_answered(
    fleet: Fleet, tmp_path: Path, x_test: np.ndarray
) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1", "v2"])
    agent = SwapAfterLook(AgentConfig.load(home), clock=lambda: NOW)
    older = agent.store.kept()[1]
    agent.pending = (older, load_runtime(older.model_path, "onnx"))
    with InferenceServer(agent, home=home) as s:
        status, _, doc = post_predict(s, {"inputs": x_test[:20].tolist()})
    agent.close()
    assert status == 200
    bundle = {"1": "v1", "2": "v2"}[doc["model"]["version"]]
    np.testing.assert_allclose(doc["outputs"], fleet.expected(bundle, x_test[:20]), atol=1e-5)
