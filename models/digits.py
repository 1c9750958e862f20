"""Reference model: an MLP digits classifier on scikit-learn's bundled 8x8 digits.

No download: ``load_digits`` ships with scikit-learn. Pixels are scaled to [0, 1] (``/16``)
as float32, so the exported models take the same input the agent feeds them.

``write_digits_artifacts`` is what the CLI (``edgefleet model train digits``) calls. It writes,
atomically, into one directory::

    digits.onnx        ONNX graph (dynamic batch)
    digits.tflite      TFLite flatbuffer (batch 1, resizable)
    digits_test.npz    the held-out split: ``x`` float32 [N, 64], ``y`` int64 [N]
    digits.json        metadata: tensor specs, accuracy, labels, smoke vectors, feature stats
                       (drift reference: ``models.refstats``)

A second, different version (for a "v2" release) comes from another ``hidden`` size or seed.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edgefleet.infra.fsutil import atomic_write
from edgefleet.models.onnx_export import mlp_to_onnx
from edgefleet.models.refstats import training_stats
from edgefleet.models.tflite_export import mlp_to_tflite
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

__all__ = [
    "DigitsArtifacts",
    "DigitsSplit",
    "load_digits_split",
    "train_digits",
    "write_digits_artifacts",
]

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
N_FEATURES = 64
TEST_SIZE = 0.25
SMOKE_COUNT = 3
SMOKE_ATOL = 1e-4  # max abs difference a runtime may show against the smoke probabilities
METADATA_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class DigitsSplit:
    """A stratified train/test split: ``x`` float32 [N, 64] in [0, 1], ``y`` int64 [N]."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class DigitsArtifacts:
    """Where ``write_digits_artifacts`` put its files, and the sklearn test accuracy."""

    onnx_path: Path
    tflite_path: Path
    test_path: Path
    metadata_path: Path
    accuracy: float


def load_digits_split(seed: int = 0) -> DigitsSplit:
    """Load the bundled digits, scale to [0, 1] float32, split 75/25 stratified by ``seed``."""
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, stratify=y, random_state=seed
    )
    return DigitsSplit(
        X_train=np.ascontiguousarray(x_train),
        y_train=np.ascontiguousarray(y_train),
        X_test=np.ascontiguousarray(x_test),
        y_test=np.ascontiguousarray(y_test),
    )


def train_digits(
    split: DigitsSplit, seed: int = 0, hidden: int = 128, max_iter: int = 500
) -> MLPClassifier:
    """Fit a one-hidden-layer ReLU MLP on ``split``; deterministic for a given ``seed``.

    Adam stops on its own tolerance well before ``max_iter`` for the defaults; if it does not,
    that is logged (WARNING) rather than raised as a ConvergenceWarning.
    """
    if hidden < 1:
        raise ValueError(f"hidden must be >= 1, got {hidden}")
    clf = MLPClassifier(
        hidden_layer_sizes=(hidden,),
        activation="relu",
        alpha=1e-4,
        max_iter=max_iter,
        random_state=seed,
    )
    # The matrices are small: one BLAS thread is as fast alone and does not collapse (3x and
    # worse) when the cores are shared with other work, as multi-threaded OpenBLAS does.
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(split.X_train, split.y_train)
    if clf.n_iter_ >= max_iter:
        logger.warning("digits MLP did not converge in %d iterations", max_iter)
    return clf


def write_digits_artifacts(
    out_dir: Path, seed: int = 0, hidden: int = 128, max_iter: int = 500
) -> DigitsArtifacts:
    """Train on the digits split for ``seed`` and write the four artifacts into ``out_dir``.

    Each file is written to a temporary name in ``out_dir`` and moved into place with
    ``os.replace``, so a reader never sees a partial file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = load_digits_split(seed)
    clf = train_digits(split, seed=seed, hidden=hidden, max_iter=max_iter)
    accuracy = float(clf.score(split.X_test, split.y_test))
    artifacts = DigitsArtifacts(
        onnx_path=out_dir / "digits.onnx",
        tflite_path=out_dir / "digits.tflite",
        test_path=out_dir / "digits_test.npz",
        metadata_path=out_dir / "digits.json",
        accuracy=accuracy,
    )
    metadata = _metadata(clf, split, seed=seed, accuracy=accuracy)
    atomic_write(
        artifacts.onnx_path, mlp_to_onnx(clf, input_name=INPUT_NAME, output_name=OUTPUT_NAME)
    )
    atomic_write(
        artifacts.tflite_path, mlp_to_tflite(clf, input_name=INPUT_NAME, output_name=OUTPUT_NAME)
    )
    atomic_write(artifacts.test_path, _npz_bytes(x=split.X_test, y=split.y_test))
    atomic_write(artifacts.metadata_path, _json_bytes(metadata))
    logger.info(
        "wrote digits artifacts to %s (hidden=%d, seed=%d, accuracy=%.4f)",
        out_dir,
        hidden,
        seed,
        accuracy,
    )
    return artifacts


def _metadata(
    clf: MLPClassifier, split: DigitsSplit, *, seed: int, accuracy: float
) -> dict[str, Any]:
    classes = [int(c) for c in clf.classes_]
    smoke_x = split.X_test[:SMOKE_COUNT]
    return {
        "schema_version": METADATA_SCHEMA_VERSION,
        "name": "digits",
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [None, N_FEATURES]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [None, len(classes)]},
        "hidden_layer_sizes": [int(h) for h in clf.hidden_layer_sizes],
        "activation": clf.activation,
        "accuracy": accuracy,
        "classes": classes,
        "n_train": int(split.X_train.shape[0]),
        "n_test": int(split.X_test.shape[0]),
        "seed": seed,
        "smoke": {
            "x": smoke_x.tolist(),
            "y": split.y_test[:SMOKE_COUNT].tolist(),
            "probabilities": clf.predict_proba(smoke_x).tolist(),
            "atol": SMOKE_ATOL,
        },
        "feature_stats": training_stats(split.X_train, split.y_train, n_classes=len(classes)),
    }


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _json_bytes(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
