"""Drift statistics: reference statistics, bounded streaming sketches, PSI and KS (numpy only).

``reference_stats(x, y)`` summarizes training data as the manifest carries it
(``Manifest.reference_stats``, validated by ``ReferenceStats.from_dict``): per feature the cut
points of its histogram (from training quantiles), the training share of each bin, a few
quantiles, mean and variance, plus the class prior.

Bins are right-closed: bin ``i`` holds ``cuts[i-1] < x <= cuts[i]``, bin 0 everything up to
``cuts[0]`` (the training minimum) and the last bin everything above ``cuts[-1]`` (the training
maximum: empty in the reference, so values beyond the training range count as drift).

``Sketch`` keeps, for one model, histogram counts over those cuts, a running mean/variance
(Chan's merge) and predicted-class counts: memory is O(features x bins) whatever the traffic,
and no input is kept. ``decay(f)`` scales everything by ``f`` (a sliding window in effect).

KS is computed on the binned CDFs (the reference's and the live ones at the cut points): an
approximation chosen over an exact KS on a reservoir of raw inputs because it needs no raw
input on the device, stays O(bins) in memory, and sketches merge by adding counts. It equals
the exact two-sample statistic when every observed value is a cut point (discrete features
such as digit pixels) and otherwise underestimates it by at most the largest single-bin share
of either sample (``exact <= binned + max bin share``).

PSI is ``sum((live - ref) * ln(live / ref))`` over bins, with each share floored at ``EPS``
so empty bins stay finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DecodeError

__all__ = [
    "EPS",
    "QUANTILES",
    "DriftSummary",
    "ReferenceStats",
    "Sketch",
    "ks_binned",
    "psi",
    "reference_stats",
]

EPS = 1e-4  # share floor in PSI
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
DEFAULT_BINS = 10
MAX_FEATURES = 1024
MAX_BINS = 64  # histogram bins per feature
MAX_CLASSES = 1024
MAX_VALUES = 40_000  # numbers in all of the reference statistics (keeps the manifest small)
SCHEMA = 1
_CHUNK = 1 << 20  # comparisons per step of ``Sketch.update`` (its scratch memory)
_KEYS = {"drift_schema", "n", "cuts", "ref", "quantiles", "mean", "var", "std", "class_prior"}


_NUMBERS = frozenset({int, float})  # exactly: a bool is not a number here


def _floats(value: object, what: str, n: int | None = None) -> np.ndarray:
    if not isinstance(value, list) or (n is not None and len(value) != n):
        raise DecodeError(f"{what}: expected a list of {n if n is not None else 'some'} numbers")
    # one pass over the types, then numpy for finiteness: a manifest holds thousands of these
    if not {type(v) for v in value} <= _NUMBERS:
        bad = next(v for v in value if type(v) not in _NUMBERS)
        raise DecodeError(f"{what}: expected finite numbers, saw {bad!r:.20}")
    try:
        a = np.asarray(value, dtype=np.float64)
        finite = bool(np.isfinite(a).all())
    except OverflowError:  # an int beyond float64
        finite = False
    if not finite:
        bad = next(v for v in value if not _finite(v))
        raise DecodeError(f"{what}: expected finite numbers, saw {bad!r:.20}")
    return a


def _finite(v: float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _shares(value: object, what: str, n: int) -> np.ndarray:
    a = _floats(value, what, n)
    if (a < 0).any() or abs(float(a.sum()) - 1.0) > 1e-3:
        raise DecodeError(f"{what}: expected non-negative shares summing to 1")
    return a


@dataclass(frozen=True, eq=False)
class ReferenceStats:
    """The validated reference: ``cuts[f]`` increasing, ``ref[f]`` of ``len(cuts[f]) + 1``."""

    n: int  # training rows
    cuts: tuple[np.ndarray, ...]
    ref: tuple[np.ndarray, ...]
    quantiles: np.ndarray  # [features, len(QUANTILES)]
    mean: np.ndarray
    var: np.ndarray
    class_prior: np.ndarray | None

    @property
    def features(self) -> int:
        return len(self.cuts)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReferenceStats:
        """Strict: any malformed or oversize part is one ``DecodeError``."""
        if not isinstance(d, Mapping) or d.get("drift_schema") != SCHEMA:
            raise DecodeError(f"reference_stats: expected drift_schema {SCHEMA}")
        if unknown := set(d) - _KEYS:
            raise DecodeError(f"reference_stats: unexpected fields {sorted(unknown)}")
        n, cuts_in, ref_in = d.get("n"), d.get("cuts"), d.get("ref")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DecodeError("reference_stats.n: expected a positive integer")
        if not isinstance(cuts_in, list) or not isinstance(ref_in, list):
            raise DecodeError("reference_stats: expected lists cuts and ref")
        f = len(cuts_in)
        if not 0 < f <= MAX_FEATURES or len(ref_in) != f:
            raise DecodeError(f"reference_stats: expected 1..{MAX_FEATURES} features in both "
                              "cuts and ref")  # fmt: skip
        if sum(len(c) if isinstance(c, list) else 0 for c in cuts_in) * 2 > MAX_VALUES:
            raise DecodeError(f"reference_stats: more than {MAX_VALUES} numbers")
        cuts, ref = [], []
        for i, (c, r) in enumerate(zip(cuts_in, ref_in, strict=True)):
            ci = _floats(c, f"reference_stats.cuts[{i}]")
            if not 0 < len(ci) < MAX_BINS or (np.diff(ci) <= 0).any():
                raise DecodeError(f"reference_stats.cuts[{i}]: expected 1..{MAX_BINS - 1} "
                                  "increasing numbers")  # fmt: skip
            cuts.append(ci)
            ref.append(_shares(r, f"reference_stats.ref[{i}]", len(ci) + 1))
        q = d.get("quantiles")
        if not isinstance(q, list) or len(q) != f:
            raise DecodeError("reference_stats.quantiles: expected one list per feature")
        quantiles = np.stack([_floats(r, "reference_stats.quantiles", len(QUANTILES)) for r in q])
        var = _floats(d.get("var"), "reference_stats.var", f)
        if (var < 0).any():
            raise DecodeError("reference_stats.var: expected non-negative numbers")
        prior = d.get("class_prior")
        if prior is not None:
            if not isinstance(prior, list) or not 1 < len(prior) <= MAX_CLASSES:
                raise DecodeError(f"reference_stats.class_prior: expected 2..{MAX_CLASSES} shares")
            prior = _shares(prior, "reference_stats.class_prior", len(prior))
        return cls(n=n, cuts=tuple(cuts), ref=tuple(ref), quantiles=quantiles,
                   mean=_floats(d.get("mean"), "reference_stats.mean", f), var=var,
                   class_prior=prior)  # fmt: skip


def _r(a: np.ndarray, digits: int = 6) -> list[float]:
    return [float(v) for v in np.round(a.astype(np.float64), digits)]


def reference_stats(
    x: np.ndarray, y: np.ndarray | None = None, *, bins: int = DEFAULT_BINS, n_classes: int = 0
) -> dict[str, Any]:
    """The reference statistics of training inputs ``x`` [N, F] (and labels ``y``), as JSON.

    Cut points are the distinct training quantiles at ``0, 1/bins, ..., 1`` (so the minimum
    and the maximum are cuts; kept unrounded so the maximum stays one); a discrete feature
    gets fewer bins. Shares and quantiles are rounded (8 and 6 decimals), moments are not.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or not 0 < x.shape[1] <= MAX_FEATURES or x.shape[0] < 2:
        raise ValueError(f"expected x of shape [N >= 2, 1..{MAX_FEATURES}], saw {x.shape}")
    if not 2 <= bins < MAX_BINS:
        raise ValueError(f"bins: expected 2..{MAX_BINS - 1}, saw {bins}")
    if not np.isfinite(x).all():
        raise ValueError("x: expected finite numbers")
    levels = np.quantile(x, np.linspace(0.0, 1.0, bins + 1), axis=0)  # [bins + 1, F]
    cuts, ref = [], []
    for f in range(x.shape[1]):
        c = np.unique(levels[:, f])
        counts = np.bincount(np.searchsorted(c, x[:, f], side="left"), minlength=len(c) + 1)
        cuts.append([float(v) for v in c])
        ref.append(_r(counts / x.shape[0], 8))
    out: dict[str, Any] = {
        "drift_schema": SCHEMA,
        "n": int(x.shape[0]),
        "cuts": cuts,
        "ref": ref,
        "quantiles": [_r(q) for q in np.quantile(x, QUANTILES, axis=0).T],
        "mean": [float(v) for v in x.mean(axis=0)],
        "var": [float(v) for v in x.var(axis=0)],
        "std": [float(v) for v in x.std(axis=0)],
    }
    if y is not None:
        k = max(n_classes, int(np.max(y)) + 1)
        out["class_prior"] = _r(np.bincount(np.asarray(y, dtype=np.int64), minlength=k) / len(y), 8)
    return out


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two share vectors (each floored at ``EPS``)."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), EPS)
    a = np.maximum(np.asarray(actual, dtype=np.float64), EPS)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_binned(expected: np.ndarray, actual: np.ndarray) -> float:
    """KS statistic on the binned CDFs: ``max |cumsum(expected) - cumsum(actual)|``."""
    return float(np.max(np.abs(np.cumsum(expected) - np.cumsum(actual))))


@dataclass(frozen=True, kw_only=True)
class DriftSummary:
    """What a device reports for one model: no inputs, only these numbers."""

    n: float  # samples in the (decayed) window
    psi: tuple[float, ...]  # per feature
    ks: tuple[float, ...]  # per feature
    output_psi: float | None  # predicted-class shares vs the training class prior
    nonfinite: float = 0.0  # rows skipped for NaN/inf

    @property
    def max_psi(self) -> float:
        return max(self.psi, default=0.0)

    @property
    def max_ks(self) -> float:
        return max(self.ks, default=0.0)


class Sketch:
    """Streaming histogram counts, mean/variance and class counts of one model's traffic."""

    def __init__(self, reference: ReferenceStats) -> None:
        self.reference = reference
        f = reference.features
        width = max(len(c) for c in reference.cuts)
        self._cuts = np.full((f, width), np.inf)  # padded with +inf: never "x > cut"
        for i, c in enumerate(reference.cuts):
            self._cuts[i, : len(c)] = c
        self._bins = width + 1
        self._offsets = np.arange(f) * self._bins
        self.counts = np.zeros((f, self._bins))
        self.n = 0.0
        self.mean = np.zeros(f)
        self.m2 = np.zeros(f)
        k = 0 if reference.class_prior is None else len(reference.class_prior)
        self.classes = np.zeros(k)
        self.nonfinite = 0.0

    def update(self, x: np.ndarray, outputs: np.ndarray | None = None) -> None:
        """Add a batch ``x`` [B, F] (and the model's ``outputs`` [B, C]); wrong widths are
        ignored (``ValueError``), rows with NaN/inf are counted, not binned."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.reference.features:
            raise ValueError(f"expected inputs [B, {self.reference.features}], saw {x.shape}")
        ok = np.isfinite(x).all(axis=1)
        if not ok.all():
            self.nonfinite += float((~ok).sum())
            x = x[ok]
            outputs = None if outputs is None else np.asarray(outputs)[ok]
        if not len(x):
            return
        step = max(1, _CHUNK // self._cuts.size)  # rows per comparison: bounded scratch
        for i in range(0, len(x), step):
            part = x[i : i + step]
            bins = (part[:, :, None] > self._cuts[None, :, :]).sum(axis=2)  # [B, F]
            flat = np.bincount((bins + self._offsets).ravel(), minlength=self.counts.size)
            self.counts += flat.reshape(self.counts.shape)
        self._merge_moments(x)
        if outputs is not None and len(self.classes):
            out = np.asarray(outputs)
            if out.ndim == 2 and out.shape[1] == len(self.classes):
                self.classes += np.bincount(out.argmax(axis=1), minlength=len(self.classes))

    def _merge_moments(self, x: np.ndarray) -> None:
        nb = float(len(x))
        mb = x.mean(axis=0)
        m2b = ((x - mb) ** 2).sum(axis=0)
        total = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / total)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / total)
        self.n = total

    @property
    def var(self) -> np.ndarray:
        return self.m2 / self.n if self.n else np.zeros_like(self.m2)

    def decay(self, factor: float) -> None:
        """Scale every count by ``factor`` in [0, 1] (0 clears): older traffic weighs less."""
        if not 0.0 <= factor <= 1.0:
            raise ValueError(f"decay factor: expected 0..1, saw {factor}")
        self.counts *= factor
        self.classes *= factor
        self.m2 *= factor
        self.n *= factor
        self.nonfinite *= factor

    def shares(self, feature: int) -> np.ndarray:
        k = len(self.reference.cuts[feature]) + 1
        c = self.counts[feature, :k]
        return c / c.sum() if c.sum() > 0 else np.zeros(k)

    def summary(self) -> DriftSummary:
        ref = self.reference
        if self.counts[0].sum() <= 0:
            zeros = tuple(0.0 for _ in range(ref.features))
            return DriftSummary(n=0.0, psi=zeros, ks=zeros, output_psi=None,
                                nonfinite=self.nonfinite)  # fmt: skip
        live = [self.shares(f) for f in range(ref.features)]
        out = None
        if ref.class_prior is not None and self.classes.sum() > 0:
            out = psi(ref.class_prior, self.classes / self.classes.sum())
        return DriftSummary(
            n=float(self.counts[0].sum()),
            psi=tuple(psi(r, a) for r, a in zip(ref.ref, live, strict=True)),
            ks=tuple(ks_binned(r, a) for r, a in zip(ref.ref, live, strict=True)),
            output_psi=out,
            nonfinite=self.nonfinite,
        )
