"""Drift: what on-device sketching costs the request path, and how well PSI separates drift.

1. The request path: ``Recorder.predict`` with the drift monitor attached (``agent.drift``,
   default share: every 10th call is copied and queued for the observer thread, which
   buffers it and folds 64 rows at a time into the sketch) against ``Recorder.predict`` with
   a no-op observer at the same share (so the row is what drift itself adds; aim: p50 and
   p99 ratios <= 1.10), and the no-op observer against no observer (what the sampling hook
   costs, for information). Same agent (digits MLP, ONNX), input (batch 1), blocks
   alternating, garbage collector off.
2. The sketch update itself (``protocol.drift.Sketch.update``, 64 features), per call at
   batch 1 and 64, against ``Agent.predict`` of the same batch: what the observer thread
   spends per sampled call.
3. Separation: max PSI over the 64 features of the held-out digits (no drift) and of the
   same rows with 6 centre pixels shifted by +0.4, against the alert threshold (0.2); and the
   report size of one model against ``MAX_TELEMETRY``.
"""

from __future__ import annotations

import json

from ._util import Row, alternate, fleet, percentile

NAME = "drift"
_NOTES: list[str] = []


def notes() -> list[str]:
    return list(_NOTES)


def run(quick: bool) -> list[Row]:
    import numpy as np
    from edgefleet.agent.agent import Agent
    from edgefleet.agent.drift import DEFAULT_SHARE, DriftMonitor
    from edgefleet.agent.observe import Recorder
    from edgefleet.coordinator.drift import DEFAULT_THRESHOLD
    from edgefleet.protocol.drift import ReferenceStats, Sketch
    from edgefleet.protocol.messages import MAX_TELEMETRY

    _NOTES.clear()
    calls, block = (1_000, 100) if quick else (40_000, 500)
    fl = fleet()
    agent = Agent.open(fl.installed_agent("onnx", "bench-drift-onnx"))
    try:
        x_all = fl.test_inputs()
        x1 = np.ascontiguousarray(x_all[:1])
        plain, noop, watched = Recorder(agent), Recorder(agent), Recorder(agent)
        noop.add_observer(lambda x, y, key: None, share=DEFAULT_SHARE)
        monitor = DriftMonitor(agent)
        watched.add_observer(monitor.observe, share=DEFAULT_SHARE)
        ours, base = alternate(watched.predict, noop.predict, x1, calls, block)
        hooked, bare = alternate(noop.predict, plain.predict, x1, calls, block)
        report = monitor.telemetry() or {}
        ref = ReferenceStats.from_dict(agent.active.manifest.reference_stats)  # type: ignore[union-attr]
        sketch_us, predict_us = {}, {}
        for batch in (1, 64):
            xb = np.ascontiguousarray(x_all[:batch])
            sk = Sketch(ref)
            s_t, p_t = alternate(sk.update, agent.predict, xb, calls // 4, block // 4)
            sketch_us[batch] = percentile(s_t, 50) / 1e3
            predict_us[batch] = percentile(p_t, 50) / 1e3
        shifted = x_all.copy()
        centre = [19, 20, 27, 28, 35, 36]
        shifted[:, centre] = np.clip(shifted[:, centre] + 0.4, 0, 1)
        psi = {}
        for label, xs in (("held-out", x_all), ("shifted", shifted)):
            sk = Sketch(ref)
            sk.update(xs, agent.predict(xs))
            psi[label] = sk.summary().max_psi
    finally:
        agent.close()
    size = len(json.dumps({"drift": report}, separators=(",", ":")))
    sampled = sum(float(r["n"]) for r in report.values())
    _NOTES.append(f"request path: {len(ours)} calls each side in blocks of {block}; the monitor "
                  f"sketched {sampled:.0f} rows ({watched.observer_dropped} samples dropped at "
                  "the observer queue)")  # fmt: skip
    _NOTES.append(f"separation on {len(x_all)} held-out rows: max PSI {psi['held-out']:.3f} "
                  f"without drift, {psi['shifted']:.2f} with 6 pixels +0.4")  # fmt: skip
    o50, o99, b50, b99 = (percentile(ours, 50), percentile(ours, 99), percentile(base, 50),
                          percentile(base, 99))  # fmt: skip
    noop_base = "Recorder.predict, a no-op observer at the same share"
    return [
        Row(key="drift_record_p50_us", metric="Recorder.predict with the drift monitor p50, "
            "ONNX, batch 1", value=o50 / 1e3, unit="µs", baseline=noop_base,
            baseline_value=b50 / 1e3, aim="<= 1.10"),
        Row(key="drift_record_p99_us", metric="Recorder.predict with the drift monitor p99, "
            "ONNX, batch 1", value=o99 / 1e3, unit="µs", baseline=noop_base,
            baseline_value=b99 / 1e3, aim="<= 1.10"),
        *(Row(key=f"observer_hook_p{q}_us", metric=f"Recorder.predict with a no-op observer "
              f"(share {DEFAULT_SHARE:g}) p{q}, ONNX, batch 1", value=percentile(hooked, q) / 1e3,
              unit="µs", baseline="Recorder.predict, no observer",
              baseline_value=percentile(bare, q) / 1e3) for q in (50, 99)),
        *(Row(key=f"sketch_update_b{b}_us", metric=f"Sketch.update, 64 features, batch {b} "
              "(observer thread, per sampled call)", value=sketch_us[b], unit="µs",
              baseline=f"Agent.predict, batch {b}", baseline_value=predict_us[b])
          for b in (1, 64)),
        Row(key="psi_no_drift", metric="max PSI over 64 features, held-out digits (no drift)",
            value=psi["held-out"], unit="PSI", baseline="alert threshold",
            baseline_value=DEFAULT_THRESHOLD, aim="<= 0.5"),
        Row(key="psi_shifted", metric="max PSI, held-out digits with 6 pixels +0.4",
            value=psi["shifted"], unit="PSI", baseline="alert threshold",
            baseline_value=DEFAULT_THRESHOLD, aim=">= 5"),
        Row(key="drift_report_bytes", metric="drift telemetry of one 64-feature model",
            value=float(size), unit="B", baseline="MAX_TELEMETRY", baseline_value=MAX_TELEMETRY,
            aim="<= 0.1"),
    ]  # fmt: skip
