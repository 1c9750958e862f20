"""``Agent.predict`` latency against the raw runtime call, batch 1, the digits MLP.

For each format an agent home gets the digits bundle installed (the real install path); the
agent is opened and ``Agent.predict(x)`` timed call by call with ``perf_counter_ns``.
Baseline, on the same model file and input, with the same options (1 intra-op thread):

* ONNX: ``sess.run([out], {in: x})`` on an ``InferenceSession`` made like ``OrtRuntime``
  makes its own (1 intra-op and 1 inter-op thread, no spinning, CPU provider);
* TFLite: ``interp.set_tensor``, ``invoke``, ``get_tensor`` on a LiteRT ``Interpreter`` with
  ``num_threads=1``.

Calls run in blocks (500; quick: 100) alternating ours and raw, so drift and noise from
other tenants fall on both. A third series times the agent's runtime object directly
(``OrtRuntime.run`` / ``LiteRtRuntime.run``) to split the overhead between the two layers.
The garbage collector is off while timing. Reported: p50 and p99 in µs, their ratios
(aim ≤ 1.10), and the per-call overhead (p50 difference) in ns.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from ._util import Fleet, Row, fleet, percentile, time_calls

NAME = "predict"
_NOTES: list[str] = []


def notes() -> list[str]:
    return list(_NOTES)


def _loop_ort(run: Any, names: list[str], feed: dict[str, Any], out: list[int], n: int) -> None:
    clock = time.perf_counter_ns
    append = out.append
    for _ in range(n):
        t0 = clock()
        run(names, feed)
        append(clock() - t0)


def _loop_litert(interp: Any, i_in: int, i_out: int, x: Any, out: list[int], n: int) -> None:
    clock = time.perf_counter_ns
    append = out.append
    set_tensor, invoke, get_tensor = interp.set_tensor, interp.invoke, interp.get_tensor
    for _ in range(n):
        t0 = clock()
        set_tensor(i_in, x)
        invoke()
        get_tensor(i_out)
        append(clock() - t0)


def _raw(fmt: str, path: Any, x: Any) -> tuple[Any, Any]:
    """(timed loop taking an output list, a call returning the output) for the raw runtime."""
    if fmt == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
        names = [sess.get_outputs()[0].name]
        feed = {sess.get_inputs()[0].name: x}
        return (lambda out, n: _loop_ort(sess.run, names, feed, out, n),
                lambda: sess.run(names, feed)[0])
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=1)
    interp.allocate_tensors()
    i_in = interp.get_input_details()[0]["index"]
    i_out = interp.get_output_details()[0]["index"]

    def once() -> Any:
        interp.set_tensor(i_in, x)
        interp.invoke()
        return interp.get_tensor(i_out)

    return (lambda out, n: _loop_litert(interp, i_in, i_out, x, out, n)), once


def _bench_format(fmt: str, calls: int, warmup: int, block: int) -> list[Row]:
    import numpy as np
    from edgefleet.agent.agent import Agent

    fl = fleet()
    home = fl.installed_agent(fmt, f"bench-predict-{fmt}")
    agent = Agent.open(home)
    try:
        version = agent.store.active()
        assert version is not None and version.manifest.format == fmt
        x = np.ascontiguousarray(fl.test_inputs()[:1])
        raw_loop, raw_once = _raw(fmt, version.model_path, x)
        np.testing.assert_allclose(agent.predict(x), raw_once(), atol=1e-6)

        runtime = agent._runtime  # the layer below Agent.predict, to split the overhead
        assert runtime is not None
        ours: list[int] = []
        raw: list[int] = []
        mid: list[int] = []
        time_calls(agent.predict, x, [], warmup)  # warm-up, discarded
        raw_loop([], warmup)
        gc.collect()
        gc.disable()
        try:
            for b in range(calls // block):
                if b % 2 == 0:
                    time_calls(agent.predict, x, ours, block)
                    raw_loop(raw, block)
                    time_calls(runtime.run, x, mid, block)
                else:
                    time_calls(runtime.run, x, mid, block)
                    raw_loop(raw, block)
                    time_calls(agent.predict, x, ours, block)
        finally:
            gc.enable()
    finally:
        agent.close()

    o50, o99 = percentile(ours, 50), percentile(ours, 99)
    m50 = percentile(mid, 50)
    r50, r99 = percentile(raw, 50), percentile(raw, 99)
    raw_name = ("raw ORT sess.run" if fmt == "onnx"
                else "raw LiteRT set_tensor/invoke/get_tensor")
    _NOTES.append(f"{fmt}: {len(ours)} calls each side in blocks of {block}; "
                  f"mean ours {np.mean(ours) / 1e3:.2f} µs, raw {np.mean(raw) / 1e3:.2f} µs; "
                  f"min ours {min(ours) / 1e3:.2f} µs, raw {min(raw) / 1e3:.2f} µs")
    return [
        Row(key=f"p50_us:{fmt}", metric=f"Agent.predict p50, digits {fmt}, batch 1",
            value=o50 / 1e3, unit="µs", baseline=raw_name, baseline_value=r50 / 1e3,
            aim="<= 1.10"),
        Row(key=f"p99_us:{fmt}", metric=f"Agent.predict p99, digits {fmt}, batch 1",
            value=o99 / 1e3, unit="µs", baseline=raw_name, baseline_value=r99 / 1e3,
            aim="<= 1.10"),
        Row(key=f"overhead_ns:{fmt}", metric=f"per-call overhead (p50 ours − p50 raw), {fmt}",
            value=o50 - r50, unit="ns"),
        Row(key=f"overhead_runtime_ns:{fmt}",
            metric=f"… of which {type(runtime).__name__}.run (p50 run − p50 raw), {fmt}",
            value=m50 - r50, unit="ns"),
        Row(key=f"overhead_agent_ns:{fmt}",
            metric=f"… of which Agent.predict (p50 ours − p50 run), {fmt}",
            value=o50 - m50, unit="ns"),
    ]


def run(quick: bool) -> list[Row]:
    _NOTES.clear()
    block = 100 if quick else 500
    calls = 2_000 if quick else 100_000
    warmup = 200 if quick else 2_000
    rows: list[Row] = []
    for fmt in Fleet.FORMATS:
        rows += _bench_format(fmt, calls, warmup, block)
    return rows
