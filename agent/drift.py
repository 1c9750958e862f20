"""On-device drift: sketches of the live inputs and outputs per model, reported as summaries.

``DriftMonitor(agent)`` is a predict observer (``agent.observe.Recorder.add_observer``): it
sees a sampled share of the calls ``(inputs, outputs, model_key)`` on the recorder's observer
thread, and keeps one ``protocol.drift.Sketch`` per model key against the reference statistics
in that model's signed manifest (a model whose manifest carries none, or whose feature count
does not match, is not sketched). At most ``MAX_MODELS`` sketches are kept (the least recently
fed is dropped). Samples are buffered and folded in batches of ``FOLD_ROWS`` rows (and at
each report), which keeps the observer thread's share of the CPU (and of the GIL) small.

``telemetry()`` is the ``drift`` source for ``Reporter.add_source``: per model key fed since
the previous report, the summary of its window: ``n`` (rows in the window), ``psi`` and ``ks`` per
feature (4 decimals; past ``MAX_REPORTED`` features only the highest-PSI ones, their indexes
in ``features``), ``max_psi``, ``max_ks``, ``output_psi`` (predicted classes against the
training class prior) and ``nonfinite`` rows. No input value ever leaves the device.

The window is counted in rows, not time: once a sketch holds more than ``2 * window`` rows
it is halved (every count by 0.5), so it always weighs about the last ``window`` to
``2 * window`` sampled rows, the newest most, whatever the traffic: drift that starts late is
not diluted by a long healthy past, and a quiet device still gathers enough rows. A model fed
nothing since the previous report is not reported again. A report is the state of the
window, not a delta: the coordinator keeps the latest one per device and model.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
from edgefleet.protocol.drift import Sketch

if TYPE_CHECKING:
    from .agent import Agent
    from .observe import Recorder
    from .reporter import Reporter
    from .store import InstalledVersion

__all__ = ["DEFAULT_SHARE", "MAX_MODELS", "MAX_REPORTED", "NAMESPACE", "DriftMonitor"]

log = logging.getLogger(__name__)

NAMESPACE = "drift"
DEFAULT_SHARE = 0.1  # of the predict calls the monitor sees
MAX_MODELS = 4  # sketches kept at once
MAX_REPORTED = 64  # features reported one by one per model (the rest: only the top ones)
WINDOW = 1000  # sampled rows a sketch weighs at least (at most twice that)
FOLD_ROWS = 64  # sampled rows buffered before they are added to the sketch in one batch


def _key(version: InstalledVersion) -> str:
    return f"{version.manifest.name}@{version.manifest.model_version}"


class DriftMonitor:
    def __init__(self, agent: Agent, *, window: int = WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window: expected at least 1 row, saw {window}")
        self.agent, self.window = agent, window
        self._lock = threading.Lock()  # the observer thread feeds, the worker reports
        self._sketches: OrderedDict[str, Sketch | None] = OrderedDict()  # None: not sketched
        self._fed: set[str] = set()  # keys fed since their last report
        self._pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}  # not yet folded
        self.skipped = 0  # samples not sketched (unknown model, no reference, bad shape)

    def attach(self, recorder: Recorder, reporter: Reporter, *, share: float = DEFAULT_SHARE
               ) -> None:  # fmt: skip
        """Observe ``share`` of the recorder's calls and report as the ``drift`` source."""
        recorder.add_observer(self.observe, share=share)
        reporter.add_source(NAMESPACE, self.telemetry)

    def _sketch_for(self, key: str) -> Sketch | None:
        if key in self._sketches:
            self._sketches.move_to_end(key)
            return self._sketches[key]
        sketch = None
        for version in (self.agent.active, *self._candidates()):
            if version is not None and _key(version) == key:
                sketch = _new_sketch(version)
                break
        else:
            return None  # a model we cannot find (yet): try again on its next sample
        self._sketches[key] = sketch
        while len(self._sketches) > MAX_MODELS:
            gone, _ = self._sketches.popitem(last=False)
            self._fed.discard(gone)
            self._pending.pop(gone, None)
        return sketch

    def _candidates(self) -> list[InstalledVersion]:
        slot = getattr(self.agent, "candidate", None)
        version = getattr(slot, "version", None) if slot is not None else None
        return [version] if version is not None and hasattr(version, "manifest") else []

    def observe(self, inputs: np.ndarray, outputs: np.ndarray, key: str) -> None:
        """The observer: fold one sampled call into its model's sketch."""
        with self._lock:
            sketch = self._sketch_for(key)
            if sketch is None:
                self.skipped += 1
                return
            x = np.asarray(inputs)
            if x.ndim == 0 or not len(x):
                return
            if x.reshape(len(x), -1).shape[1] != sketch.reference.features:
                self.skipped += 1
                log.debug("drift: sample of %s not sketched: shape %s", key, x.shape)
                return
            rows = self._pending.setdefault(key, [])
            rows.append((x.reshape(len(x), -1), np.asarray(outputs)))
            self._fed.add(key)
            if sum(len(r[0]) for r in rows) >= FOLD_ROWS:
                self._fold(key, sketch)

    def _fold(self, key: str, sketch: Sketch) -> None:
        """Add ``key``'s buffered samples to its sketch in one batch (per-call numpy overhead
        dominates a one-row update: ~65 µs a call at batch 1, ~4 µs a row at batch 64)."""
        rows = self._pending.pop(key, None)
        if not rows:
            return
        x = np.concatenate([r[0] for r in rows])
        widths = {r[1].shape[1:] for r in rows}
        ok = len(widths) == 1 and all(len(r[1]) == len(r[0]) for r in rows)
        sketch.update(x, np.concatenate([r[1] for r in rows]) if ok else None)
        while sketch.n > 2 * self.window:
            sketch.decay(0.5)

    def telemetry(self) -> dict[str, Any] | None:
        """The ``drift`` source: per model key its window's summary (None: nothing seen)."""
        out: dict[str, Any] = {}
        with self._lock:
            for key, sketch in self._sketches.items():
                if sketch is None or key not in self._fed:
                    continue
                self._fold(key, sketch)
                if sketch.n <= 0:
                    continue
                out[key] = _report(sketch)
            self._fed.clear()
        return out or None


def _new_sketch(version: InstalledVersion) -> Sketch | None:
    m = version.manifest
    if not m.reference_stats or "drift_schema" not in m.reference_stats:
        log.info("drift: %s %s has no reference statistics: not sketched", m.name,
                 m.model_version)  # fmt: skip
        return None
    ref = m.drift_reference  # validated with the signed manifest
    assert ref is not None  # "drift_schema" in it: the manifest would not decode otherwise
    width = m.inputs[0].shape[-1] if m.inputs and m.inputs[0].shape else None
    if width is not None and width != ref.features:
        log.warning("drift: %s %s has %d inputs but reference statistics for %d", m.name,
                    m.model_version, width, ref.features)  # fmt: skip
        return None
    return Sketch(ref)


def _report(sketch: Sketch) -> dict[str, Any]:
    s = sketch.summary()
    psi, ks = np.asarray(s.psi), np.asarray(s.ks)
    report: dict[str, Any] = {
        "n": round(s.n, 2),
        "max_psi": round(s.max_psi, 4),
        "max_ks": round(s.max_ks, 4),
        "output_psi": None if s.output_psi is None else round(s.output_psi, 4),
        "nonfinite": round(s.nonfinite, 2),
    }
    if len(psi) > MAX_REPORTED:
        top = np.sort(np.argsort(-psi, kind="stable")[:MAX_REPORTED])
        report["features"] = [int(i) for i in top]
        psi, ks = psi[top], ks[top]
    report["psi"] = [round(float(v), 4) for v in psi]
    report["ks"] = [round(float(v), 4) for v in ks]
    return report
