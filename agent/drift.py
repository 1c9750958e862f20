"""On-device drift: sketches of the live inputs and outputs per model, reported as summaries.

``DriftMonitor(agent)`` is a predict observer (``agent.observe.Recorder.add_observer``): it
sees a sampled share of the calls ``(inputs, outputs, model_key)`` on the recorder's observer
thread, and keeps one ``protocol.drift.Sketch`` per model key against the reference statistics
in that model's signed manifest (a model whose manifest carries none, or whose feature count
does not match, is not sketched). At most ``MAX_MODELS`` sketches are kept (the least recently
fed is dropped).

``telemetry()`` is the ``drift`` source for ``Reporter.add_source``: per model key fed since
the previous report, the summary of its window: ``n`` (rows, decayed), ``psi`` and ``ks`` per
feature (4 decimals; past ``MAX_REPORTED`` features only the highest-PSI ones, their indexes
in ``features``), ``max_psi``, ``max_ks``, ``output_psi`` (predicted classes against the
training class prior) and ``nonfinite`` rows. No input value ever leaves the device.

A reported sketch decays by ``decay`` when its next sample arrives (0.5: the window is about
the last two reports' traffic, weighted to the newest), so drift that starts late is not
diluted by a long healthy past, and an idle model keeps its last window (and is not reported
again). A report is the state of the window, not a delta: the coordinator keeps the latest
one per device and model.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
from edgefleet.protocol.drift import ReferenceStats, Sketch
from edgefleet.protocol.errors import DecodeError

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
DECAY = 0.5


def _key(version: InstalledVersion) -> str:
    return f"{version.manifest.name}@{version.manifest.model_version}"


class DriftMonitor:
    def __init__(self, agent: Agent, *, decay: float = DECAY) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay: expected 0..1, saw {decay}")
        self.agent, self.decay = agent, decay
        self._lock = threading.Lock()  # the observer thread feeds, the worker reports
        self._sketches: OrderedDict[str, Sketch | None] = OrderedDict()  # None: not sketched
        self._fed: set[str] = set()  # keys fed since their last report
        self._reported: set[str] = set()  # keys to decay before their next sample
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
            self._reported.discard(gone)
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
            if key in self._reported:
                self._reported.discard(key)
                sketch.decay(self.decay)
            sketch.update(x.reshape(len(x), -1), outputs)
            self._fed.add(key)

    def telemetry(self) -> dict[str, Any] | None:
        """The ``drift`` source: per model key its window's summary (None: nothing seen)."""
        out: dict[str, Any] = {}
        with self._lock:
            for key, sketch in self._sketches.items():
                if sketch is None or key not in self._fed or sketch.n <= 0:
                    continue
                out[key] = _report(sketch)
                self._reported.add(key)
            self._fed.clear()
        return out or None


def _new_sketch(version: InstalledVersion) -> Sketch | None:
    m = version.manifest
    if not m.reference_stats or "drift_schema" not in m.reference_stats:
        log.info("drift: %s %s has no reference statistics: not sketched", m.name,
                 m.model_version)  # fmt: skip
        return None
    try:
        ref = ReferenceStats.from_dict(m.reference_stats)  # verified already; checked again
    except DecodeError as exc:
        log.warning("drift: %s %s reference statistics unusable: %s", m.name, m.model_version,
                    exc)  # fmt: skip
        return None
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
