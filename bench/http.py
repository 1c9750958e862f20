"""Local HTTP inference API latency: ``POST /v1/predict`` against a bare echo on the same stack.

An agent home gets the digits ONNX bundle installed (the real install path); the agent is
opened and served by ``agent.http.InferenceServer`` on loopback. Baseline: ``agent.http.
EchoServer`` — the same ``ThreadingHTTPServer`` / handler base (routing, bearer-token check,
body limits, keep-alive, TCP_NODELAY), whose only route returns the request body — in the
same process, with the same token.

One keep-alive ``http.client.HTTPConnection`` per server; every request carries the same
body, one digits row as ``{"inputs": [[64 floats]]}`` (batch 1), and the bearer token. Each
request is timed from ``request()`` to the last byte of the response read. Requests run in
blocks of 100 (quick: 50), alternating predict and echo, 2,000 of each (quick: 300) after a
warm-up; the garbage collector is off while timing. A third series times ``Agent.predict``
in-process on the same row, to show how much of the difference is the model itself.
Reported: p50 and p99 in µs and their ratios (predict ÷ echo), and the handler's cost beyond
the bare stack (p50 difference).

The client runs in this process, so client and server threads share one GIL; on a machine with
few cores each hand-over between them may cost a cross-core wake-up, which any work in the
handler multiplies (the echo handler does almost none). ``taskset -c 0 python -m bench http``
shows the figure without that effect.
"""

from __future__ import annotations

import gc
import http.client
import json
import time
from typing import Any

from ._util import Row, fleet, percentile, time_calls

NAME = "http"
_NOTES: list[str] = []


def notes() -> list[str]:
    return list(_NOTES)


def _loop(
    conn: http.client.HTTPConnection,
    path: str,
    body: bytes,
    headers: dict[str, str],
    out: list[int],
    n: int,
) -> None:
    clock = time.perf_counter_ns
    append = out.append
    request, getresponse = conn.request, conn.getresponse
    for _ in range(n):
        t0 = clock()
        request("POST", path, body, headers)
        resp = getresponse()
        resp.read()
        append(clock() - t0)
        if resp.status != 200:
            raise RuntimeError(f"POST {path}: HTTP {resp.status}")


def run(quick: bool) -> list[Row]:
    import numpy as np
    from edgefleet.agent.agent import Agent
    from edgefleet.agent.http import EchoServer, InferenceServer, load_token

    _NOTES.clear()
    calls, block, warmup = (300, 50, 50) if quick else (2000, 100, 200)
    fl = fleet()
    home = fl.installed_agent("onnx")
    agent = Agent.open(home)
    servers: list[Any] = []
    conns: list[http.client.HTTPConnection] = []
    try:
        predict_srv = InferenceServer(agent, home=home)
        echo_srv = EchoServer(home=home)
        for srv in (predict_srv, echo_srv):
            srv.start()
            servers.append(srv)
        x = np.ascontiguousarray(fl.test_inputs()[:1])
        body = json.dumps({"inputs": x.tolist()}, separators=(",", ":")).encode()
        headers = {
            "Authorization": f"Bearer {load_token(home)}",
            "Content-Type": "application/json",
        }
        pc = http.client.HTTPConnection(predict_srv.host, predict_srv.port, timeout=10)
        ec = http.client.HTTPConnection(echo_srv.host, echo_srv.port, timeout=10)
        conns += [pc, ec]

        # correctness first: the API answers with what the agent computes; echo echoes
        pc.request("POST", "/v1/predict", body, headers)
        doc = json.loads(pc.getresponse().read())
        np.testing.assert_allclose(
            np.asarray(doc["outputs"], dtype=np.float32), agent.predict(x), atol=1e-6
        )
        ec.request("POST", "/v1/echo", body, headers)
        assert ec.getresponse().read() == body

        series: dict[str, list[int]] = {"predict": [], "echo": [], "inproc": []}
        runs = {
            "predict": lambda out, n: _loop(pc, "/v1/predict", body, headers, out, n),
            "echo": lambda out, n: _loop(ec, "/v1/echo", body, headers, out, n),
            "inproc": lambda out, n: time_calls(agent.predict, x, out, n),
        }
        for fn in runs.values():
            fn([], warmup)
        names = list(runs)
        gc_was = gc.isenabled()
        gc.disable()
        try:
            for b in range(calls // block):
                order = names if b % 2 == 0 else names[::-1]
                for name in order:
                    runs[name](series[name], block)
        finally:
            if gc_was:
                gc.enable()
        handled = predict_srv.requests
        assert handled >= calls + warmup + 1, handled
        resp_size = len(json.dumps(doc, separators=(",", ":")))
    finally:
        for c in conns:
            c.close()
        for srv in servers:
            srv.stop()
        agent.close()

    us = {k: (percentile(v, 50) / 1e3, percentile(v, 99) / 1e3) for k, v in series.items()}
    _NOTES.append(
        f"{calls} requests per endpoint in blocks of {block} (alternating), after "
        f"{warmup} warm-up requests each; request body {len(body)} B; predict "
        f"response {resp_size} B, echo response {len(body)} B"
    )
    _NOTES.append("µs p50/p99: " + ", ".join(f"{k} {a:.1f}/{b:.1f}" for k, (a, b) in us.items()))
    note = f"digits onnx, batch 1, {calls} requests"
    base = "bare HTTP echo, same server stack and body"
    return [
        Row(
            key="http_p50_us",
            metric="POST /v1/predict p50, keep-alive",
            value=us["predict"][0],
            unit="µs",
            baseline=base,
            baseline_value=us["echo"][0],
            note=note,
        ),
        Row(
            key="http_p99_us",
            metric="POST /v1/predict p99, keep-alive",
            value=us["predict"][1],
            unit="µs",
            baseline=base,
            baseline_value=us["echo"][1],
            note=note,
        ),
        Row(
            key="http_overhead_us",
            metric="predict handler beyond the bare stack (p50 predict − p50 echo)",
            value=us["predict"][0] - us["echo"][0],
            unit="µs",
        ),
        Row(
            key="inproc_p50_us",
            metric="… of which the model: Agent.predict p50, in-process",
            value=us["inproc"][0],
            unit="µs",
        ),
    ]
