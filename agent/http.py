"""The agent's local inference API: HTTP/1.1 on loopback, a bearer token, standard library only.

    POST /v1/predict   {"inputs": [[64 floats], ...]} (or one row)
                       -> {"outputs": [[...]], "argmax": [...], "ids": [one per row],
                           "model": {name, version, sequence}}
    POST /v1/feedback  {"id": "<an id from /v1/predict>", "label": <the true class>}
                       -> {"id", "label", "predicted", "correct", "model": "name@version"}:
                          scored once, counted in the ``inference`` telemetry of the model that
                          answered (``labelled``/``correct``, ``agent/observe.py``), which the
                          rollout gate ``accuracy>…`` reads; ids of the last ``REMEMBER`` rows
                          of this agent run only
    POST /v1/explain   {"inputs": [64 floats], "target"?, "method"?, "permutations"?, "seed"?,
                        "background"?: [[...], ...]}  (at most MAX_EXPLAIN_BODY bytes)
                       -> Shapley values of the active model's output ``target`` (default: the
                          predicted class) for that one row: ``agent/explain.py``
    GET  /v1/status    -> Agent.status()
    GET  /healthz      -> {"ok": true, "active": bool}        (the only route without the token)
    GET  /metrics      -> Prometheus text format: the predict recorder's counters and histogram
                          (``agent/observe.py``); scrape with the token as a bearer credential

Every other route needs ``Authorization: Bearer <token>``, the token being ``<home>/http.token``
(0600). While serving, ``<home>/run/http.json`` names the port and pid, so ``predict_via_http``
(the CLI) can find the running daemon.

Request bodies are read only with a valid ``Content-Length`` of at most ``MAX_BODY`` bytes
(16 MiB, about 1.6 million float32 values as JSON; a larger body gets 413 before it is read,
the limit named in the message): callers with more input batch it (a body at the limit made of
one-digit numbers, the worst case, costs ~110 MB while parsed). Each read of the body may
wait ``BODY_TIMEOUT`` seconds for more bytes; a body shorter than its ``Content-Length`` gets
400 and the connection is closed. ``parse_inputs`` (pure, also what the fuzzer drives) accepts
``inputs`` only as a rectangular nested list of JSON numbers, each finite and within float32
range, whose shape is the active model's input spec (``None`` = any size), with or without
the batch dimension. Every answer is strict JSON (no ``NaN``); errors are one line,
``{"error": "..."}``, with

    400  malformed: not JSON, NaN/Infinity literals, duplicate keys, booleans, strings, ragged or
         wrongly shaped inputs, a bad Content-Length, a body shorter than its Content-Length
    401  missing or wrong token          404/405  no such route / method
    404  /v1/feedback: an id this run did not issue, or one too old to remember
    409  /v1/feedback: the prediction is already labelled
    411  no Content-Length (or chunked)  413  body over MAX_BODY
    422  well-formed numbers that float32 cannot hold (1e39, 1e400, 10**400); a label that is
         not one of the model's classes
    500  the model answered with NaN or Infinity (not representable in JSON), or a bug
    503  no model is active
"""

from __future__ import annotations

import contextlib
import hmac
import http.client
import ipaddress
import json
import logging
import math
import os
import secrets
import socket
import socketserver
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import numpy as np
from edgefleet.infra.fsutil import atomic_write
from edgefleet.protocol.errors import TransportError
from edgefleet.protocol.manifest import TensorSpec

if TYPE_CHECKING:
    from .agent import Agent
    from .observe import Recorder

__all__ = [
    "BODY_TIMEOUT",
    "MAX_BODY",
    "MAX_FEEDBACK_BODY",
    "EchoServer",
    "HttpError",
    "InferenceServer",
    "answer_via_http",
    "content_length",
    "feedback_via_http",
    "load_token",
    "parse_feedback",
    "parse_inputs",
    "predict_via_http",
]

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024 * 1024  # bytes; larger request bodies get 413 unread
MAX_EXPLAIN_BODY = 1024 * 1024  # bytes of a /v1/explain body (one row and a small background)
MAX_FEEDBACK_BODY = 1024  # bytes of a /v1/feedback body (one id and one label)
BODY_TIMEOUT = 5.0  # seconds one read of a request body may wait for more bytes
MAX_RANK = 8  # dimensions of ``inputs``
FLOAT32_MAX = float(np.finfo(np.float32).max)
IDLE_TIMEOUT = 30.0  # seconds a keep-alive connection may sit idle
POLL_INTERVAL = 0.1  # seconds; how long stop() may wait for the accept loop
TOKEN_FILE = "http.token"
RUN_FILE = Path("run") / "http.json"


def load_token(home: Path) -> str:
    """The API token in ``<home>/http.token``, made (0600, 256 bits) on first use."""
    path = home / TOKEN_FILE
    with contextlib.suppress(FileNotFoundError):
        return _read_token(path)
    tmp = path.with_name(f".{TOKEN_FILE}.tmp-{os.getpid()}-{threading.get_ident()}")
    atomic_write(tmp, secrets.token_urlsafe(32).encode() + b"\n", mode=0o600)
    try:
        os.link(tmp, path)  # never replaces: a concurrent first start keeps one token
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return _read_token(path)


def _read_token(path: Path) -> str:
    if path.stat().st_mode & 0o077:
        log.warning("%s was readable by others; restricting it to its owner", path)
        path.chmod(0o600)
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"{path} is empty: delete it to make a new token")
    return token


class HttpError(Exception):
    """A request the API answers with an error: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _json(obj: Any) -> bytes:
    """Strict JSON: a NaN or an infinity raises ValueError instead of emitting ``NaN``."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def content_length(values: Sequence[str], *, chunked: bool = False) -> int:
    """The body size the ``Content-Length`` header(s) ``values`` announce, or ``HttpError``
    (411 none or chunked, 400 malformed or conflicting, 413 over ``MAX_BODY``)."""
    if chunked:
        raise HttpError(411, "chunked bodies are not supported: send Content-Length")
    if not values:
        raise HttpError(411, "Content-Length required")
    if len({v.strip() for v in values}) > 1:
        raise HttpError(400, f"conflicting Content-Length headers {list(values)[:4]!r:.80}")
    text = values[0].strip()
    if not (text.isascii() and text.isdigit()):
        raise HttpError(
            400, f"bad Content-Length {text!r:.40}: expected a non-negative decimal integer"
        )
    if len(text) > 20 or int(text) > MAX_BODY:
        raise HttpError(413, f"body of {text:.40} bytes is over the {MAX_BODY}-byte limit")
    return int(text)


Route = Callable[[Any], bytes]  # an unbound handler method


class _Handler(BaseHTTPRequestHandler):
    """Routing, the token check, body limits and JSON errors; subclasses list their routes."""

    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    # Buffered writes: headers and body leave in one send (http.server flushes per request).
    wbufsize = -1
    server_version = "edgefleet-agent"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    timeout = IDLE_TIMEOUT
    routes: ClassVar[dict[tuple[str, str], tuple[bool, Route]]] = {}  # -> (needs token, handler)
    server: _HttpServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        self._body_read = False
        self._content_type = "application/json"  # a route may set another
        self.server.count()
        try:
            needs_token, handler = self._route(method)
            if needs_token and not hmac.compare_digest(
                self.headers.get("Authorization", "").encode("latin-1", "replace"), self.server.auth
            ):
                raise HttpError(401, "missing or wrong bearer token")
            status, data = 200, handler(self)
        except HttpError as exc:
            status, data = exc.status, _json({"error": exc.message})
        except Exception:
            log.exception("%s %s failed", method, self.path)
            status, data = 500, _json({"error": "internal error"})
        self._send(status, data)

    def _route(self, method: str) -> tuple[bool, Route]:
        path = self.path.split("?", 1)[0]
        route = self.routes.get((method, path))
        if route is None:
            known = any(p == path for _, p in self.routes)
            raise HttpError(405 if known else 404, f"no route {method} {path}")
        return route

    def handle_expect_100(self) -> bool:
        try:
            self._content_length()
        except HttpError as exc:  # refused before the client sends the body
            self._body_read = False
            self._send(exc.status, _json({"error": exc.message}))
            return False
        return super().handle_expect_100()

    def _content_length(self) -> int:
        try:
            return content_length(
                self.headers.get_all("Content-Length") or [],
                chunked="Transfer-Encoding" in self.headers,
            )
        except HttpError as exc:
            log.warning(
                "%s %s from %s refused: %s",
                self.command,
                self.path,
                self.client_address[0],
                exc.message,
            )
            raise

    def _read_body(self) -> bytes:
        length = self._content_length()
        self.connection.settimeout(self.server.body_timeout)  # per read: a trickle still works
        try:
            body: bytes | None = self.rfile.read(length)
        except TimeoutError:
            body = None
        if body is None or len(body) != length:
            self.close_connection = True  # and _send says so: the rest is not a request
            seen = (
                f"no more bytes within {self.server.body_timeout:g} s"
                if body is None
                else f"the connection closed after {len(body)}"
            )
            log.warning(
                "%s %s from %s dropped: body shorter than Content-Length (%d bytes announced, %s)",
                self.command,
                self.path,
                self.client_address[0],
                length,
                seen,
            )
            raise HttpError(
                400, f"body shorter than Content-Length ({length} bytes announced, {seen})"
            )
        self.connection.settimeout(self.timeout)
        self._body_read = True
        return body

    def _send(self, status: int, data: bytes) -> None:
        headers = self.headers
        unread = "Transfer-Encoding" in headers or headers.get("Content-Length", "0") != "0"
        self.send_response(status)
        ctype = self._content_type if status == 200 else "application/json"
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if unread and not self._body_read:  # the rest of the stream is not a request
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base signature)
        log.debug("%s " + format, self.client_address[0], *args)


def _no_constant(name: str) -> Any:
    raise HttpError(400, f"body: {name} is not a JSON number (send finite numbers)")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise HttpError(400, "body: duplicate keys in a JSON object")
    return doc


_ROWS = "inputs must be a row or a list of equal-length rows of numbers"
_KINDS = {bool: "a boolean", str: "a string", dict: "an object", type(None): "null", list: "a list"}


def parse_inputs(body: bytes, spec: TensorSpec | None = None) -> np.ndarray:
    """The float32 batch a ``/v1/predict`` body asks for, or ``HttpError`` (400, 413, 422).

    ``spec``: the active model's input; its shape is checked (``None`` dims match any size)
    and one sample without the batch dimension becomes a batch of one. Without a spec, a row
    or a list of rows. Pure: the fuzzer calls it directly.
    """
    doc = _load_json(body)
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise HttpError(400, 'expected a JSON object {"inputs": [[...], ...]}')
    shape, values = _rectangle(doc["inputs"])
    del doc
    try:
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused below
            x = np.array(values, dtype=np.float32)
    except OverflowError:  # an integer beyond float64
        x = np.array([math.inf if abs(v) > FLOAT32_MAX else v for v in values], np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        raise HttpError(
            422,
            f"inputs: expected finite numbers within float32 range (|x| <= {FLOAT32_MAX:g}), "
            f"saw {values[int(bad.argmax())]!r:.40}",
        )
    return x.reshape(_batch_shape(shape, spec))


def _load_json(body: bytes, limit: int = MAX_BODY) -> Any:
    """Strict JSON (no NaN/Infinity, no duplicate keys) of at most ``limit`` bytes."""
    if len(body) > limit:
        raise HttpError(413, f"body of {len(body)} bytes is over the {limit}-byte limit")
    try:
        return json.loads(body, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except HttpError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise HttpError(400, f"body is not valid JSON: {exc}") from exc


_FEEDBACK = 'expected a JSON object {"id": "<prediction id>", "label": <class index>}'


def parse_feedback(body: bytes) -> tuple[str, int]:
    """(prediction id, true class) of a ``/v1/feedback`` body, or ``HttpError`` (400, 413)."""
    doc = _load_json(body, MAX_FEEDBACK_BODY)
    if not isinstance(doc, dict) or set(doc) != {"id", "label"}:
        seen = sorted(doc)[:4] if isinstance(doc, dict) else _KINDS.get(type(doc), "a number")
        raise HttpError(400, f"{_FEEDBACK}, saw {seen}")
    pid, label = doc["id"], doc["label"]
    if not isinstance(pid, str) or not 0 < len(pid) <= 64:
        raise HttpError(400, f"id: expected a prediction id (a string), saw {pid!r:.40}")
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise HttpError(400, f"label: expected a class index (an integer >= 0), saw {label!r:.40}")
    return pid, label


def _rectangle(value: object) -> tuple[tuple[int, ...], list[int | float]]:
    """(shape, values in C order) of a rectangular nested list of JSON numbers."""
    shape: list[int] = []
    level: list[Any] = [value]
    while all(type(v) is list for v in level):
        widths = {len(v) for v in level}
        if len(widths) != 1:
            raise HttpError(400, f"{_ROWS}: saw lengths {sorted(widths)[:8]} at depth {len(shape)}")
        (width,) = widths
        if width == 0:
            raise HttpError(400, f"{_ROWS}: saw an empty list")
        if len(shape) == MAX_RANK:
            raise HttpError(400, f"{_ROWS}: more than {MAX_RANK} dimensions")
        shape.append(width)
        level = level[0] if len(level) == 1 else [x for v in level for x in v]
    kinds = {type(v) for v in level}
    if not kinds <= {int, float}:
        odd = next(k for k in kinds if k not in (int, float))
        where = "beside numbers (ragged)" if odd is list else "where a number belongs"
        raise HttpError(400, f"{_ROWS}: saw {_KINDS.get(odd, odd.__name__)} {where}")
    return tuple(shape), level


def _batch_shape(shape: tuple[int, ...], spec: TensorSpec | None) -> tuple[int, ...]:
    want = spec.shape if spec is not None else (None, None)
    got = (1, *shape) if len(shape) == len(want) - 1 else shape
    if len(got) == len(want) and all(w is None or w == g for w, g in zip(want, got, strict=True)):
        return got
    if spec is None:
        raise HttpError(400, f"inputs must be a row or a list of rows, got shape {shape}")
    dims = ", ".join(
        "batch" if i == 0 and d is None else "*" if d is None else str(d)
        for i, d in enumerate(want)
    )
    raise HttpError(400, f"expected input of shape ({dims}) for {spec.name!r}, got shape {shape}")


class _InferenceHandler(_Handler):
    def _predict(self) -> bytes:
        body = self._read_body()
        active = self.server.agent.active
        x = parse_inputs(body, active.manifest.inputs[0] if active is not None else None)
        try:  # version and output from one snapshot: the label names the model that answered
            version, out = self.server.predict_versioned(x)
        except (ValueError, TypeError) as exc:
            raise HttpError(400, str(exc)) from exc
        except RuntimeError as exc:  # no model active, or closed by a concurrent swap
            raise HttpError(503, str(exc)) from exc
        m = version.manifest
        top = out.argmax(axis=-1)
        try:
            return _json(
                {
                    "outputs": out.tolist(),
                    "argmax": top.tolist(),
                    "ids": self.server.recorder.issue(version, top, out.shape[-1]),
                    "model": {"name": m.name, "version": m.model_version, "sequence": m.sequence},
                }
            )
        except ValueError:  # NaN or infinity: not JSON
            log.warning(
                "model %s %s gave non-finite outputs; answered 500", m.name, m.model_version
            )
            raise HttpError(
                500, f"model {m.name} {m.model_version} gave NaN or infinite outputs"
            ) from None

    def _explain(self) -> bytes:
        from .explain import ExplainOptions, background_from, explain

        if self._content_length() > MAX_EXPLAIN_BODY:  # refused unread
            raise HttpError(413, f"explain body over the {MAX_EXPLAIN_BODY}-byte limit")
        body = self._read_body()
        serving = self.server.agent.serving
        if serving is None:
            raise HttpError(503, "no model is active")
        version, runtime = serving
        spec = version.manifest.inputs[0]
        x = parse_inputs(body, spec)
        if x.shape[0] != 1:
            raise HttpError(400, f"explain takes one input row, saw {x.shape[0]}")
        doc = json.loads(body)  # parse_inputs made sure it is a strict JSON object
        try:
            opts = ExplainOptions.from_doc(doc)
            bg = (background_from(version.manifest.reference_stats, x.shape[1])
                  if opts.background is None
                  else parse_inputs(_json({"inputs": opts.background}), spec))  # fmt: skip
            if bg is None:
                raise ValueError("the bundle has no reference mean to explain against: "
                                 'send "background" rows')  # fmt: skip
            e = explain(runtime.run, x[0], bg, target=opts.target, method=opts.method,
                        permutations=opts.permutations, seed=opts.seed)  # fmt: skip
        except ValueError as exc:
            raise HttpError(400, str(exc)) from exc
        m = version.manifest
        try:
            model = {"name": m.name, "version": m.model_version, "sequence": m.sequence}
            return _json({**e.to_dict(), "model": model})
        except ValueError:  # NaN or infinity: not JSON
            raise HttpError(500, f"model {m.name} {m.model_version} gave non-finite outputs"
                            ) from None  # fmt: skip

    def _feedback(self) -> bytes:
        from .observe import AlreadyLabelled, UnknownPrediction

        if self._content_length() > MAX_FEEDBACK_BODY:  # refused unread
            raise HttpError(413, f"feedback body over the {MAX_FEEDBACK_BODY}-byte limit")
        pid, label = parse_feedback(self._read_body())
        try:
            key, predicted = self.server.recorder.label(pid, label)
        except UnknownPrediction as exc:
            raise HttpError(404, str(exc)) from None
        except AlreadyLabelled as exc:
            raise HttpError(409, str(exc)) from None
        except ValueError as exc:  # not one of the model's classes
            raise HttpError(422, str(exc)) from None
        return _json({"id": pid, "label": label, "predicted": predicted,
                      "correct": predicted == label, "model": key})  # fmt: skip

    def _status(self) -> bytes:
        return _json(self.server.agent.status().to_dict())

    def _healthz(self) -> bytes:
        return _json({"ok": True, "active": self.server.agent.active is not None})

    def _metrics(self) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self._content_type = CONTENT_TYPE_LATEST
        return generate_latest(self.server.metrics)

    routes = {
        ("POST", "/v1/predict"): (True, _predict),
        ("POST", "/v1/explain"): (True, _explain),
        ("POST", "/v1/feedback"): (True, _feedback),
        ("GET", "/v1/status"): (True, _status),
        ("GET", "/healthz"): (False, _healthz),
        ("GET", "/metrics"): (True, _metrics),
    }


class _EchoHandler(_Handler):
    def _echo(self) -> bytes:
        return self._read_body()

    routes = {("POST", "/v1/echo"): (True, _echo)}


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[_Handler],
        *,
        auth: bytes,
        agent: Any,
        body_timeout: float,
    ) -> None:
        self.auth, self.agent, self.requests = auth, agent, 0
        # the agent's, or a recorder's (InferenceServer); the echo server has no agent
        self.predict_versioned: Any = getattr(agent, "predict_versioned", None)
        self.metrics: Any = None  # a prometheus CollectorRegistry (InferenceServer)
        self.recorder: Any = None  # the predict recorder: ids and labels (InferenceServer)
        self.body_timeout = body_timeout
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        super().__init__(address, handler)

    def server_bind(self) -> None:  # HTTPServer's would do a reverse DNS lookup of the host
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s failed", client_address, exc_info=True)  # not stderr

    def count(self) -> None:
        with self._lock:
            self.requests += 1

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Server:
    """A ThreadingHTTPServer on loopback, served from a daemon thread.

    ``body_timeout``: seconds one read of a request body may wait for more bytes.
    """

    _handler: ClassVar[type[_Handler]]

    def __init__(
        self,
        agent: Any,
        *,
        home: Path,
        port: int = 0,
        host: str = "127.0.0.1",
        body_timeout: float = BODY_TIMEOUT,
    ) -> None:
        if host == "localhost":
            host = "127.0.0.1"
        try:
            loopback = ipaddress.ip_address(host).is_loopback and ":" not in host
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"the local API binds an IPv4 loopback address only, got {host!r}")
        self.agent, self.home, self.host = agent, home, host
        self._port, self.body_timeout = port, body_timeout
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd else self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def requests(self) -> int:
        """Requests handled since start (any route, any outcome)."""
        return self._httpd.requests if self._httpd else 0

    def start(self) -> None:
        if self._httpd is not None:
            raise RuntimeError(f"{type(self).__name__} is already serving on {self.url}")
        auth = b"Bearer " + load_token(self.home).encode()
        self._httpd = _HttpServer(
            (self.host, self._port),
            self._handler,
            auth=auth,
            agent=self.agent,
            body_timeout=self.body_timeout,
        )
        self._prepare(self._httpd)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            args=(POLL_INTERVAL,),
            name=f"{type(self).__name__}:{self.port}",
            daemon=True,
        )
        self._thread.start()
        log.info("%s serving on %s", type(self).__name__, self.url)

    def _prepare(self, httpd: _HttpServer) -> None:
        """Before the first request is served (subclasses add to the server here)."""

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        httpd.drop_connections()
        if self._thread is not None:
            self._thread.join()
        log.info("%s on port %d stopped", type(self).__name__, httpd.server_address[1])

    def __enter__(self) -> _Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class InferenceServer(_Server):
    """The agent's inference API; names its port in ``<home>/run/http.json`` while serving."""

    _handler = _InferenceHandler
    agent: Agent

    def __init__(
        self,
        agent: Agent,
        *,
        home: Path,
        port: int = 0,
        host: str = "127.0.0.1",
        body_timeout: float = BODY_TIMEOUT,
        recorder: Recorder | None = None,  # predict records through it (default: its own)
    ) -> None:
        super().__init__(agent, home=home, port=port, host=host, body_timeout=body_timeout)
        self._run_data = b""
        from .observe import Recorder

        self.recorder = recorder if recorder is not None else Recorder(agent)

    def _prepare(self, httpd: _HttpServer) -> None:
        from prometheus_client import CollectorRegistry

        httpd.predict_versioned = self.recorder.predict_versioned
        httpd.recorder = self.recorder
        httpd.metrics = CollectorRegistry(auto_describe=False)
        httpd.metrics.register(self.recorder.collector())

    def start(self) -> None:
        super().start()
        run = self.home / RUN_FILE
        self._run_data = _json({"port": self.port, "pid": os.getpid(), "host": self.host})
        try:
            run.parent.mkdir(mode=0o700, exist_ok=True)
            atomic_write(run, self._run_data, mode=0o600)
        except BaseException:
            super().stop()
            raise

    def stop(self) -> None:
        run = self.home / RUN_FILE
        with contextlib.suppress(FileNotFoundError):
            if self._httpd is not None and run.read_bytes() == self._run_data:
                run.unlink()  # only our own: a newer server may have taken over the file
        super().stop()


class EchoServer(_Server):
    """``POST /v1/echo`` returns the body: the bare-stack baseline for benchmarks."""

    _handler = _EchoHandler

    def __init__(
        self,
        *,
        home: Path,
        port: int = 0,
        host: str = "127.0.0.1",
        body_timeout: float = BODY_TIMEOUT,
    ) -> None:
        super().__init__(None, home=home, port=port, host=host, body_timeout=body_timeout)


def predict_via_http(home: Path, x: np.ndarray, timeout: float = 5.0) -> np.ndarray | None:
    """The running daemon's outputs for ``x``, or None when no daemon serves ``home``.

    Raises ValueError for input the server rejects, RuntimeError when it has no active model,
    and TransportError when it is there but does not answer properly.
    """
    answer = answer_via_http(home, x, timeout)
    return None if answer is None else answer[0]


def answer_via_http(
    home: Path, x: np.ndarray, timeout: float = 5.0
) -> tuple[np.ndarray, list[str]] | None:
    """``predict_via_http`` with the prediction ids (one per row, for ``feedback_via_http``)."""
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("inputs must be finite numbers (saw NaN or infinity)")
    answer = _post(home, "/v1/predict", {"inputs": x.tolist()}, timeout)
    if answer is None:
        return None
    where, status, doc = answer
    if status == 200:
        try:
            ids = [str(i) for i in doc.get("ids", [])]
            return np.asarray(doc["outputs"], dtype=np.float32), ids
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TransportError(f"{where}: unexpected answer {str(doc)[:200]!r}") from exc
    _raise(where, status, doc)


def feedback_via_http(
    home: Path, prediction_id: str, label: int, timeout: float = 5.0
) -> dict[str, Any] | None:
    """Report the true class of an earlier prediction to the running daemon: its answer
    (``predicted``, ``correct``, ``model``), or None when no daemon serves ``home``.

    Raises LookupError for an id it does not know (another run, or too old), RuntimeError
    for a prediction already labelled, ValueError for a label it refuses, TransportError
    when it does not answer properly."""
    answer = _post(home, "/v1/feedback", {"id": prediction_id, "label": label}, timeout)
    if answer is None:
        return None
    where, status, doc = answer
    if status == 200 and isinstance(doc, dict):
        return doc
    if status == 404 and "no route" not in str(doc.get("error", "")):
        raise LookupError(str(doc["error"]))
    if status == 409:
        raise RuntimeError(str(doc.get("error")))
    _raise(where, status, doc)


def _post(home: Path, path: str, doc: Any, timeout: float) -> tuple[str, int, Any] | None:
    """(where, HTTP status, JSON answer) of a POST to the daemon serving ``home``, or None
    when none does."""
    endpoint = _endpoint(home)
    if endpoint is None:
        return None
    host, port, token = endpoint
    where = f"local inference API at {host}:{port}"
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(
            "POST",
            path,
            _json(doc),
            {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        status, data = resp.status, resp.read()
    except ConnectionRefusedError:
        return None  # a stale run file: the daemon is gone
    except (OSError, http.client.HTTPException) as exc:
        raise TransportError(f"{where}: {exc!r}") from exc
    finally:
        conn.close()
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if answer is None or (status != 200 and not (isinstance(answer, dict) and "error" in answer)):
        raise TransportError(f"{where}: HTTP {status}, unexpected body {data[:200]!r}")
    return where, status, answer


def _raise(where: str, status: int, doc: Any) -> NoReturn:
    """The exception for an error answer: 400/413/422 ValueError, 503 RuntimeError."""
    message = str(doc.get("error")) if isinstance(doc, dict) else f"unexpected answer {doc!r:.200}"
    if status in (400, 413, 422):
        raise ValueError(message)
    if status == 503:
        raise RuntimeError(message)
    raise TransportError(f"{where}: HTTP {status}: {message}")


def _endpoint(home: Path) -> tuple[str, int, str] | None:
    """(host, port, token) of a live server for ``home`` from its run file, else None."""
    try:
        info = json.loads((home / RUN_FILE).read_bytes())
        port, pid = int(info["port"]), int(info["pid"])
        host = str(info.get("host", "127.0.0.1"))
        token = (home / TOKEN_FILE).read_text().strip()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("no local inference API for %s: %s", home, exc)
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return host, port, token
