"""Reference statistics for drift, from the training data of a model.

``training_stats`` is what a trainer puts in its metadata (``feature_stats``, which
``model register`` stores and every release manifest carries as ``reference_stats``);
``stats_from_file`` reads the training inputs (and labels) of a model trained elsewhere
from a ``.npz`` (arrays ``x`` [N, F] and optionally ``y`` [N]) for ``model register
--reference-data``. The statistics themselves are ``protocol.drift.reference_stats``.

Without the raw rows (a federated run: samples never leave the devices) the same statistics
are built from mergeable counts. Each device reports ``summarize(x, y, edges, n_classes)``:
its row count, per-feature histogram counts over ``edges`` (fixed in advance by the
coordinator, the same on every device, right-closed bins as in ``protocol.drift``), per-feature
sums and sums of squares, and its class counts: counts only, no row. The coordinator checks
each with ``parse_summary`` (untrusted: ``MalformedError``), adds them (``LocalSummary.merge``)
and ``stats_from_summary`` turns the total into ``reference_stats`` form:

- cut points are the grid edges at or above the merged quantiles ``0, 1/bins, ..., 1`` (the
  first edge holding that share of the rows), so each bin's share is the exact share of the
  merged rows;
- mean, variance and the class prior are exact (from the sums and counts);
- the reported quantiles are interpolated linearly inside grid bins: within one grid bin
  width of the merged rows' own (inverted-CDF) quantiles; values outside ``edges`` count in
  the outermost bins and are placed at the edge.

For features whose values all sit on grid edges (digit pixels k/16 on a 1/32 grid) the cuts
are the rows' own inverted-CDF quantiles (``reference_stats`` interpolates between rows, so
its cuts can differ by one value); otherwise they are the grid edges just above those.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edgefleet.protocol.drift import DEFAULT_BINS, QUANTILES, SCHEMA, reference_stats
from edgefleet.protocol.errors import MalformedError

__all__ = [
    "MAX_REFERENCE_FILE",
    "LocalSummary",
    "parse_summary",
    "stats_from_file",
    "stats_from_summary",
    "summarize",
    "training_stats",
    "uniform_edges",
]

MAX_REFERENCE_FILE = 512 * 1024 * 1024  # bytes of a reference-data file


def training_stats(
    x: np.ndarray, y: np.ndarray | None = None, *, n_classes: int = 0, bins: int = DEFAULT_BINS
) -> dict[str, Any]:
    """Per-feature histogram cuts (training quantiles) and shares, quantiles, mean, variance,
    standard deviation, and the class prior of ``y`` over ``n_classes`` (or max label + 1)."""
    return reference_stats(x, y, bins=bins, n_classes=n_classes)


def stats_from_file(path: Path, *, n_classes: int = 0) -> dict[str, Any]:
    """``training_stats`` of a ``.npz`` with ``x`` (and ``y``); ``ValueError`` if it is not one."""
    if path.suffix != ".npz":
        raise ValueError(f"{path}: expected a .npz file with arrays x (and y)")
    if path.stat().st_size > MAX_REFERENCE_FILE:
        raise ValueError(f"{path}: larger than {MAX_REFERENCE_FILE} bytes")
    try:
        with np.load(path, allow_pickle=False) as data:
            x = np.asarray(data["x"], dtype=np.float64)
            y = np.asarray(data["y"]) if "y" in data.files else None
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a .npz with an array x: {exc}") from exc
    if y is not None and (y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer)
                          or (y < 0).any()):  # fmt: skip
        raise ValueError(f"{path}: y must hold one non-negative integer label per row of x")
    return training_stats(x.reshape(len(x), -1), y, n_classes=n_classes)


def uniform_edges(lo: float, hi: float, bins: int) -> np.ndarray:
    """``bins + 1`` evenly spaced edges from ``lo`` to ``hi`` (a grid fixed in advance)."""
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi) or not 1 <= bins <= 1024:
        raise ValueError(f"grid: expected finite lo < hi and 1..1024 bins, saw {lo}, {hi}, {bins}")
    return np.linspace(lo, hi, bins + 1)


@dataclass(frozen=True, eq=False)
class LocalSummary:
    """Mergeable counts of some training rows: no row is kept."""

    n: int  # rows
    counts: np.ndarray  # int64 [features, len(edges) + 1]: right-closed bins over the edges
    sum: np.ndarray  # float64 [features]
    sumsq: np.ndarray  # float64 [features]
    classes: np.ndarray  # int64 [n_classes]: label counts

    def to_dict(self) -> dict[str, int | list[int] | list[float]]:
        """Flat lists (a Flower ``ConfigRecord`` holds them as they are)."""
        return {"n": self.n, "counts": [int(v) for v in self.counts.ravel()],
                "sum": [float(v) for v in self.sum], "sumsq": [float(v) for v in self.sumsq],
                "classes": [int(v) for v in self.classes]}  # fmt: skip

    @staticmethod
    def merge(parts: Iterable[LocalSummary]) -> LocalSummary:
        items = list(parts)
        if not items:
            raise ValueError("nothing to merge")
        return LocalSummary(n=sum(p.n for p in items),
                            counts=np.sum([p.counts for p in items], axis=0),
                            sum=np.sum([p.sum for p in items], axis=0),
                            sumsq=np.sum([p.sumsq for p in items], axis=0),
                            classes=np.sum([p.classes for p in items], axis=0))  # fmt: skip


def summarize(x: np.ndarray, y: np.ndarray, edges: np.ndarray, n_classes: int) -> LocalSummary:
    """The counts of training rows ``x`` [N, F] with labels ``y`` over the grid ``edges``."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    if x.ndim != 2 or len(x) < 1 or y.shape != (len(x),) or not np.isfinite(x).all():
        raise ValueError(f"expected finite x [N >= 1, F] and y [N], saw {x.shape}, {y.shape}")
    if (y < 0).any() or (y >= n_classes).any():
        raise ValueError(f"labels: expected 0..{n_classes - 1}")
    edges = np.asarray(edges, dtype=np.float64)
    bins = np.searchsorted(edges, x, side="left")  # [N, F]: edges below x (right-closed)
    width = len(edges) + 1
    flat = np.bincount((bins + np.arange(x.shape[1]) * width).ravel(), minlength=x.shape[1] * width)
    return LocalSummary(n=len(x), counts=flat.reshape(x.shape[1], width).astype(np.int64),
                        sum=x.sum(axis=0), sumsq=np.square(x).sum(axis=0),
                        classes=np.bincount(y.astype(np.int64), minlength=n_classes))  # fmt: skip


def parse_summary(
    d: Mapping[str, Any], *, features: int, edges: int, n_classes: int, n: int
) -> LocalSummary:
    """A device's ``LocalSummary.to_dict`` checked against the grid it was asked for and
    the ``n`` rows it claims to have trained on; ``MalformedError`` says what is wrong."""
    if set(d) != {"n", "counts", "sum", "sumsq", "classes"}:
        raise MalformedError(f"reference summary: unexpected fields {sorted(d)}")
    if d["n"] != n or isinstance(d["n"], bool):
        raise MalformedError(f"reference summary: {d['n']!r} rows, but {n} trained on")
    width = edges + 1
    counts = _ints(d["counts"], features * width, "counts").reshape(features, width)
    classes = _ints(d["classes"], n_classes, "classes")
    if (counts.sum(axis=1) != n).any() or int(classes.sum()) != n:
        raise MalformedError(f"reference summary: counts do not add up to {n} rows")
    total, sq = _finite(d["sum"], features, "sum"), _finite(d["sumsq"], features, "sumsq")
    if (sq < 0).any() or (total**2 > n * sq * (1 + 1e-9) + 1e-9).any():
        raise MalformedError("reference summary: sums of squares below what the sums imply")
    return LocalSummary(n=n, counts=counts, sum=total, sumsq=sq, classes=classes)


def _ints(value: object, k: int, what: str) -> np.ndarray:
    if not isinstance(value, list) or len(value) != k:
        raise MalformedError(f"reference summary.{what}: expected {k} counts")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise MalformedError(f"reference summary.{what}: expected non-negative integers")
    return np.asarray(value, dtype=np.int64)


def _finite(value: object, k: int, what: str) -> np.ndarray:
    if not isinstance(value, list) or len(value) != k:
        raise MalformedError(f"reference summary.{what}: expected {k} numbers")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
               for v in value):  # fmt: skip
        raise MalformedError(f"reference summary.{what}: expected finite numbers")
    return np.asarray(value, dtype=np.float64)


def stats_from_summary(
    total: LocalSummary, edges: np.ndarray, *, bins: int = DEFAULT_BINS
) -> dict[str, Any]:
    """``reference_stats`` of merged counts (see the module docstring for what is exact)."""
    edges = np.asarray(edges, dtype=np.float64)
    if total.n < 2:
        raise ValueError(f"reference statistics need at least 2 rows, saw {total.n}")
    cuts, ref, quantiles = [], [], []
    for c in total.counts:
        cum = np.cumsum(c)  # cum[j]: rows <= edges[j] (j < len(edges)); cum[-1] = n
        picks = []
        for level in np.linspace(0.0, 1.0, bins + 1):
            hit = np.flatnonzero(cum[:-1] >= max(level * total.n, 1e-9))
            picks.append(int(hit[0]) if len(hit) else len(edges) - 1)
        js = sorted(set(picks))
        cuts.append([float(edges[j]) for j in js])
        bounds = [0, *(j + 1 for j in js), len(c)]
        ref.append(_round([c[a:b].sum() / total.n for a, b in itertools.pairwise(bounds)], 8))
        quantiles.append(_round([_quantile(c, edges, q * total.n) for q in QUANTILES], 6))
    mean = total.sum / total.n
    var = np.maximum(total.sumsq / total.n - mean**2, 0.0)
    out: dict[str, Any] = {
        "drift_schema": SCHEMA,
        "n": total.n,
        "cuts": cuts,
        "ref": ref,
        "quantiles": quantiles,
        "mean": [float(v) for v in mean],
        "var": [float(v) for v in var],
        "std": [float(v) for v in np.sqrt(var)],
    }
    if len(total.classes) >= 2:
        out["class_prior"] = _round(list(total.classes / total.n), 8)
    return out


def _quantile(counts: np.ndarray, edges: np.ndarray, target: float) -> float:
    """The value below which ``target`` rows lie, linear inside each grid bin; the outer
    bins (at or below the first edge, above the last) sit at their edge."""
    xs = np.concatenate([[edges[0]], edges, [edges[-1]]])
    cs = np.concatenate([[0], np.cumsum(counts)]).astype(np.float64)
    k = min(max(int(np.searchsorted(cs, target, side="left")), 1), len(cs) - 1)
    lo, hi = cs[k - 1], cs[k]
    return float(xs[k] if hi <= lo else xs[k - 1] + (xs[k] - xs[k - 1]) * (target - lo) / (hi - lo))


def _round(values: Iterable[float], digits: int) -> list[float]:
    return [float(v) for v in np.round(np.asarray(list(values), dtype=np.float64), digits)]
