"""Local data directories and simulated Dirichlet partitions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from edgefleet.federated.data import (
    add_samples,
    digits_federation,
    dirichlet_partition,
    holdout,
    load_dir,
)
from edgefleet.protocol.errors import ConfigError


def test_a_directory_of_npz_and_csv_files_loads_in_name_order(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.ones((4, 3)), y=np.array([0, 1, 2, 0]))
    (tmp_path / "b.csv").write_text("f1,f2,f3,label\n0.5,0.5,0.5,1\n0.1,0.2,0.3,2\n")
    (tmp_path / "c.csv").write_text("9,9,9,0\n")
    (tmp_path / "notes.txt").write_text("ignored")
    data = load_dir(tmp_path, test_fraction=0.0)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert data.num_train == 7 and data.num_test == 0
    split = load_dir(tmp_path, test_fraction=0.3, seed=1)
    assert split.num_train + split.num_test == 7 and split.num_test == 2
    again = load_dir(tmp_path, test_fraction=0.3, seed=1)
    assert np.array_equal(split.x_test, again.x_test)  # the same directory, the same split
    rows = {tuple(r) for r in np.vstack([split.x_train, split.x_test]).tolist()}
    assert (9.0, 9.0, 9.0) in rows and (0.1, 0.2, 0.3) in {tuple(np.round(r, 6)) for r in rows}


def test_added_samples_are_loaded_next_time(tmp_path: Path) -> None:
    out = add_samples(tmp_path / "data", np.zeros((3, 64)), np.array([1, 2, 3]))
    assert out.suffix == ".npz" and out.parent == tmp_path / "data"
    add_samples(tmp_path / "data", np.ones((2, 64)), np.array([4, 5]))
    assert load_dir(tmp_path / "data", test_fraction=0).num_train == 5


BAD = {
    "empty directory": {},
    "npz without y": {"a.npz": ("npz", {"x": np.ones((2, 2))})},
    "text in a csv row": {"a.csv": "1,2,0\n3,x,5\n"},
    "fractional label": {"a.csv": "1,2,0.5\n"},
    "one column": {"a.csv": "1\n2\n"},
    "widths differ": {"a.csv": "1,2,0\n", "b.csv": "1,2,3,0\n"},
    "nan feature": {"a.npz": ("npz", {"x": np.array([[np.nan]]), "y": np.array([0])})},
    "rows and labels differ": {"a.npz": ("npz", {"x": np.ones((3, 2)), "y": np.array([0])})},
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_data_is_the_operators_to_fix(tmp_path: Path, case: str) -> None:
    for name, content in BAD[case].items():
        if isinstance(content, tuple):
            np.savez(tmp_path / name, **content[1])
        else:
            (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError):
        load_dir(tmp_path)


def test_dirichlet_partition_covers_every_sample_once_and_skews_with_alpha() -> None:
    y = np.repeat(np.arange(10), 100)
    parts = dirichlet_partition(y, n_clients=5, alpha=0.5, seed=3)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(y)))
    assert min(len(p) for p in parts) >= 10
    assert all(
        np.array_equal(a, b)
        for a, b in zip(parts, dirichlet_partition(y, n_clients=5, alpha=0.5, seed=3), strict=True)
    )

    def skew(alpha: float) -> float:  # mean share of each part's most common label
        ps = dirichlet_partition(y, n_clients=5, alpha=alpha, seed=3)
        return float(np.mean([np.bincount(y[p]).max() / len(p) for p in ps]))

    assert skew(0.1) > skew(1.0) > skew(100.0)
    with pytest.raises(ValueError):
        dirichlet_partition(y, n_clients=200, alpha=0.5, min_size=10)


def test_digits_federation_partitions_the_digits_train_split(federation) -> None:
    assert len(federation.clients) == 5
    total = sum(c.num_train + c.num_test for c in federation.clients)
    assert total == len(federation.y_train)
    assert federation.x_test.shape == (450, 64)
    again = digits_federation(n_clients=5, alpha=0.5, seed=0)
    assert all(
        np.array_equal(a.x_train, b.x_train)
        for a, b in zip(federation.clients, again.clients, strict=True)
    )


def test_holdout_refuses_a_bad_fraction() -> None:
    with pytest.raises(ValueError):
        holdout(np.zeros((4, 2)), np.zeros(4), test_fraction=1.0)
