"""Per-prediction explanations: Shapley values of one input's class score (numpy only, no shap).

The game: a coalition ``S`` of features keeps the input's values, the others take a
background row's (interventional, as ``shap``'s ``Independent`` masker), and ``v(S)`` is the
model's output for ``target`` averaged over the background rows. The Shapley values ``phi``
then add up exactly to ``f(x) - E_b f(b)`` (efficiency), whichever method computes them:

- ``exact`` (at most ``MAX_EXACT`` features): every one of the ``2^n`` coalitions is evaluated
  (``2^n x background`` model rows, batched) and weighted by ``|S|! (n - |S| - 1)! / n!``.
  The digits models have 64 features: ``2^64`` coalitions (about 1.8e19 model runs) is not
  tractable, nor is it for any model past a few dozen features. (For a model *linear in its
  output*, ``f(x) = w.x + c``, the exact values are closed form, ``w_i (x_i - E b_i)``; the
  models the agent serves end in a softmax, so that shortcut does not apply to them.)
- ``permutation`` (any size; the default past ``MAX_EXACT``): Monte Carlo over feature orders
  (Strumbelj and Kononenko 2014, what ``shap.PermutationExplainer`` does), with antithetic
  pairs (each order and its reverse). Each order switches the features from background to input
  one at a time, so ``n + 1`` coalitions give one marginal contribution per feature and their
  sum telescopes to exactly ``f(x) - E f(b)``. The budget is fixed: ``permutations`` pairs,
  ``2 x permutations x (n + 1) x background`` model rows (64 pairs, 64 features, one background
  row: 8,320 rows, a few ms in ONNX Runtime). The estimate is unbiased; ``stderr`` is the
  standard error of each value over the pairs (a 95 % interval is about +-2 stderr).

The background is the bundle's reference statistics (``reference_stats["mean"]``, the training
mean, one row) unless the caller gives rows (at most ``MAX_BACKGROUND``). Inputs are one row;
the model is any ``Runtime`` (``run(batch) -> outputs``), called in chunks of ``MAX_ROWS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MAX_BACKGROUND", "MAX_EVALUATIONS", "MAX_EXACT", "ExplainOptions", "Explanation",
           "background_from",
           "cost", "explain"]  # fmt: skip

MAX_EXACT = 14  # features: 2^14 = 16,384 coalitions per background row
MAX_BACKGROUND = 32  # rows
MAX_PERMUTATIONS = 512  # antithetic pairs
MAX_ROWS = 8192  # model rows per runtime call
MAX_EVALUATIONS = 300_000  # model rows one explanation may cost (refused above, before any run)
Model = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, kw_only=True)
class Explanation:
    values: np.ndarray  # [features] Shapley values of ``target``
    stderr: np.ndarray  # [features] standard errors (zeros when exact)
    base: float  # E_b f(b)[target]: what the values add up from
    output: float  # f(x)[target]: what they add up to
    target: int
    method: str  # "exact" | "permutation"
    evaluations: int  # model rows run

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "method": self.method,
            "base": self.base,
            "output": self.output,
            "values": [float(v) for v in self.values],
            "stderr": [float(v) for v in self.stderr],
            "evaluations": self.evaluations,
        }


def background_from(reference_stats: Mapping[str, Any], features: int) -> np.ndarray | None:
    """The training mean from a manifest's reference statistics as one background row."""
    mean = reference_stats.get("mean")
    if not isinstance(mean, list) or len(mean) != features:
        return None
    try:
        row = np.asarray(mean, dtype=np.float32).reshape(1, features)
    except (TypeError, ValueError):
        return None
    return row if np.isfinite(row).all() else None


def explain(
    model: Model,
    x: np.ndarray,
    background: np.ndarray,
    *,
    target: int | None = None,
    method: str = "auto",
    permutations: int = 64,
    seed: int = 0,
) -> Explanation:
    """Shapley values of ``model(x)[target]`` (default: the predicted class); see the module."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    bg = np.asarray(background, dtype=np.float32).reshape(-1, x.size)
    n = x.size
    if not 1 <= len(bg) <= MAX_BACKGROUND:
        raise ValueError(f"background: expected 1..{MAX_BACKGROUND} rows, saw {len(bg)}")
    if not 1 <= permutations <= MAX_PERMUTATIONS:
        raise ValueError(f"permutations: expected 1..{MAX_PERMUTATIONS}, saw {permutations}")
    out = np.asarray(model(x[None, :]), dtype=np.float64).reshape(-1)
    target = int(out.argmax()) if target is None else int(target)
    if not 0 <= target < out.size:
        raise ValueError(f"target: expected a class in 0..{out.size - 1}, saw {target}")
    if method == "auto":
        method = "exact" if n <= MAX_EXACT else "permutation"
    if method == "exact" and n > MAX_EXACT:
        raise ValueError(f"exact Shapley values need at most {MAX_EXACT} features, saw {n} "
                         f"(2^{n} coalitions); use permutation")  # fmt: skip
    rows = cost(method, n, len(bg), permutations)
    if rows > MAX_EVALUATIONS:
        raise ValueError(f"{method} over {n} features, {len(bg)} background rows and "
                         f"{permutations} permutation pairs costs {rows} model rows, "
                         f"over the {MAX_EVALUATIONS} allowed")  # fmt: skip
    if method == "exact":
        values, base, rows = _exact(model, x, bg, target)
        stderr = np.zeros(n)
    else:
        values, stderr, base, rows = _permutation(model, x, bg, target, permutations, seed)
    return Explanation(values=values, stderr=stderr, base=base, output=float(out[target]),
                       target=target, method=method, evaluations=rows + 1)  # fmt: skip


def cost(method: str, features: int, background: int, permutations: int) -> int:
    """Model rows an explanation runs (``ValueError`` for an unknown method)."""
    if method == "exact":
        return (1 << min(features, 63)) * background if features <= MAX_EXACT else 1 << 62
    if method == "permutation":
        return 2 * permutations * (features + 1) * background
    raise ValueError(f"method: expected auto, exact or permutation, saw {method!r}")


def _values(model: Model, masks: np.ndarray, x: np.ndarray, bg: np.ndarray, target: int
            ) -> np.ndarray:  # fmt: skip
    """``v(S)`` for each row of ``masks`` [coalitions, n] (True: the input's value)."""
    k = len(bg)
    out = np.empty(len(masks) * k)
    step = max(1, MAX_ROWS // k)
    for start in range(0, len(masks), step):
        m = masks[start : start + step]
        rows = np.where(m[:, None, :], x[None, None, :], bg[None, :, :]).reshape(-1, x.size)
        y = np.asarray(model(rows), dtype=np.float64).reshape(len(rows), -1)[:, target]
        out[start * k : start * k + len(rows)] = y
    mean: np.ndarray = out.reshape(len(masks), k).mean(axis=1)
    return mean


def _exact(model: Model, x: np.ndarray, bg: np.ndarray, target: int
           ) -> tuple[np.ndarray, float, int]:  # fmt: skip
    n = x.size
    ids = np.arange(1 << n)
    masks = ((ids[:, None] >> np.arange(n)[None, :]) & 1).astype(bool)
    v = _values(model, masks, x, bg, target)
    size = masks.sum(axis=1)
    weight = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)
                       for s in range(n)])  # fmt: skip
    phi = np.zeros(n)
    for i in range(n):
        without = ~masks[:, i]
        phi[i] = float((weight[size[without]] * (v[ids[without] | (1 << i)] - v[without])).sum())
    return phi, float(v[0]), len(masks) * len(bg)


def _permutation(model: Model, x: np.ndarray, bg: np.ndarray, target: int, pairs: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray, float, int]:  # fmt: skip
    n = x.size
    rng = np.random.default_rng(seed)
    orders = []
    for _ in range(pairs):
        order = rng.permutation(n)
        orders += [order, order[::-1]]
    masks = np.zeros((len(orders), n + 1, n), dtype=bool)
    for p, order in enumerate(orders):  # step j: the first j features of the order are x's
        for j, feature in enumerate(order):
            masks[p, j + 1 :, feature] = True
    v = _values(model, masks.reshape(-1, n), x, bg, target).reshape(len(orders), n + 1)
    contrib = np.zeros((len(orders), n))
    for p, order in enumerate(orders):
        contrib[p, order] = np.diff(v[p])
    per_pair = contrib.reshape(pairs, 2, n).mean(axis=1)
    phi = per_pair.mean(axis=0)
    stderr = per_pair.std(axis=0, ddof=1) / math.sqrt(pairs) if pairs > 1 else np.zeros(n)
    return phi, stderr, float(v[0, 0]), masks.shape[0] * masks.shape[1] * len(bg)


@dataclass(frozen=True, kw_only=True)
class ExplainOptions:
    """What a ``POST /v1/explain`` body asks for beside ``inputs`` (validated, bounded)."""

    target: int | None = None
    method: str = "auto"
    permutations: int = 64
    seed: int = 0
    background: Any = None  # rows as sent (parsed and checked like ``inputs``), or None

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> ExplainOptions:
        """``ValueError`` naming the field for anything but the documented types."""
        unknown = set(doc) - {"inputs", "target", "method", "permutations", "seed", "background"}
        if unknown:
            raise ValueError(f"explain: unexpected fields {sorted(unknown)[:8]}")
        ints = {k: doc.get(k) for k in ("target", "permutations", "seed") if doc.get(k) is not None}
        for k, v in ints.items():
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**31:
                raise ValueError(f"explain: {k} must be a non-negative integer, saw {v!r:.20}")
        method = doc.get("method", "auto")
        if method not in ("auto", "exact", "permutation"):
            raise ValueError(
                f"explain: method must be auto, exact or permutation, saw {method!r:.20}"
            )
        perms, seed = ints.get("permutations"), ints.get("seed")
        return cls(target=ints.get("target"), method=method,
                   permutations=64 if perms is None else int(perms),
                   seed=0 if seed is None else int(seed),
                   background=doc.get("background"))  # fmt: skip
