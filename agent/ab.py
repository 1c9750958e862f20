"""A/B on the device: a signed share of the requests answered by the candidate, per-arm metrics.

While the candidate slot serves an ``ab`` candidate (``CandidateSpec.share``, signed with
it), ``ABRouter`` is the agent's ``router``: ``Agent.predict_versioned`` (what the HTTP API and
the ``Recorder`` call; ``Agent.predict`` stays the active model only) hands each request to it.
The arm is chosen by a keyed hash of the request: BLAKE2b-64 of the input bytes, keyed with the
candidate's bundle id, read as a number in [0, 1); below ``share`` the candidate answers. So
the same input always goes to the same arm for one candidate (a retry does not flip the
answer), the split differs between candidates, and no state or randomness is needed.

Per arm (``active``, ``candidate``) it counts requests, rows, errors, latency (a
``LATENCY_BOUNDS_MS`` histogram; its sum and p50/p95) and output classes (argmax). A candidate
that raises is counted as a candidate error and the request is answered by the active model
(``fallbacks``): a bad candidate costs its own metrics, never a failed request.

``telemetry()`` is the ``ab`` source: the window since the previous call (None if empty), with
the candidate's ``model`` key, ``sequence``, ``bundle_id``, ``share``, one object per arm and
``fallbacks``; ``totals()`` the same since the candidate was installed. How a rollout gate
reads it: compare the arms of the same device over the same window, the candidate's
``errors / count`` against the active's and its ``p95_ms`` over the active's (the
``inference`` namespace has the full histograms per model key, which the router's split feeds
too). Promotion is an ordinary release of the candidate's model; dropping is clearing it.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from edgefleet.protocol.messages import LATENCY_BOUNDS_MS

from .candidate import CandidateSlot, Serving
from .observe import model_key, quantile_ms
from .store import InstalledVersion

__all__ = ["ABRouter", "ArmStats", "arm_of"]

_BOUNDS_NS = [b * 1e6 for b in LATENCY_BOUNDS_MS]
MAX_CLASSES = 32  # classes counted one by one; the rest as "+"


def arm_of(x: np.ndarray, key: bytes, share: float) -> bool:
    """True if the candidate answers ``x``: the keyed hash of its bytes is below ``share``."""
    if share <= 0.0:
        return False
    data = (x if x.dtype == np.float32 else x.astype(np.float32)).tobytes()  # C order
    h = hashlib.blake2b(data, key=key[:64], digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64 < share


class ArmStats:
    __slots__ = ("classes", "count", "errors", "lat", "lat_ns", "rows")

    def __init__(self) -> None:
        self.count = self.errors = self.rows = self.lat_ns = 0
        self.lat = [0] * (len(LATENCY_BOUNDS_MS) + 1)
        self.classes: dict[str, int] = {}

    def add(self, ns: int, bucket: int, classes: list[str] | None) -> None:
        self.count += 1
        self.lat_ns += ns
        self.lat[bucket] += 1
        if classes is None:
            self.errors += 1
            return
        self.rows += len(classes)
        for k in classes:
            self.classes[k] = self.classes.get(k, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "rows": self.rows,
            "errors": self.errors,
            "lat_ms_sum": round(self.lat_ns / 1e6, 6),
            "p50_ms": quantile_ms(self.lat, 0.50),
            "p95_ms": quantile_ms(self.lat, 0.95),
            "classes": dict(sorted(self.classes.items())),
        }


class _Window:
    def __init__(self) -> None:
        self.arms = {"active": ArmStats(), "candidate": ArmStats()}
        self.fallbacks = 0

    def empty(self) -> bool:
        return not any(a.count for a in self.arms.values())

    def to_dict(self) -> dict[str, Any]:
        return {**{k: a.to_dict() for k, a in self.arms.items()}, "fallbacks": self.fallbacks}


class ABRouter:
    """Routes requests between the active model and an ``ab`` candidate; see the module doc."""

    def __init__(
        self,
        slot: CandidateSlot,
        predict_active: Callable[[np.ndarray], tuple[InstalledVersion, np.ndarray]],
        *,
        attach: Callable[[ABRouter | None], None] = lambda router: None,
        clock: Callable[[], int] = time.perf_counter_ns,
    ) -> None:
        self.slot, self._predict_active, self._clock = slot, predict_active, clock
        self._attach = attach  # e.g. ``lambda r: setattr(agent, "router", r)``
        self._lock = threading.Lock()
        self._window, self._totals = _Window(), _Window()
        self._about: Serving | None = None
        self._hasher, self._share = hashlib.blake2b(digest_size=8), 0.0  # keyed for ``_about``
        slot.listeners.append(self._reset)
        self._reset(slot.serving)

    def _reset(self, serving: Serving | None) -> None:
        ab = serving is not None and _spec(serving) is not None
        with self._lock:
            if serving is not None and ab:  # key and share first: ``__call__`` reads unlocked
                key = bytes.fromhex(serving[0].manifest.bundle_id)
                self._hasher = hashlib.blake2b(key=key, digest_size=8)  # copied per request
                self._share = _spec(serving) or 0.0
            self._about = serving if ab else None
            self._window, self._totals = _Window(), _Window()
        self._attach(self if ab else None)

    def __call__(self, x: np.ndarray) -> tuple[InstalledVersion, np.ndarray]:
        about = self._about
        if about is None:
            return self._predict_active(x)
        version, runtime = about
        h = self._hasher.copy()  # cheaper than keying a new one (arm_of, in effect)
        h.update((x if x.dtype == np.float32 else x.astype(np.float32)).tobytes())
        if int.from_bytes(h.digest(), "big") / 2.0**64 >= self._share:
            return self._timed("active", x, about)
        t0 = self._clock()
        try:
            out = runtime.run(x)
        except (ValueError, TypeError, RuntimeError):
            self._record("candidate", self._clock() - t0, None, about, fallback=True)
            return self._timed("active", x, about)
        self._record("candidate", self._clock() - t0, out, about)
        return version, out

    def _timed(
        self, arm: str, x: np.ndarray, about: Serving
    ) -> tuple[InstalledVersion, np.ndarray]:
        t0 = self._clock()
        try:
            version, out = self._predict_active(x)
        except (ValueError, TypeError, RuntimeError):
            self._record(arm, self._clock() - t0, None, about)
            raise
        self._record(arm, self._clock() - t0, out, about)
        return version, out

    def _record(
        self, arm: str, ns: int, out: np.ndarray | None, about: Serving, *, fallback: bool = False
    ) -> None:
        bucket = bisect.bisect_left(_BOUNDS_NS, ns)
        classes = None
        if out is not None:  # argmax per row, once
            ids = out.argmax(axis=-1).ravel().tolist() if len(out) > 1 else [int(out.argmax())]
            classes = [str(c) if c < MAX_CLASSES else "+" for c in ids]
        with self._lock:
            if about is not self._about:
                return
            for w in (self._window, self._totals):
                w.arms[arm].add(ns, bucket, classes)
                w.fallbacks += fallback

    def telemetry(self) -> dict[str, Any] | None:
        """The ``ab`` telemetry source: the window since the previous call, or None."""
        with self._lock:
            window, self._window = self._window, _Window()
            about = self._about
        if about is None or window.empty():
            return None
        return {**_describe(about), **window.to_dict()}

    def totals(self) -> dict[str, Any] | None:
        with self._lock:
            about, totals = self._about, self._totals.to_dict()
        return None if about is None else {**_describe(about), **totals}

    def close(self) -> None:
        """Detach from the agent (idempotent)."""
        if self._reset in self.slot.listeners:
            self.slot.listeners.remove(self._reset)
        self._attach(None)


def _spec(serving: Serving) -> float | None:
    """The A/B share of an ``ab`` candidate, else None."""
    spec = serving[0].manifest.candidate
    return spec.share if spec is not None and spec.mode == "ab" else None


def _describe(about: Serving) -> dict[str, Any]:
    m = about[0].manifest
    return {"model": model_key(about[0]), "sequence": m.sequence, "bundle_id": m.bundle_id,
            "share": _spec(about)}  # fmt: skip
