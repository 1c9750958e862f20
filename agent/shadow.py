"""Shadow: the candidate runs beside the active model on sampled live inputs, off the request path.

``Shadow.observe(inputs, outputs, model_key)`` is a ``Recorder`` observer (``agent.observe``):
the recorder hands it a sampled share of the calls on its observer thread, and ``observe`` only
puts the sample on the shadow's own queue (``queue`` samples; when it is full the sample is
dropped and counted, so a slow candidate never delays a request nor the other observers).
The shadow's worker thread then, per sample answered by the active model:

- runs the candidate on the same inputs (timed), and the active model again (timed, the
  same thread and conditions: the latency baseline);
- compares, row by row, the candidate's output with the output the active model answered:
  ``agree`` when the argmax is equal; the confidence delta is the candidate's top-class
  confidence minus the active's (the largest output: both models end in a softmax).

The shadow never answers a request: its outputs go nowhere but into these counts.

``telemetry()`` is the ``shadow`` source for ``Reporter.add_source``: the window since the
previous call (None if nothing happened), as summable counts and sums, so a coordinator adds
windows up and divides (``agreement = agree / compared``, ``latency_ratio = candidate_ms_sum /
active_ms_sum``, mean confidence delta ``= conf_delta_sum / compared``); each window also
carries those ratios for itself. ``totals()`` is the same since the candidate was installed
(what ``GET /v1/candidate`` shows). A new candidate (or none) resets both.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .candidate import CandidateSlot, Serving
from .observe import model_key

__all__ = ["SHADOW_QUEUE", "Shadow", "ShadowStats"]

log = logging.getLogger(__name__)
SHADOW_QUEUE = 64  # samples waiting for the shadow's worker


class ShadowStats:
    """Counts and sums for one window (or the totals); ``to_dict`` is the telemetry form."""

    __slots__ = ("active_ns", "agree", "candidate_ns", "compared", "conf_abs", "conf_delta",
                 "dropped", "errors", "samples", "skipped")  # fmt: skip

    def __init__(self) -> None:
        self.samples = self.compared = self.agree = 0  # samples run; rows compared; rows agreeing
        self.dropped = self.errors = self.skipped = 0  # queue full; candidate raised; not active
        self.candidate_ns = self.active_ns = 0  # time in each model's runs, nanoseconds
        self.conf_delta = self.conf_abs = 0.0  # sums over rows of (candidate - active) top conf

    def empty(self) -> bool:
        return not (self.samples or self.dropped or self.errors or self.skipped)

    def to_dict(self) -> dict[str, Any]:
        n = self.compared
        return {
            "samples": self.samples,
            "compared": n,
            "agree": self.agree,
            "dropped": self.dropped,
            "errors": self.errors,
            "skipped": self.skipped,
            "candidate_ms_sum": round(self.candidate_ns / 1e6, 6),
            "active_ms_sum": round(self.active_ns / 1e6, 6),
            "conf_delta_sum": round(self.conf_delta, 6),
            "conf_delta_abs_sum": round(self.conf_abs, 6),
            "agreement": self.agree / n if n else None,
            "latency_ratio": self.candidate_ns / self.active_ns if self.active_ns else None,
            "conf_delta_mean": self.conf_delta / n if n else None,
        }


def compare(active_out: np.ndarray, candidate_out: np.ndarray) -> tuple[int, int, float, float]:
    """(rows, rows whose argmax agrees, sum and sum of |.| of the top-confidence deltas)."""
    a = np.asarray(active_out, dtype=np.float64).reshape(len(active_out), -1)
    c = np.asarray(candidate_out, dtype=np.float64).reshape(len(candidate_out), -1)
    if a.shape != c.shape:
        raise ValueError(f"candidate output shape {c.shape} differs from the active's {a.shape}")
    delta = c.max(axis=1) - a.max(axis=1)
    agree = int((a.argmax(axis=1) == c.argmax(axis=1)).sum())
    return a.shape[0], agree, float(delta.sum()), float(np.abs(delta).sum())


class Shadow:
    """Compares the candidate slot's model with the active one on observed samples."""

    def __init__(
        self,
        slot: CandidateSlot,
        active: Callable[[], Serving | None],  # the active (version, runtime), e.g. Agent.serving
        *,
        queue_size: int = SHADOW_QUEUE,
        clock: Callable[[], int] = time.perf_counter_ns,
    ) -> None:
        self.slot, self._active, self._clock = slot, active, clock
        self._q: queue.Queue[tuple[np.ndarray, np.ndarray, str] | None] = queue.Queue(queue_size)
        self._lock = threading.Lock()  # guards the stats and the candidate they are about
        self._window, self._totals = ShadowStats(), ShadowStats()
        self._about: Serving | None = None  # the candidate the stats are about
        self._idle = threading.Condition(self._lock)
        self._busy = 0  # samples taken off the queue and not yet counted
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        slot.listeners.append(self._reset)
        self._reset(slot.serving)
        self._thread.start()

    @property
    def running(self) -> bool:
        """True while a shadow candidate is being compared."""
        serving = self.slot.serving
        return serving is not None and _mode(serving) == "shadow"

    # -- observer thread (never blocks) ----------------------------------------------------
    def observe(self, inputs: np.ndarray, outputs: np.ndarray, key: str) -> None:
        if not self.running:
            return
        try:
            self._q.put_nowait((inputs, outputs, key))
        except queue.Full:
            with self._lock:
                self._window.dropped += 1
                self._totals.dropped += 1

    # -- the worker ------------------------------------------------------------------------
    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            with self._lock:
                self._busy += 1
            try:
                self._compare(*item)
            except Exception:  # a bug: count it as a candidate error, keep running
                log.exception("shadow comparison failed")
                self._count(lambda s: setattr(s, "errors", s.errors + 1))
            finally:
                with self._lock:
                    self._busy -= 1
                    self._idle.notify_all()

    def _compare(self, x: np.ndarray, answered: np.ndarray, key: str) -> None:
        candidate, active = self.slot.serving, self._active()
        if candidate is None or _mode(candidate) != "shadow":
            return
        if active is None or model_key(active[0]) != key:  # answered by another model
            self._count(lambda s: setattr(s, "skipped", s.skipped + 1))
            return
        if model_key(candidate[0]) == key:  # the candidate is the active model now: a model
            self._count(lambda s: setattr(s, "skipped", s.skipped + 1))  # never disagrees
            return  # with itself, and agreement 1 would dilute its real evidence
        t0 = self._clock()
        try:
            out = candidate[1].run(x)
        except (ValueError, RuntimeError) as exc:
            log.debug("shadow candidate failed on a sample: %s", exc)
            self._count(lambda s: setattr(s, "errors", s.errors + 1), about=candidate)
            return
        t1 = self._clock()
        active[1].run(x)
        t2 = self._clock()
        rows, agree, delta, delta_abs = compare(answered, out)

        def add(s: ShadowStats) -> None:
            s.samples += 1
            s.compared += rows
            s.agree += agree
            s.candidate_ns += t1 - t0
            s.active_ns += t2 - t1
            s.conf_delta += delta
            s.conf_abs += delta_abs

        self._count(add, about=candidate)

    def _count(self, add: Callable[[ShadowStats], None], about: Serving | None = None) -> None:
        with self._lock:
            if about is not None and about is not self._about:
                return  # a sample of a candidate replaced meanwhile
            add(self._window)
            add(self._totals)

    def _reset(self, serving: Serving | None) -> None:
        with self._lock:
            self._about = serving
            self._window, self._totals = ShadowStats(), ShadowStats()

    # -- reading ---------------------------------------------------------------------------
    def telemetry(self) -> dict[str, Any] | None:
        """The ``shadow`` telemetry source: the window since the previous call, or None."""
        with self._lock:
            window, self._window = self._window, ShadowStats()
            about = self._about
        if about is None or window.empty():
            return None
        return {**_describe(about, self._active()), **window.to_dict()}

    def totals(self) -> dict[str, Any] | None:
        with self._lock:
            about, totals = self._about, self._totals.to_dict()
        if about is None or _mode(about) != "shadow":
            return None
        return {**_describe(about, self._active()), **totals}

    def drain(self, timeout: float) -> bool:
        """Wait until every queued sample has been counted (tests, the CLI); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while not (self._q.empty() and self._busy == 0):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.05))
        return True

    def close(self) -> None:
        """Stop the worker (idempotent)."""
        if self._reset not in self.slot.listeners:
            return
        self.slot.listeners.remove(self._reset)
        try:
            self._q.put(None, timeout=1.0)
        except queue.Full:
            return
        self._thread.join(timeout=5.0)


def _mode(serving: Serving) -> str | None:
    spec = serving[0].manifest.candidate
    return None if spec is None else spec.mode


def _describe(candidate: Serving, active: Serving | None) -> dict[str, Any]:
    m = candidate[0].manifest
    return {
        "candidate": model_key(candidate[0]),
        "sequence": m.sequence,
        "bundle_id": m.bundle_id,
        "active": None if active is None else model_key(active[0]),
    }
