"""Shadow, A/B and explanations: what they cost, against baselines measured in the same run.

* A/B routing: ``Agent.predict_versioned`` p50 with an ``ABRouter`` attached (share 0.1: the
  keyed hash on every call, 10 % answered by the candidate, per-arm counting under a lock)
  against ``predict_versioned`` on the same agent with no router; batch 1, digits ONNX.
* Shadow on the request path: ``Recorder.predict`` p50 with the shadow registered as an
  observer (share 0.1) against ``Recorder.predict`` with no observer (the comparisons run on
  the shadow's own thread; what the caller pays is the sampling and the hand-over).
* Explanation: ``explain`` of one digits row (64 features, permutation, 64 antithetic pairs:
  8,320 model rows) against the floor of the work, one ``runtime.run`` of those 8,320 rows;
  in the full run also against ``shap.KernelExplainer`` with the same number of samples.

Calls alternate in blocks, the garbage collector off while timing (as ``bench/predict.py``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ._util import Row, alternate, fleet, percentile

NAME = "shadow"


def _candidate(fl: Any, home: Path, device: str, mode: str, share: float) -> Path:
    """A signed candidate bundle of the digits ONNX model for ``device``."""
    from edgefleet.protocol.build import ReleaseSpec, build_release
    from edgefleet.protocol.candidate import CandidateSpec
    from edgefleet.protocol.keys import KemPublicKey
    from edgefleet.protocol.manifest import SmokeVector, TensorSpec

    c = fl.coord
    mv = c.registry.model(*fl.models["onnx"])
    dev = c.registry.device(device)
    assert dev is not None
    spec = ReleaseSpec(
        name=mv.name, format=mv.format, model_version=mv.version,
        sequence=c.registry.next_sequence(),
        inputs=tuple(TensorSpec.from_dict(t) for t in mv.meta["inputs"]),
        outputs=tuple(TensorSpec.from_dict(t) for t in mv.meta["outputs"]),
        created=int(time.time()), smoke=tuple(SmokeVector.from_dict(v) for v in mv.meta["smoke"]),
        reference_stats=mv.meta.get("feature_stats", {}),
        candidate=CandidateSpec(mode=mode, share=share),
    )  # fmt: skip
    built = build_release(c.blobs.get(mv.blob), spec, release_key=c.keys.release,
                          recipients={device: KemPublicKey(dev.kem, dev.kem_public)})  # fmt: skip
    out = home.parent / f"{device}-{mode}.efb"
    out.write_bytes(built.to_file_bytes(c.keys.keyring_raw, c.keys.keyring_sig))
    return out


def run(quick: bool) -> list[Row]:
    import numpy as np
    from edgefleet.agent.ab import ABRouter
    from edgefleet.agent.agent import Agent
    from edgefleet.agent.explain import background_from, explain
    from edgefleet.agent.observe import Recorder
    from edgefleet.agent.shadow import Shadow

    calls, block = (2000, 200) if quick else (40_000, 500)
    fl = fleet()
    device = "bench-shadow"
    home = fl.installed_agent("onnx", device)
    rows: list[Row] = []
    agent = Agent.open(home)
    try:
        x = np.ascontiguousarray(fl.test_inputs()[:1])
        slot = agent.open_candidate()
        slot.install_file(_candidate(fl, home, device, "ab", 0.1))
        router = ABRouter(slot, agent.predict_active, attach=lambda r: None)
        ours, base = alternate(router, agent.predict_versioned, x, calls, block)
        rows.append(_row("ab_p50_us", "A/B routed predict_versioned p50 (share 0.1)", ours,
                         "predict_versioned, no router", base))  # fmt: skip
        router.close()

        slot.install_file(_candidate(fl, home, device, "shadow", 0.0))
        shadow = Shadow(slot, lambda: agent.serving)
        plain, observed = Recorder(agent), Recorder(agent)
        observed.add_observer(shadow.observe, share=0.1)
        ours, base = alternate(observed.predict, plain.predict, x, calls, block)
        shadow.drain(30.0)
        seen = (shadow.totals() or {}).get("samples", 0)
        rows.append(_row("shadow_p50_us", "Recorder.predict p50 with the shadow observing 10 %",
                         ours, "Recorder.predict, no observer", base,
                         note=f"{seen} compared"))  # fmt: skip
        shadow.close()

        serving = agent.serving
        assert serving is not None
        version, runtime = serving
        bg = background_from(version.manifest.reference_stats, 64)
        assert bg is not None
        row = fl.test_inputs()[7]
        reps = 3 if quick else 10
        t_ours, t_floor = [], []
        for _ in range(reps):
            t0 = time.perf_counter_ns()
            e = explain(runtime.run, row, bg, permutations=64)
            t_ours.append(time.perf_counter_ns() - t0)
            batch = np.repeat(bg, e.evaluations - 1, axis=0)
            t0 = time.perf_counter_ns()
            runtime.run(batch)
            t_floor.append(time.perf_counter_ns() - t0)
        rows.append(Row(key="explain_ms", metric="explain one digits row (permutation, 64 pairs)",
                        value=percentile(t_ours, 50) / 1e6, unit="ms",
                        baseline="one runtime.run of the same 8,320 rows",
                        baseline_value=percentile(t_floor, 50) / 1e6))  # fmt: skip
        if not quick:
            rows.append(_shap_row(runtime, row, bg, e.evaluations - 1, percentile(t_ours, 50)))
    finally:
        agent.close()
    return rows


def _shap_row(runtime: Any, row: Any, bg: Any, samples: int, ours_ns: float) -> Row:
    import numpy as np
    import shap

    ref = shap.KernelExplainer(lambda a: runtime.run(np.asarray(a, np.float32)), bg)
    t0 = time.perf_counter_ns()
    ref.shap_values(row[None], nsamples=samples, silent=True, l1_reg=False)
    took = time.perf_counter_ns() - t0
    return Row(key="explain_vs_shap_ms", metric="explain one digits row (ours, as above)",
               value=ours_ns / 1e6, unit="ms",
               baseline=f"shap.KernelExplainer, {samples} samples", baseline_value=took / 1e6)


def _row(key: str, metric: str, ours: list[int], baseline: str, base: list[int],
         note: str = "") -> Row:  # fmt: skip
    return Row(key=key, metric=metric, value=percentile(ours, 50) / 1e3, unit="µs",
               baseline=baseline, baseline_value=percentile(base, 50) / 1e3, note=note)
