"""agent.http: the loopback inference API on a real server, a real Agent and a real model."""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.http import (
    MAX_BODY,
    EchoServer,
    InferenceServer,
    answer_via_http,
    feedback_via_http,
    load_token,
    predict_via_http,
)
from edgefleet.agent.identity import DeviceIdentity
from edgefleet.agent.runtime import Runtime, load_runtime
from edgefleet.agent.store import InstalledVersion
from edgefleet.agent.trust import TrustStore
from edgefleet.coordinator.home import Coordinator
from edgefleet.models.digits import write_digits_artifacts
from edgefleet.protocol.keys import decode_public_key
from onnx import TensorProto, helper

from edgefleet import _cli_agent
from edgefleet.cli import main
from tests.conftest import NOW, Fleet

Response = tuple[int, dict[str, str], Any]


@dataclass(frozen=True)
class Homes:
    active: Path  # an agent home with digits 1 installed
    empty: Path  # an enrolled agent home with nothing installed
    sqrt: Path  # an agent home serving y = sqrt(x) on float32 [batch, 4]: NaN for x < 0
    x: np.ndarray  # the digits test split, float32 [450, 64]


def _agent_home(home: Path, device_id: str, coord: Coordinator) -> None:
    ident = DeviceIdentity.create(home / "keys", device_id)
    TrustStore.pin(home / "trust", decode_public_key((coord.home / "root.pub").read_bytes()))
    (home / "agent.toml").write_text(AgentConfig(home=home, device_id=device_id).to_toml())
    coord.enroll(ident.public())


def _sqrt_model(path: Path) -> None:
    """A real ONNX model whose output is NaN for negative input, with its metadata sidecar."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Sqrt", ["x"], ["y"])], "sqrt", [x], [y])
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7), path
    )
    spec = {"dtype": "float32", "shape": [None, 4]}
    meta = {
        "inputs": [{"name": "x", **spec}],
        "outputs": [{"name": "y", **spec}],
        "smoke": [
            {"input": [[1.0, 4.0, 9.0, 16.0]], "expected": [[1.0, 2.0, 3.0, 4.0]], "atol": 1e-6}
        ],
    }
    path.with_suffix(".json").write_text(json.dumps(meta))


def _install(coord: Coordinator, model: str, device_id: str, home: Path) -> None:
    _, built = coord.build(model, "1", device_id)
    coord.write_bundle(built, home.parent / f"{model}-1.efb")
    agent = Agent.open(home)
    agent.install_file(home.parent / f"{model}-1.efb")
    agent.close()


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> Homes:
    work = tmp_path_factory.mktemp("http")
    art = write_digits_artifacts(work / "models")
    coord = Coordinator.init(work / "coordinator")
    coord.register_model("digits", art.onnx_path, version="1")
    _sqrt_model(work / "models" / "sqrt.onnx")
    coord.register_model("sqrt", work / "models" / "sqrt.onnx", version="1")
    _agent_home(work / "active", "dev-1", coord)
    _agent_home(work / "empty", "dev-2", coord)
    _agent_home(work / "sqrt", "dev-3", coord)
    _install(coord, "digits", "dev-1", work / "active")
    _install(coord, "sqrt", "dev-3", work / "sqrt")
    with np.load(art.test_path) as npz:
        x = np.asarray(npz["x"], dtype=np.float32)
    return Homes(work / "active", work / "empty", work / "sqrt", x)


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
        return resp.status, dict(resp.getheaders()), strict_json(data)
    finally:
        if conn is None:
            c.close()


def _no_constant(name: str) -> Any:
    raise AssertionError(f"the server sent non-JSON {name}")


def strict_json(data: bytes) -> Any:
    """RFC 8259 JSON only: Python's json.loads would accept NaN and Infinity."""
    doc = json.loads(data, parse_constant=_no_constant)
    if isinstance(doc, dict) and "error" in doc:
        assert "\n" not in doc["error"], doc  # errors are one line
    return doc


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
    assert f"{MAX_BODY}-byte limit".encode() in body
    assert MAX_BODY == 16 * 1024 * 1024


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


def _row(first: str) -> bytes:
    """One digits row as JSON text whose first value is ``first`` (any literal)."""
    return b'{"inputs": [[' + first.encode() + b", 0.0" * 63 + b"]]}"


ZEROS = ", ".join(["0.0"] * 64)


# Item 10: non-finite, out-of-range and non-numeric values; each case its own status and error.
@pytest.mark.parametrize(
    "body,status,phrase",
    [
        (_row("NaN"), 400, "NaN is not a JSON number"),
        (_row("Infinity"), 400, "Infinity is not a JSON number"),
        (_row("-Infinity"), 400, "-Infinity is not a JSON number"),
        (_row("1e39"), 422, "within float32 range"),
        (_row("-1e39"), 422, "within float32 range"),
        (_row("3.5e38"), 422, "within float32 range"),
        (_row("1e400"), 422, "within float32 range"),  # Python's json makes it inf
        (_row("1" + "0" * 400), 422, "within float32 range"),  # beyond float64 too
        (_row("true"), 400, "saw a boolean where a number belongs"),
        (_row("false"), 400, "saw a boolean where a number belongs"),
        (_row("null"), 400, "saw null where a number belongs"),
        (_row('"1.5"'), 400, "saw a string where a number belongs"),
        (f'{{"inputs": [[{ZEROS}]], "inputs": [[{ZEROS}]]}}'.encode(), 400, "duplicate keys"),
        (b'{"inputs": []}', 400, "saw an empty list"),
        (b'{"inputs": [[]]}', 400, "saw an empty list"),
        (f'{{"inputs": [[{ZEROS}], 0.0]}}'.encode(), 400, "saw a list beside numbers (ragged)"),
        (f'{{"inputs": [[{ZEROS}], [0.0]]}}'.encode(), 400, "saw lengths [1, 64] at depth 1"),
        (b'{"inputs": ' + b"[" * 9 + b"0.0" + b"]" * 9 + b"}", 400, "more than 8 dimensions"),
        (f'{{"inputs": [[[{ZEROS}]]]}}'.encode(), 400, "got shape (1, 1, 64)"),
    ],
)
def test_bad_values_are_refused(
    server: InferenceServer, body: bytes, status: int, phrase: str
) -> None:
    got, _, doc = post_predict(server, body)
    assert (got, phrase in doc["error"]) == (status, True), doc


def test_edge_values_are_accepted(server: InferenceServer, agent: Agent) -> None:
    values = [1e-45, -0.0, 16, -3, 2.5e-38] + [0.0] * 59  # subnormal, ints: all float32
    status, _, doc = post_predict(server, {"inputs": [values]})
    assert status == 200
    assert_outputs(doc, agent.predict(np.asarray([values], dtype=np.float32)))


def test_nan_output_is_a_json_500(homes: Homes) -> None:
    with Agent.open(homes.sqrt) as agent, InferenceServer(agent, home=homes.sqrt) as s:
        status, _, doc = post_predict(s, {"inputs": [[1.0, 4.0, 9.0, 16.0]]})
        assert status == 200 and doc["outputs"] == [[1.0, 2.0, 3.0, 4.0]]
        status, _, doc = post_predict(s, {"inputs": [[-1.0, 4.0, 9.0, 16.0]]})
        assert status == 500 and "gave NaN or infinite outputs" in doc["error"], doc
        assert post_predict(s, {"inputs": [1.0, 2.0]})[0] == 400  # its own input spec


def test_client_refuses_non_finite_and_maps_422(server: InferenceServer, homes: Homes) -> None:
    x = homes.x[:1].copy()
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        predict_via_http(homes.active, x)


# The body cap: a large input works through the daemon as it does without it.
def test_large_input_within_the_cap(server: InferenceServer, agent: Agent, homes: Homes) -> None:
    x = np.tile(homes.x, (8, 1))  # 3,600 rows, ~4.6 MB of JSON: over the old 1 MiB cap
    got = predict_via_http(homes.active, x, timeout=30)
    assert got is not None
    np.testing.assert_array_equal(got, agent.predict(x))


def test_body_of_exactly_max_body_is_read(server: InferenceServer, homes: Homes) -> None:
    body = json.dumps({"inputs": homes.x[:1].tolist()}).encode()
    body = body[:-1] + b" " * (MAX_BODY - len(body)) + b"}"  # JSON whitespace up to the cap
    assert len(body) == MAX_BODY
    assert post_predict(server, body)[0] == 200


# Item 11: Content-Length and short bodies, over raw sockets.


def raw_request(port: int, head: str, body: bytes = b"", *, half_close: bool = False) -> Any:
    """Send ``head`` (request line + headers, without the blank line) and ``body`` on a raw
    socket; return the parsed response (status, headers, strict JSON). Waits on the response
    (the socket timeout only bounds a server that never answers)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, strict_json(data)


def _head(server: InferenceServer, *headers: str) -> str:
    lines = [
        "POST /v1/predict HTTP/1.1",
        "Host: x",
        f"Authorization: Bearer {load_token(server.home)}",
    ]
    return "\r\n".join([*lines, *headers])


@pytest.mark.parametrize(
    "headers,status,phrase",
    [
        ((), 411, "Content-Length required"),
        (("Transfer-Encoding: chunked",), 411, "chunked bodies are not supported"),
        (("Content-Length: -1",), 400, "bad Content-Length '-1'"),
        (("Content-Length: abc",), 400, "bad Content-Length 'abc'"),
        (("Content-Length: 1.5",), 400, "bad Content-Length '1.5'"),
        (("Content-Length: \xb3",), 400, "bad Content-Length"),  # superscript 3: isdigit()
        (("Content-Length: 5", "Content-Length: 6"), 400, "conflicting Content-Length"),
        (("Content-Length: 99999999999999999999999",), 413, f"over the {MAX_BODY}-byte limit"),
        (("Content-Length: " + "9" * 5000,), 413, f"over the {MAX_BODY}-byte limit"),
        ((f"Content-Length: {MAX_BODY + 1}",), 413, f"over the {MAX_BODY}-byte limit"),
    ],
)
def test_bad_content_length(
    server: InferenceServer,
    caplog: pytest.LogCaptureFixture,
    headers: tuple[str, ...],
    status: int,
    phrase: str,
) -> None:
    with caplog.at_level(logging.WARNING, logger="edgefleet.agent.http"):
        got, _, doc = raw_request(server.port, _head(server, *headers))
    assert (got, phrase in doc["error"]) == (status, True), doc
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert caplog.records[0].exc_info is None


@pytest.fixture(scope="module")
def quick_server(
    agent: Agent, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InferenceServer]:
    """The API with a short body timeout, so a stalled body is answered promptly (its own
    home for the token and run file: the module's server keeps the real one)."""
    home = tmp_path_factory.mktemp("quick")
    with InferenceServer(agent, home=home, body_timeout=0.5) as s:
        yield s


@pytest.mark.parametrize(
    "half_close,phrase",
    [(False, "no more bytes within 0.5 s"), (True, "the connection closed after 10")],
)
def test_body_shorter_than_content_length(
    quick_server: InferenceServer,
    caplog: pytest.LogCaptureFixture,
    half_close: bool,
    phrase: str,
) -> None:
    head = _head(quick_server, "Content-Length: 100")
    with caplog.at_level(logging.DEBUG, logger="edgefleet.agent.http"):
        status, headers, doc = raw_request(
            quick_server.port, head, b'{"inputs":', half_close=half_close
        )
    assert status == 400 and headers["connection"] == "close"
    assert doc["error"].startswith("body shorter than Content-Length (100 bytes announced, ")
    assert phrase in doc["error"], doc
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelname for r in warnings] == ["WARNING"] and warnings[0].exc_info is None
    assert "body shorter than Content-Length" in warnings[0].getMessage()


def test_a_body_in_pieces_is_read_whole(quick_server: InferenceServer, homes: Homes) -> None:
    body = json.dumps({"inputs": homes.x[:1].tolist()}).encode()
    with socket.create_connection(("127.0.0.1", quick_server.port), timeout=20) as sock:
        sock.sendall(_head(quick_server, f"Content-Length: {len(body)}").encode() + b"\r\n\r\n")
        sock.sendall(body[:100])
        sock.sendall(body[100:])
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 200 and strict_json(resp.read())["argmax"]


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


# --- labels flowing back: POST /v1/feedback -------------------------------------------------


def post_feedback(server: InferenceServer, payload: Any, **kw: Any) -> Response:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = kw.pop("headers", auth(server.home))
    return call(server.port, "POST", "/v1/feedback", body, headers, **kw)


def test_predict_answers_carry_ids_that_feedback_scores_once(
    server: InferenceServer, homes: Homes
) -> None:
    status, _, doc = post_predict(server, {"inputs": homes.x[:5].tolist()})
    assert status == 200 and len(doc["ids"]) == len(set(doc["ids"])) == 5
    before = server.recorder.totals()["digits@1"].get("labelled", 0)
    right, wrong = doc["argmax"][0], (doc["argmax"][1] + 1) % 10
    status, _, ok = post_feedback(server, {"id": doc["ids"][0], "label": right})
    assert (status, ok) == (200, {"id": doc["ids"][0], "label": right, "predicted": right,
                                  "correct": True, "model": "digits@1"})  # fmt: skip
    status, _, bad = post_feedback(server, {"label": wrong, "id": doc["ids"][1]})
    assert status == 200 and bad["correct"] is False and bad["predicted"] == doc["argmax"][1]
    totals = server.recorder.totals()["digits@1"]
    assert totals["labelled"] == before + 2
    status, _, again = post_feedback(server, {"id": doc["ids"][0], "label": right})
    assert status == 409 and "already labelled" in again["error"]
    status, _, gone = post_feedback(server, {"id": "00000000-0", "label": 1})
    assert status == 404 and "unknown prediction id" in gone["error"]
    status, _, far = post_feedback(server, {"id": doc["ids"][2], "label": 10})
    assert status == 422 and "not a class of digits@1 (0..9)" in far["error"]
    assert server.recorder.totals()["digits@1"]["labelled"] == before + 2  # refusals count not


@pytest.mark.parametrize(
    "body,phrase",
    [
        (b"{", "not valid JSON"),
        (b"[1, 2]", "saw a list"),
        (b'"id"', "saw a string"),
        (b'{"id": "x"}', "saw ['id']"),
        (b'{"id": "x", "label": 1, "extra": 2}', "saw ['extra', 'id', 'label']"),
        (b'{"id": 7, "label": 1}', "id: expected a prediction id"),
        (b'{"id": "", "label": 1}', "id: expected a prediction id"),
        (b'{"id": "' + b"a" * 65 + b'", "label": 1}', "id: expected a prediction id"),
        (b'{"id": "x", "label": "1"}', "label: expected a class index"),
        (b'{"id": "x", "label": true}', "label: expected a class index"),
        (b'{"id": "x", "label": 1.0}', "label: expected a class index"),
        (b'{"id": "x", "label": -1}', "label: expected a class index"),
        (b'{"id": "x", "label": NaN}', "NaN is not a JSON number"),
        (b'{"id": "x", "id": "y", "label": 1}', "duplicate keys"),
    ],
)
def test_bad_feedback_is_400_in_one_line(server: InferenceServer, body: bytes, phrase: str) -> None:
    status, _, doc = post_feedback(server, body)
    assert status == 400 and phrase in doc["error"], doc


def test_feedback_is_bounded_and_needs_the_token(server: InferenceServer) -> None:
    big = json.dumps({"id": "x" * 2000, "label": 1}).encode()
    status, headers, doc = post_feedback(server, big)
    assert status == 413 and "1024-byte limit" in doc["error"]
    assert headers.get("Connection") == "close"  # refused unread
    assert post_feedback(server, {"id": "x", "label": 1}, headers={})[0] == 401
    assert call(server.port, "GET", "/v1/feedback", headers=auth(server.home))[0] == 405


def test_client_feedback_maps_each_refusal(server: InferenceServer, homes: Homes,
                                           tmp_path: Path) -> None:  # fmt: skip
    answer = answer_via_http(homes.active, homes.x[:2])
    assert answer is not None
    out, ids = answer
    label = int(out[0].argmax())
    assert feedback_via_http(homes.active, ids[0], label)["correct"] is True  # type: ignore[index]
    with pytest.raises(RuntimeError, match="already labelled"):
        feedback_via_http(homes.active, ids[0], label)
    with pytest.raises(LookupError, match="unknown prediction id"):
        feedback_via_http(homes.active, "nope", 1)
    with pytest.raises(ValueError, match="not a class"):
        feedback_via_http(homes.active, ids[1], 99)
    assert feedback_via_http(tmp_path, ids[1], 1) is None  # no daemon there


def test_cli_predict_prints_ids_and_feedback_takes_them(
    server: InferenceServer, homes: Homes, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = cli_predict(homes.active, homes.x[7], capsys)
    [pid] = doc["ids"]
    label = doc["argmax"][0]
    home = str(homes.active)
    assert main(["agent", "feedback", "--home", home, "--id", pid, "--label", str(label)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"prediction {pid} of digits@1: label {label}, correct"
    assert main(["agent", "feedback", "--home", home, "--id", pid, "--label", "1"]) == 1
    err = capsys.readouterr().err
    assert "already labelled" in err and len(err.strip().splitlines()) == 1
    assert main(["agent", "predict", "--home", home, "--input", json.dumps(homes.x[8].tolist())
                 ]) == 0  # fmt: skip
    cls, _, pid2 = capsys.readouterr().out.strip().split("\t")
    wrong = str((int(cls) + 1) % 10)
    assert main(["agent", "feedback", "--home", home, "--id", pid2, "--label", wrong,
                 "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["correct"] is False
    for argv, phrase in [
        (["--id", "nope", "--label", "1"], "unknown prediction id"),
        (["--id", pid2, "--label", "-1"], "label: expected a class index"),
    ]:
        assert main(["agent", "feedback", "--home", home, *argv]) == 1
        err = capsys.readouterr().err
        assert phrase in err and len(err.strip().splitlines()) == 1, err


def test_cli_feedback_without_a_daemon_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["agent", "feedback", "--home", str(tmp_path), "--id", "a-1", "--label", "1"]) == 1
    err = capsys.readouterr().err
    assert "no running agent serves" in err and len(err.strip().splitlines()) == 1


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
