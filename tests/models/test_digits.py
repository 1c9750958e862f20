"""The digits reference model: split, training, and the artifact directory the CLI writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgefleet.infra.fsutil import atomic_write
from edgefleet.models.digits import (
    DigitsArtifacts,
    DigitsSplit,
    load_digits_split,
    train_digits,
    write_digits_artifacts,
)
from sklearn.neural_network import MLPClassifier

ARTIFACT_NAMES = {"digits.onnx", "digits.tflite", "digits_test.npz", "digits.json"}


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split(seed=0)


@pytest.fixture(scope="module")
def clf(split: DigitsSplit) -> MLPClassifier:
    return train_digits(split, seed=0)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> DigitsArtifacts:
    return write_digits_artifacts(tmp_path_factory.mktemp("digits_v1"), seed=0)


@pytest.fixture(scope="module")
def metadata(artifacts: DigitsArtifacts) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads(artifacts.metadata_path.read_text())
    return meta


def test_split_shapes_dtypes_and_range(split: DigitsSplit) -> None:
    assert split.X_train.shape == (1347, 64) and split.X_test.shape == (450, 64)
    assert split.X_train.dtype == split.X_test.dtype == np.float32
    assert split.y_train.dtype == split.y_test.dtype == np.int64
    assert split.X_train.min() >= 0.0 and split.X_train.max() <= 1.0
    assert split.X_test.flags.c_contiguous


def test_split_is_stratified_and_seeded(split: DigitsSplit) -> None:
    train_share = np.bincount(split.y_train) / len(split.y_train)
    test_share = np.bincount(split.y_test) / len(split.y_test)
    assert np.abs(train_share - test_share).max() < 0.01
    np.testing.assert_array_equal(load_digits_split(seed=0).X_test, split.X_test)
    assert not np.array_equal(load_digits_split(seed=1).X_test, split.X_test)


def test_train_is_accurate(split: DigitsSplit) -> None:
    """Accuracy only: no test asserts on wall-clock time (a loaded machine is not a bug)."""
    model = train_digits(split, seed=0)
    assert model.hidden_layer_sizes == (128,) and model.activation == "relu"
    assert model.score(split.X_test, split.y_test) >= 0.95


def test_train_rejects_empty_hidden_layer(split: DigitsSplit) -> None:
    with pytest.raises(ValueError, match="hidden"):
        train_digits(split, hidden=0)


def test_artifacts_written_and_nothing_else(artifacts: DigitsArtifacts) -> None:
    out_dir = artifacts.onnx_path.parent
    assert {p.name for p in out_dir.iterdir()} == ARTIFACT_NAMES  # no temp files left
    assert artifacts.accuracy >= 0.95
    assert artifacts.tflite_path.read_bytes()[4:8] == b"TFL3"
    assert artifacts.onnx_path.stat().st_mode & 0o777 == 0o644


def test_test_split_npz(artifacts: DigitsArtifacts, split: DigitsSplit) -> None:
    with np.load(artifacts.test_path) as npz:
        assert set(npz.files) == {"x", "y"}
        assert npz["x"].dtype == np.float32 and npz["y"].dtype == np.int64
        np.testing.assert_array_equal(npz["x"], split.X_test)
        np.testing.assert_array_equal(npz["y"], split.y_test)


def test_metadata(metadata: dict[str, Any], artifacts: DigitsArtifacts) -> None:
    assert metadata["input"] == {"name": "input", "dtype": "float32", "shape": [None, 64]}
    assert metadata["output"] == {"name": "probabilities", "dtype": "float32", "shape": [None, 10]}
    assert metadata["accuracy"] == artifacts.accuracy
    assert metadata["classes"] == list(range(10))
    assert (metadata["n_train"], metadata["n_test"], metadata["seed"]) == (1347, 450, 0)
    assert metadata["hidden_layer_sizes"] == [128]


def test_metadata_smoke_matches_sklearn(
    metadata: dict[str, Any], clf: MLPClassifier, split: DigitsSplit
) -> None:
    smoke = metadata["smoke"]
    x = np.asarray(smoke["x"], dtype=np.float32)
    np.testing.assert_array_equal(x, split.X_test[:3])
    assert smoke["y"] == split.y_test[:3].tolist()
    # Same seed, same data: the retrained model gives the same probabilities.
    np.testing.assert_allclose(smoke["probabilities"], clf.predict_proba(x), atol=1e-6)
    assert smoke["atol"] > 0


def test_metadata_feature_stats(metadata: dict[str, Any], split: DigitsSplit) -> None:
    stats = metadata["feature_stats"]
    x = split.X_train.astype(np.float64)
    np.testing.assert_allclose(stats["mean"], x.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(stats["std"], x.std(axis=0), atol=1e-12)
    assert len(stats["mean"]) == len(stats["std"]) == 64


def test_second_version_differs(tmp_path: Path, artifacts: DigitsArtifacts) -> None:
    v2 = write_digits_artifacts(tmp_path, seed=1, hidden=64)
    meta = json.loads(v2.metadata_path.read_text())
    assert meta["hidden_layer_sizes"] == [64] and meta["seed"] == 1
    assert v2.accuracy >= 0.95
    assert v2.onnx_path.read_bytes() != artifacts.onnx_path.read_bytes()
    assert v2.tflite_path.read_bytes() != artifacts.tflite_path.read_bytes()


def test_atomic_write_replaces_and_cleans_up_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write(target, b"old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
