"""Reference statistics for drift, from the training data of a model.

``training_stats`` is what a trainer puts in its metadata (``feature_stats``, which
``model register`` stores and every release manifest carries as ``reference_stats``);
``stats_from_file`` reads the training inputs (and labels) of a model trained elsewhere
from a ``.npz`` (arrays ``x`` [N, F] and optionally ``y`` [N]) for ``model register
--reference-data``. The statistics themselves are ``protocol.drift.reference_stats``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from edgefleet.protocol.drift import DEFAULT_BINS, reference_stats

__all__ = ["MAX_REFERENCE_FILE", "stats_from_file", "training_stats"]

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
