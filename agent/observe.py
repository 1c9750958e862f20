"""Opt-in recording of ``Agent.predict``: per-model counters, latency, classes, confidence.

``Recorder(agent)`` wraps an agent: ``recorder.predict(x)`` / ``predict_versioned(x)`` answer
exactly as the agent does and also record the call. ``Agent.predict`` itself is untouched, so
code that does not opt in pays nothing. The daemon builds one recorder (``AgentDaemon.recorder``)
and the local HTTP API predicts through it.

The hot path takes no lock: each thread appends ``(version, output, nanoseconds)`` to its own
list, and every ``FOLD_EVERY`` calls (or when telemetry is read) the list is swapped out and
folded, vectorized, into the totals under a lock taken once per fold. What is recorded, per
model key ``name@version`` (``model_key``):

- ``count`` calls, ``errors`` calls that raised (``ValueError``, ``RuntimeError``: bad input or
  no model; recorded under ``NO_MODEL`` when nothing was active), ``rows`` inputs answered;
- ``lat``: counts per ``LATENCY_BOUNDS_MS`` bucket (milliseconds, the last bucket open), and
  ``p50_ms``/``p95_ms``/``p99_ms`` estimated from it (``quantile_ms``);
- ``classes``: rows per output class (argmax; classes past ``MAX_CLASSES`` counted as ``"+"``);
- ``conf``: rows per ``CONFIDENCE_BINS`` bin of the top-class confidence (the largest output
  if the outputs are probabilities, else the largest softmax), with ``conf_sum``/``conf_min``.
- ``labelled``/``correct``: predictions scored against a true label (below), present only
  when there were any.

Observers: ``add_observer(fn, share=...)`` makes ``fn(inputs, outputs, model_key)`` see about
``share`` of the calls (every ``round(1/share)``-th call of a thread, inputs copied), on one
background thread that polls a ring of ``OBSERVER_QUEUE`` samples every ``OBSERVER_POLL``
seconds (the request path only appends to a deque: no lock, no wake-up): when the ring is full
the oldest sample is dropped and counted (``observer_dropped``), and an observer that raises
is logged and counted (``observer_errors``); nothing reaches the request path.

Labels flowing back: ``issue(version, outputs)`` gives each row of an answer an id (the local
HTTP API returns them with ``POST /v1/predict``) and keeps the last ``remember`` rows (model
key, predicted class, output width) in a ring; ``label(id, true_class)`` scores one of them
once: ``labelled`` and ``correct`` (predicted class == the true one) count under the model key
that made the prediction, in the window of the label's arrival and in the totals. An id this
agent run did not issue, or issued more than ``remember`` rows ago, is ``UnknownPrediction``; a
second label for one id is ``AlreadyLabelled``. Neither touches the predict path.

``telemetry()`` is the ``inference`` source for ``Reporter.add_source``: the calls since the
previous read (``None`` if there were none), so a buffered message loses nothing.
``collector()`` is a prometheus-client collector of the cumulative totals (``/metrics``).
"""

from __future__ import annotations

import collections
import logging
import math
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from edgefleet.protocol.messages import CONFIDENCE_BINS, LATENCY_BOUNDS_MS

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from .agent import Agent
    from .store import InstalledVersion

__all__ = [
    "FOLD_EVERY",
    "MAX_CLASSES",
    "NO_MODEL",
    "OBSERVER_QUEUE",
    "REMEMBER",
    "AlreadyLabelled",
    "Observer",
    "Recorder",
    "UnknownPrediction",
    "model_key",
    "quantile_ms",
]

log = logging.getLogger(__name__)

Observer = Callable[[np.ndarray, np.ndarray, str], None]  # (inputs, outputs, model key)

FOLD_EVERY = 1024  # calls a thread records before it folds them (~1 ms of numpy) into the totals
MAX_CLASSES = 32  # output classes counted one by one per model; the rest as "+"
MAX_MODELS = 8  # model keys in one telemetry payload (the busiest)
OBSERVER_QUEUE = 256  # samples waiting for the observer thread
OBSERVER_POLL = 0.02  # s between the observer thread's looks at the ring
NO_MODEL = "-"  # the key of calls made while no model was active
REMEMBER = 16384  # predicted rows a label can still be reported for (~17 bytes each)
_BOUNDS_NS = np.array(LATENCY_BOUNDS_MS) * 1e6


def model_key(version: InstalledVersion | None) -> str:
    """``name@version`` of an installed version (``NO_MODEL`` for None)."""
    if version is None:
        return NO_MODEL
    return f"{version.manifest.name}@{version.manifest.model_version}"


def quantile_ms(lat: Iterable[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a ``LATENCY_BOUNDS_MS`` histogram, interpolated
    geometrically within its bucket; None for an empty histogram."""
    counts = list(lat)
    total = sum(counts)
    if total <= 0:
        return None
    rank, seen = q * total, 0
    bounds = LATENCY_BOUNDS_MS
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):  # the open bucket: its lower bound
                return float(bounds[-1])
            hi = bounds[i]
            lo = bounds[i - 1] if i else hi / math.sqrt(2)
            return float(lo * (hi / lo) ** ((rank - seen) / n))
        seen += n
    return float(LATENCY_BOUNDS_MS[-1])


class UnknownPrediction(LookupError):
    """A label for a prediction id this agent run did not issue, or no longer remembers."""


class AlreadyLabelled(RuntimeError):
    """A second label for one prediction."""


class _Stats:
    """What was recorded for one model key (totals or one telemetry window)."""

    __slots__ = ("classes", "conf", "conf_min", "conf_sum", "correct", "count", "errors",
                 "labelled", "lat", "lat_sum", "rows")  # fmt: skip

    def __init__(self) -> None:
        self.count = self.errors = self.rows = self.labelled = self.correct = 0
        self.lat = np.zeros(len(LATENCY_BOUNDS_MS) + 1, dtype=np.int64)
        self.lat_sum = 0.0  # ms
        self.classes = np.zeros(MAX_CLASSES + 1, dtype=np.int64)
        self.conf = np.zeros(CONFIDENCE_BINS, dtype=np.int64)
        self.conf_sum, self.conf_min = 0.0, 1.0

    def add(self, other: _Stats) -> None:
        self.count += other.count
        self.errors += other.errors
        self.rows += other.rows
        self.lat += other.lat
        self.lat_sum += other.lat_sum
        self.classes += other.classes
        self.conf += other.conf
        self.conf_sum += other.conf_sum
        self.conf_min = min(self.conf_min, other.conf_min)
        self.labelled += other.labelled
        self.correct += other.correct

    def to_dict(self) -> dict[str, Any]:
        """The telemetry form (lists cut after their last non-zero count)."""
        lat = _trim(self.lat)
        classes = {str(i): int(n) for i, n in enumerate(self.classes[:MAX_CLASSES]) if n}
        if self.classes[MAX_CLASSES]:
            classes["+"] = int(self.classes[MAX_CLASSES])
        return {
            "count": self.count,
            "errors": self.errors,
            "rows": self.rows,
            "lat": lat,
            "lat_sum_ms": round(self.lat_sum, 6),
            "p50_ms": quantile_ms(lat, 0.50),
            "p95_ms": quantile_ms(lat, 0.95),
            "p99_ms": quantile_ms(lat, 0.99),
            "classes": classes,
            "conf": _trim(self.conf),
            "conf_sum": round(self.conf_sum, 6),
            "conf_min": round(self.conf_min, 6) if self.rows else None,
        } | ({"labelled": self.labelled, "correct": self.correct} if self.labelled else {})


def _trim(counts: np.ndarray) -> list[int]:
    nz = np.flatnonzero(counts)
    return [int(n) for n in counts[: nz[-1] + 1]] if nz.size else []


class _Local:
    """One thread's calls not folded yet (only that thread appends to ``pending``)."""

    __slots__ = ("calls", "pending", "retired", "retired_done")
    pending: list[tuple[InstalledVersion | None, np.ndarray | None, int]]
    retired: list[tuple[InstalledVersion | None, np.ndarray | None, int]]
    retired_done: int  # items of ``retired`` already folded
    calls: int


_ID = re.compile(r"([0-9a-f]{8})-([0-9]{1,18})")


class _Issued:
    """The last ``size`` predicted rows, by sequence number: a ring of (model key, output
    width), the predicted class and whether it was labelled. Guarded by ``lock``."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"remember must be >= 1 rows, got {size}")
        self.size, self.next = size, 0
        self.run = secrets.token_hex(4)  # ids of another run (before a restart) are unknown
        self.keys: list[tuple[str, int] | None] = [None] * size
        self.predicted = [0] * size
        self.labelled = bytearray(size)
        self.lock = threading.Lock()

    def issue(self, key: str, top: list[int], width: int) -> list[str]:
        rows = len(top)
        entry = (key, width)
        with self.lock:
            first, self.next = self.next, self.next + rows
            for n in range(max(first, self.next - self.size), self.next):  # a huge batch: its tail
                slot = n % self.size
                self.keys[slot], self.predicted[slot] = entry, top[n - first]
                self.labelled[slot] = 0
        return [f"{self.run}-{n}" for n in range(first, first + rows)]

    def take(self, prediction_id: object, label: int) -> tuple[str, int]:
        """Mark one prediction labelled: its (model key, predicted class)."""
        m = _ID.fullmatch(prediction_id) if isinstance(prediction_id, str) else None
        if m is None or m.group(1) != self.run:
            raise UnknownPrediction(f"unknown prediction id {prediction_id!r:.40} (ids come "
                                    "from POST /v1/predict of this agent run)")  # fmt: skip
        n = int(m.group(2))
        with self.lock:
            if n >= self.next:
                raise UnknownPrediction(f"unknown prediction id {prediction_id!r}: not issued")
            if n < self.next - self.size:
                raise UnknownPrediction(f"prediction {prediction_id!r} expired: only the last "
                                        f"{self.size} predicted rows can be labelled")  # fmt: skip
            slot = n % self.size
            key, width = self.keys[slot] or (NO_MODEL, 0)
            if not 0 <= label < width:
                raise ValueError(f"label {label} is not a class of {key} (0..{width - 1})")
            if self.labelled[slot]:
                raise AlreadyLabelled(f"prediction {prediction_id!r} is already labelled")
            self.labelled[slot] = 1
            return key, self.predicted[slot]


class Recorder:
    """Records every call made through it; see the module docstring."""

    def __init__(
        self,
        agent: Agent,
        *,
        clock: Callable[[], int] = time.perf_counter_ns,
        remember: int = REMEMBER,  # predicted rows ``label`` can score (``issue``)
    ) -> None:
        self.agent = agent
        self._clock = clock
        self._issued = _Issued(remember)
        self._local = threading.local()  # .acc: this thread's _Local
        #: every live recording thread's lists, for folding from outside (a thread that ended
        #: is folded a last time and forgotten: the HTTP server runs a thread per connection)
        self._threads: list[tuple[weakref.ref[threading.Thread], _Local]] = []
        self._lock = threading.Lock()  # guards the totals, the window and ``_threads``
        self._totals: dict[str, _Stats] = {}
        self._window: dict[str, _Stats] = {}
        self._stride = 0  # sample every n-th call of a thread for the observers; 0 = none
        self._observers: list[tuple[Observer, float, list[float]]] = []  # fn, share, credit
        self._samples: collections.deque[tuple[np.ndarray, np.ndarray, str]] = collections.deque(
            maxlen=OBSERVER_QUEUE
        )
        self._observer_thread: threading.Thread | None = None
        self.observer_dropped = 0  # samples dropped: the observer queue was full
        self.observer_errors = 0  # observer calls that raised

    # -- the hot path ---------------------------------------------------------------------
    def predict(self, x: np.ndarray) -> np.ndarray:
        """``Agent.predict``, recorded."""
        return self.predict_versioned(x)[1]

    def predict_versioned(self, x: np.ndarray) -> tuple[InstalledVersion, np.ndarray]:
        """``Agent.predict_versioned``, recorded (a call that raises counts as an error)."""
        try:
            local: _Local = self._local.acc
        except AttributeError:
            local = self._register()
        pending = local.pending
        t0 = self._clock()
        try:
            version, out = self.agent.predict_versioned(x)
        except (ValueError, TypeError, RuntimeError):
            pending.append((self.agent.active, None, self._clock() - t0))
            raise
        pending.append((version, out, self._clock() - t0))
        if len(pending) >= FOLD_EVERY:
            self._fold(local)
        if self._stride:
            local.calls += 1
            if local.calls % self._stride == 0:
                self._sample(x, out, version)
        return version, out

    def _register(self) -> _Local:
        local = self._local.acc = _Local()
        local.pending, local.retired, local.retired_done, local.calls = [], [], 0, 0
        with self._lock:
            self._threads.append((weakref.ref(threading.current_thread()), local))
        return local

    # -- folding --------------------------------------------------------------------------
    def _fold(self, local: _Local) -> None:
        """Swap ``local``'s list out and add it to the totals (any thread may call this).

        A thread that read its list just before the swap may still append one call to it:
        the retired list is folded again, from where it was left, on the next fold.
        """
        with self._lock:
            batch, local.pending = local.pending, []
            items = local.retired[local.retired_done :] + batch
            local.retired, local.retired_done = batch, len(batch)
            self._add(items)

    def _add(self, items: list[tuple[InstalledVersion | None, np.ndarray | None, int]]) -> None:
        groups: dict[str, list[tuple[np.ndarray | None, int]]] = {}
        keys: dict[int, str] = {}
        for version, out, ns in items:
            key = keys.get(id(version))
            if key is None:
                key = keys[id(version)] = model_key(version)
            groups.setdefault(key, []).append((out, ns))
        for key, calls in groups.items():
            s = _summarize(calls)
            self._totals.setdefault(key, _Stats()).add(s)
            self._window.setdefault(key, _Stats()).add(s)

    def _fold_all(self) -> None:
        with self._lock:
            threads = list(self._threads)
        for ref, local in threads:
            thread = ref()
            ended = thread is None or not thread.is_alive()
            self._fold(local)
            if ended:
                self._fold(local)  # its retired list too: nobody appends any more
                with self._lock:
                    self._threads.remove((ref, local))

    # -- reading --------------------------------------------------------------------------
    def telemetry(self) -> dict[str, Any] | None:
        """The ``inference`` telemetry source: ``{model key: window}`` for the calls since the
        previous read (the ``MAX_MODELS`` busiest keys), or None if there were none."""
        self._fold_all()
        with self._lock:
            window, self._window = self._window, {}
        if not window:
            return None
        busiest = sorted(window.items(), key=lambda kv: -kv[1].count)[:MAX_MODELS]
        return {key: s.to_dict() for key, s in busiest}

    def totals(self) -> dict[str, dict[str, Any]]:
        """Everything recorded since the recorder was made, per model key (``/metrics``)."""
        self._fold_all()
        with self._lock:
            return {key: s.to_dict() for key, s in self._totals.items()}

    def collector(self) -> Collector:
        """A prometheus-client collector of ``totals()`` (for a ``CollectorRegistry``)."""
        from ._observe_prom import InferenceCollector

        return InferenceCollector(self)

    # -- labels (the HTTP API's, never the predict path) ---------------------------------------
    def issue(self, version: InstalledVersion, top: np.ndarray, width: int) -> list[str]:
        """Ids for the rows of one answer by ``version``: ``top`` its predicted class per row
        (``out.argmax(-1)``, computed once by the caller), ``width`` the classes; each id can
        be scored once by ``label`` while it is among the last ``remember`` rows. An answer
        that is not one class score vector per row (``top`` not 1-D) gets ids no label fits."""
        key = model_key(version)
        if top.ndim != 1:
            return self._issued.issue(key, [0] * (top.shape[0] if top.ndim else 1), 0)
        return self._issued.issue(key, top.tolist(), width)

    def label(self, prediction_id: object, label: int) -> tuple[str, int]:
        """Score prediction ``prediction_id`` against its true class ``label``: counted under
        the model key that made it; returns (model key, predicted class). Raises
        ``UnknownPrediction``, ``AlreadyLabelled``, or ValueError for a class out of range."""
        if isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(f"label must be a class index (an integer), saw {label!r:.40}")
        key, predicted = self._issued.take(prediction_id, label)
        with self._lock:
            for stats in (self._window, self._totals):
                s = stats.setdefault(key, _Stats())
                s.labelled += 1
                s.correct += predicted == label
        return key, predicted

    # -- observers ------------------------------------------------------------------------
    def add_observer(self, fn: Observer, *, share: float = 0.01) -> None:
        """Call ``fn(inputs, outputs, model_key)`` for about ``share`` (0 < share <= 1) of the
        calls, on the observer thread; ``fn`` must not modify the arrays."""
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share!r}")
        with self._lock:
            self._observers.append((fn, share, [0.0]))
            top = max(s for _, s, _ in self._observers)
            if self._observer_thread is None:
                self._observer_thread = threading.Thread(
                    target=self._observe, name="predict-observers", daemon=True
                )
                self._observer_thread.start()
            self._stride = max(1, round(1 / top))

    def _sample(self, x: np.ndarray, out: np.ndarray, version: InstalledVersion) -> None:
        if len(self._samples) == OBSERVER_QUEUE:
            self.observer_dropped += 1  # the append below pushes the oldest out
        self._samples.append((np.array(x, copy=True), out, model_key(version)))

    def _observe(self) -> None:
        while True:
            time.sleep(OBSERVER_POLL)
            while self._samples:
                self._dispatch(*self._samples.popleft())

    def _dispatch(self, x: np.ndarray, out: np.ndarray, key: str) -> None:
        with self._lock:
            observers = list(self._observers)
        top = max(s for _, s, _ in observers)
        for fn, share, credit in observers:
            credit[0] += share / top  # each observer sees its own share of the samples
            if credit[0] < 1.0:
                continue
            credit[0] -= 1.0
            try:
                fn(x, out, key)
            except Exception:
                self.observer_errors += 1
                if self.observer_errors & (self.observer_errors - 1) == 0:  # 1, 2, 4, 8...
                    log.exception("predict observer %r failed", fn)


def _summarize(calls: list[tuple[np.ndarray | None, int]]) -> _Stats:
    """One model's calls folded into a ``_Stats`` (vectorized: ~0.2 µs a call)."""
    s = _Stats()
    s.count = len(calls)
    ns = np.fromiter((c[1] for c in calls), dtype=np.float64, count=len(calls))
    s.lat += np.bincount(np.searchsorted(_BOUNDS_NS, ns, side="left"), minlength=len(s.lat))
    s.lat_sum = float(ns.sum()) / 1e6
    outs = [o for o, _ in calls if o is not None]
    s.errors = s.count - len(outs)
    if not outs:
        return s
    try:
        y = (
            np.concatenate(outs)
            if outs[0].ndim == 2
            else np.concatenate([o.reshape(o.shape[0], -1) for o in outs])
        )
    except ValueError:  # outputs of different shapes in one model: count only
        return s
    if y.ndim != 2 or y.shape[0] == 0 or y.shape[1] == 0:
        return s
    s.rows = y.shape[0]
    top = y.argmax(axis=1)
    s.classes += np.bincount(np.minimum(top, MAX_CLASSES), minlength=MAX_CLASSES + 1)
    y = y[np.isfinite(y).all(axis=1)].astype(np.float64, copy=False)
    if not y.size:
        return s
    best = y.max(axis=1)
    if y.min() >= 0.0 and best.max() <= 1.0 and np.abs(y.sum(axis=1) - 1.0).max() <= 1e-3:
        conf = best  # probabilities
    else:  # the top class's softmax: exp(0) / sum(exp(y - max))
        conf = 1.0 / np.exp(y - best[:, None]).sum(axis=1)
    bins = np.minimum((conf * CONFIDENCE_BINS).astype(np.int64), CONFIDENCE_BINS - 1)
    s.conf += np.bincount(bins, minlength=CONFIDENCE_BINS)
    s.conf_sum, s.conf_min = float(conf.sum()), float(conf.min())
    return s
