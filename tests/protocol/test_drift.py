"""Drift statistics against direct numpy/scipy computations on the same samples."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from edgefleet.protocol.drift import (
    EPS,
    QUANTILES,
    ReferenceStats,
    Sketch,
    ks_binned,
    psi,
    reference_stats,
)
from edgefleet.protocol.errors import DecodeError
from scipy.stats import ks_2samp

RNG = np.random.default_rng(7)

# name -> (reference sample [N, F], live sample [M, F]); all values of the discrete ones are cuts
SAMPLES: dict[str, tuple[np.ndarray, np.ndarray]] = {
    "normal-same": (RNG.normal(0, 1, (2000, 3)), RNG.normal(0, 1, (700, 3))),
    "normal-shifted": (RNG.normal(0, 1, (2000, 3)), RNG.normal(0.8, 1.3, (700, 3))),
    "uniform-wider": (RNG.uniform(0, 1, (1500, 2)), RNG.uniform(-0.5, 1.5, (300, 2))),
    "discrete": (RNG.integers(0, 4, (1200, 4)).astype(float),
                 RNG.integers(0, 5, (400, 4)).astype(float)),
    "constant-then-not": (np.zeros((500, 1)), RNG.integers(0, 2, (100, 1)).astype(float)),
}  # fmt: skip
DISCRETE = ("discrete", "constant-then-not")


def _direct_shares(cuts: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Right-closed bins counted one by one: (-inf, c0], (c0, c1], ..., (c_last, inf)."""
    edges = np.concatenate([[-np.inf], cuts, [np.inf]])
    counts = [np.sum((x > lo) & (x <= hi)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return np.asarray(counts, dtype=float) / len(x)


def _direct_psi(e: np.ndarray, a: np.ndarray) -> float:
    total = 0.0
    for ei, ai in zip(e, a, strict=True):
        ei, ai = max(ei, EPS), max(ai, EPS)
        total += (ai - ei) * np.log(ai / ei)
    return total


def _sketch(ref_x: np.ndarray, live_x: np.ndarray, batches: int = 5) -> tuple[Any, Sketch]:
    stats = ReferenceStats.from_dict(reference_stats(ref_x))
    sketch = Sketch(stats)
    for part in np.array_split(live_x, batches):
        sketch.update(part)
    return stats, sketch


@pytest.mark.parametrize("case", sorted(SAMPLES))
def test_reference_stats_match_numpy(case: str) -> None:
    x, _ = SAMPLES[case]
    d = reference_stats(x)
    stats = ReferenceStats.from_dict(d)
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(stats.var, x.var(axis=0), atol=1e-6)
    np.testing.assert_allclose(stats.quantiles, np.quantile(x, QUANTILES, axis=0).T, atol=1e-6)
    for f in range(x.shape[1]):
        assert stats.cuts[f][0] == pytest.approx(x[:, f].min(), abs=1e-6)
        assert stats.cuts[f][-1] == pytest.approx(x[:, f].max(), abs=1e-6)
        np.testing.assert_allclose(stats.ref[f], _direct_shares(stats.cuts[f], x[:, f]),
                                   atol=1e-6)  # fmt: skip
        assert stats.ref[f][-1] == 0  # nothing of the training data lies above its maximum


@pytest.mark.parametrize("case", sorted(SAMPLES))
def test_sketch_psi_and_moments_match_a_direct_computation(case: str) -> None:
    ref_x, live_x = SAMPLES[case]
    stats, sketch = _sketch(ref_x, live_x)
    s = sketch.summary()
    assert s.n == len(live_x)
    np.testing.assert_allclose(sketch.mean, live_x.mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(sketch.var, live_x.var(axis=0), atol=1e-9)
    for f in range(ref_x.shape[1]):
        live = _direct_shares(stats.cuts[f], live_x[:, f])
        np.testing.assert_allclose(sketch.shares(f), live, atol=1e-12)
        assert s.psi[f] == pytest.approx(_direct_psi(stats.ref[f], live), abs=1e-9)


@pytest.mark.parametrize("case", sorted(SAMPLES))
def test_binned_ks_against_scipy(case: str) -> None:
    ref_x, live_x = SAMPLES[case]
    stats, sketch = _sketch(ref_x, live_x)
    s = sketch.summary()
    for f in range(ref_x.shape[1]):
        exact = float(ks_2samp(ref_x[:, f], live_x[:, f]).statistic)
        if case in DISCRETE:  # every value is a cut: the binned statistic is the exact one
            assert s.ks[f] == pytest.approx(exact, abs=1e-6)
        else:  # a lower bound, short by at most the largest single-bin share
            slack = max(stats.ref[f].max(), sketch.shares(f).max())
            assert s.ks[f] - 1e-6 <= exact <= s.ks[f] + slack + 1e-6


def test_drift_separates_same_from_shifted() -> None:
    same = _sketch(*SAMPLES["normal-same"])[1].summary()
    shifted = _sketch(*SAMPLES["normal-shifted"])[1].summary()
    assert same.max_psi < 0.1 < 0.5 < shifted.max_psi
    assert same.max_ks < 0.1 < 0.2 < shifted.max_ks


def test_output_shift_against_the_class_prior() -> None:
    y = np.repeat([0, 1, 2], [500, 300, 200])
    stats = ReferenceStats.from_dict(reference_stats(RNG.normal(size=(1000, 2)), y))
    np.testing.assert_allclose(stats.class_prior, [0.5, 0.3, 0.2])
    sketch = Sketch(stats)
    outputs = np.eye(3)[np.repeat([0, 1, 2], [10, 10, 80])]  # one-hot "probabilities"
    sketch.update(RNG.normal(size=(100, 2)), outputs)
    assert sketch.summary().output_psi == pytest.approx(
        _direct_psi(np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.1, 0.8])))


def test_decay_keeps_shares_and_scales_counts() -> None:
    _, sketch = _sketch(*SAMPLES["normal-shifted"])
    before = sketch.summary()
    sketch.decay(0.5)
    after = sketch.summary()
    assert after.n == before.n / 2
    assert after.psi == pytest.approx(before.psi) and after.ks == pytest.approx(before.ks)
    sketch.decay(0.0)
    assert sketch.summary().n == 0 and sketch.summary().max_psi == 0
    with pytest.raises(ValueError):
        sketch.decay(1.5)


def test_bad_rows_are_counted_and_wrong_widths_refused() -> None:
    stats, sketch = _sketch(*SAMPLES["normal-same"])
    x = RNG.normal(size=(4, 3))
    x[1, 2] = np.nan
    x[3, 0] = np.inf
    sketch.update(x)
    assert sketch.summary().nonfinite == 2 and sketch.summary().n == 702
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        sketch.update(np.zeros((2, 4)))


def test_psi_and_ks_helpers() -> None:
    assert psi(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0
    assert psi(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(
        2 * (1 - EPS) * np.log(1 / EPS))
    assert ks_binned(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == 1.0


GOOD = reference_stats(SAMPLES["discrete"][0], np.array([0, 1] * 600))


def _bad(**changes: Any) -> dict[str, Any]:
    d = copy.deepcopy(GOOD)
    for k, v in changes.items():
        if v is None:
            del d[k]
        else:
            d[k] = v
    return d


BAD = [
    ("schema", _bad(drift_schema=2), "drift_schema"),
    ("unknown-field", _bad(extra=1), "unexpected fields"),
    ("n-zero", _bad(n=0), "reference_stats.n"),
    ("n-bool", _bad(n=True), "reference_stats.n"),
    ("no-cuts", _bad(cuts=None), "cuts and ref"),
    ("ref-count", _bad(ref=GOOD["ref"][:-1]), "features"),
    ("cuts-decreasing", _bad(cuts=[[3.0, 1.0]] + GOOD["cuts"][1:]), "increasing"),
    ("cuts-empty", _bad(cuts=[[]] + GOOD["cuts"][1:]), "increasing"),
    ("too-many-bins", _bad(cuts=[list(range(64))] + GOOD["cuts"][1:]), "increasing"),
    ("share-width", _bad(ref=[[1.0]] + GOOD["ref"][1:]), r"ref\[0\]: expected a list"),
    ("shares-not-1", _bad(ref=[[0.5, 0.1, 0.1, 0.1, 0.1]] + GOOD["ref"][1:]), "summing to 1"),
    ("negative-share", _bad(ref=[[1.5, -0.5, 0, 0, 0]] + GOOD["ref"][1:]), "non-negative"),
    ("nan-cut", _bad(cuts=[[0.0, float("nan")]] + GOOD["cuts"][1:]), "finite"),
    ("string-mean", _bad(mean=["a"] * 4), "reference_stats.mean"),
    ("mean-width", _bad(mean=[0.0]), "reference_stats.mean"),
    ("negative-var", _bad(var=[-1.0] * 4), "non-negative"),
    ("quantile-width", _bad(quantiles=[[0.0]] * 4), "quantiles"),
    ("prior-one-class", _bad(class_prior=[1.0]), "class_prior"),
    ("prior-not-1", _bad(class_prior=[0.2, 0.2]), "summing to 1"),
    ("too-many-features", _bad(cuts=[[0.0]] * 1025), "features"),
]


@pytest.mark.parametrize(("stats", "match"), [(d, m) for _, d, m in BAD],
                         ids=[c for c, _, _ in BAD])  # fmt: skip
def test_malformed_reference_stats_are_refused(stats: dict[str, Any], match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        ReferenceStats.from_dict(stats)


def test_the_manifest_validates_drift_stats() -> None:
    from edgefleet.protocol.canonical import canonical_json
    from edgefleet.protocol.manifest import Manifest

    from tests.protocol.test_manifest import valid

    m = Manifest.decode(canonical_json({**valid(), "reference_stats": GOOD}))
    assert m.reference_stats["n"] == 1200
    bad = _bad(ref=[[0.5, 0.1, 0.1, 0.1, 0.1]] + GOOD["ref"][1:])
    with pytest.raises(DecodeError, match="summing to 1"):
        Manifest.decode(canonical_json({**valid(), "reference_stats": bad}))
