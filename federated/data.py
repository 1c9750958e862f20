"""Local training data: a device's own directory of files, or a simulated partition.

On a device the data source is a directory of ``.npz`` files (arrays ``x`` [N, F] and ``y``
[N]) and ``.csv`` files (numbers, the label in the last column, an optional header line).
Files are read in name order, so the same directory always gives the same samples; a fixed
fraction (by a seeded permutation) is held out for local evaluation. ``add_samples`` appends
labelled samples as a new ``.npz`` (what ``edgefleet agent data add`` calls). Raw samples never
leave the device: only weights and aggregate metrics (counts, loss, accuracy) are sent.

For simulations, ``digits_federation`` splits scikit-learn's bundled digits (no download)
into label-skewed client partitions drawn from a Dirichlet(α) per class, and keeps the
``models.digits`` test split aside as the central test set.

A malformed file is the operator's to fix (``ConfigError``); an unreadable one is a
``StoreError``. numpy only at import; scikit-learn only inside ``digits_federation``.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from edgefleet.infra.fsutil import atomic_write, os_errors
from edgefleet.protocol.errors import ConfigError

__all__ = [
    "Federation",
    "LocalData",
    "add_samples",
    "digits_federation",
    "dirichlet_partition",
    "holdout",
    "load_dir",
]

log = logging.getLogger(__name__)

DEFAULT_TEST_FRACTION = 0.2


@dataclass(frozen=True, kw_only=True)
class LocalData:
    """One participant's samples: float32 ``x`` [N, F], int64 ``y`` [N]; train and held out."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def __post_init__(self) -> None:
        for x, y, part in (
            (self.x_train, self.y_train, "train"),
            (self.x_test, self.y_test, "test"),
        ):
            if x.dtype != np.float32 or y.dtype != np.int64:
                raise TypeError(f"{part}: expected float32 x and int64 y, got {x.dtype}, {y.dtype}")
            if x.ndim != 2 or y.shape != (x.shape[0],):
                raise ValueError(f"{part}: expected x [N, F] and y [N], got {x.shape}, {y.shape}")
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise ValueError(
                f"train and test widths differ: {self.x_train.shape[1]} != {self.x_test.shape[1]}"
            )

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.y_test.shape[0])


@dataclass(frozen=True, kw_only=True)
class Federation:
    """A simulated federation: client partitions plus the central train/test split."""

    clients: tuple[LocalData, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def holdout(
    x: np.ndarray, y: np.ndarray, *, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0
) -> LocalData:
    """Split ``x``, ``y`` into train and held-out parts by a permutation seeded by ``seed``."""
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return LocalData(x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test])


def load_dir(
    path: Path, *, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0
) -> LocalData:
    """All ``*.npz`` and ``*.csv`` files under ``path`` (name order), split by ``holdout``."""
    path = Path(path)
    with os_errors(f"{path}: cannot read the local data"):
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".csv"))
        parts = [_read(p) for p in files]
    if not parts:
        raise ConfigError(f"{path}: no .npz or .csv data files")
    widths = {x.shape[1] for x, _ in parts}
    if len(widths) != 1:
        raise ConfigError(f"{path}: data files disagree on the number of features: {widths}")
    x = np.concatenate([x for x, _ in parts])
    y = np.concatenate([y for _, y in parts])
    log.debug("loaded %d samples from %d files in %s", len(y), len(files), path)
    return holdout(x, y, test_fraction=test_fraction, seed=seed)


def add_samples(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """Write ``x``, ``y`` as a new ``.npz`` in ``path`` (atomic; named by its content)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    _check_arrays(x, y, "samples")
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    data = buf.getvalue()
    out = Path(path) / f"samples-{hashlib.sha256(data).hexdigest()[:16]}.npz"
    with os_errors(f"{out}: cannot write the samples"):
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, data)
    log.info("added %d samples to %s", len(y), out)
    return out


def dirichlet_partition(
    y: np.ndarray, *, n_clients: int, alpha: float, seed: int = 0, min_size: int = 10
) -> list[np.ndarray]:
    """Indices of ``y`` for ``n_clients`` label-skewed parts (Dirichlet(α) share per class).

    Redraws (deterministically) until every part has at least ``min_size`` samples; smaller
    α gives more skew. Every index lands in exactly one part.
    """
    if n_clients < 1 or alpha <= 0:
        raise ValueError(f"need n_clients >= 1 and alpha > 0, got {n_clients}, {alpha}")
    if n_clients * min_size > len(y):
        raise ValueError(f"{len(y)} samples cannot give {n_clients} parts of {min_size}")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for label in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == label))
            shares = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet({alpha}) partition with {min_size}+ samples per part")


def digits_federation(
    *,
    n_clients: int,
    alpha: float,
    seed: int = 0,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> Federation:
    """Digits split as ``models.digits`` does; its train part partitioned over the clients."""
    from edgefleet.models.digits import load_digits_split

    split = load_digits_split(seed)
    parts = dirichlet_partition(split.y_train, n_clients=n_clients, alpha=alpha, seed=seed)
    clients = tuple(
        holdout(split.X_train[p], split.y_train[p], test_fraction=test_fraction, seed=seed + i)
        for i, p in enumerate(parts)
    )
    return Federation(
        clients=clients,
        x_train=split.X_train,
        y_train=split.y_train,
        x_test=split.X_test,
        y_test=split.y_test,
    )


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                x, y = npz["x"], npz["y"]
        else:
            table = _read_csv(path)
            x, y = table[:, :-1], table[:, -1]
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{path}: not a data file (npz with x, y / numeric csv): {exc}") from exc
    if y.size and not np.all(np.equal(np.mod(y, 1), 0)):
        raise ConfigError(f"{path}: labels must be integers")
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    try:
        _check_arrays(x, y, str(path))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return x, y


def _read_csv(path: Path) -> np.ndarray:
    text = path.read_text()
    first = text.split("\n", 1)[0]
    skip = 0 if _numeric_row(first) else 1  # an optional header line
    table = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=skip, ndmin=2)
    if table.shape[1] < 2:
        raise ValueError("need at least one feature column and a label column")
    return np.asarray(table)


def _numeric_row(line: str) -> bool:
    try:
        [float(cell) for cell in line.split(",")]
    except ValueError:
        return False
    return True


def _check_arrays(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[1] < 1:
        raise ValueError(f"{what}: expected x [N, F] and y [N], got {x.shape} and {y.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: features must be finite")
