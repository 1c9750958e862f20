"""The on-device trainer: a scikit-learn model trained locally with ``partial_fit``.

Two families, both exportable with ``edgefleet.models`` (ONNX and TFLite, no TensorFlow):

- ``mlp``: ``MLPClassifier`` (ReLU hidden layers, softmax head), optimizer ``sgd`` (with
  momentum) or ``adam``, one optimizer step per mini-batch of ``batch_size``.
- ``linear``: ``SGDClassifier(loss="log_loss")`` for tabular data, plain SGD. It exports as a
  zero-hidden-layer MLP: ``softmax(x @ coef.T + intercept)``, whose argmax is
  ``SGDClassifier.predict`` (its own ``predict_proba`` normalises one-vs-rest sigmoids).

Weights are an ordered ``dict[str, ndarray]`` (``coefs.0``, …, ``intercepts.0``, … or
``coef``, ``intercept``), float32, and travel as a Flower ``ArrayRecord``; they round-trip
exactly. Each round starts a fresh local optimizer from the global weights (the optimizer
state of a previous round is not carried). FedProx's proximal term is applied as a step
``w -= lr * mu * (w - w_global)`` after every mini-batch.

scikit-learn, onnx and flwr are imported inside the functions that need them, so importing
this module costs only numpy.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

__all__ = [
    "FAMILIES",
    "OPTIMIZERS",
    "FitResult",
    "ModelSpec",
    "TrainConfig",
    "Trainer",
    "Weights",
    "check_compatible",
    "from_array_record",
    "to_array_record",
]

log = logging.getLogger(__name__)

FAMILIES = ("mlp", "linear")
OPTIMIZERS = ("sgd", "adam")
Weights = dict[str, np.ndarray]
_DTYPE = np.float32


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The architecture every participant must agree on (sent in each round's config)."""

    family: str = "mlp"
    n_features: int = 64
    n_classes: int = 10
    hidden: tuple[int, ...] = (64,)  # mlp only
    l2: float = 1e-4  # L2 penalty (sklearn ``alpha``)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model family must be one of {FAMILIES}, got {self.family!r}")
        if self.n_features < 1 or self.n_classes < 2:
            raise ValueError(
                f"need n_features >= 1 and n_classes >= 2, got {self.n_features}, {self.n_classes}"
            )
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden layer sizes must be >= 1, got {self.hidden}")
        if self.l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2}")

    @property
    def classes(self) -> np.ndarray:
        return np.arange(self.n_classes, dtype=np.int64)

    def to_config(self) -> dict[str, Any]:
        return {
            "model-family": self.family,
            "model-n-features": self.n_features,
            "model-n-classes": self.n_classes,
            "model-hidden": list(self.hidden),
            "model-l2": self.l2,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelSpec:
        return cls(
            family=str(config.get("model-family", "mlp")),
            n_features=int(config.get("model-n-features", 64)),
            n_classes=int(config.get("model-n-classes", 10)),
            hidden=tuple(int(h) for h in config.get("model-hidden", (64,))),
            l2=float(config.get("model-l2", 1e-4)),
        )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Local training hyper-parameters (sent in each round's config)."""

    local_epochs: int = 5
    lr: float = 0.1
    optimizer: str = "sgd"  # "sgd" (with momentum) | "adam"; linear models use "sgd"
    momentum: float = 0.9  # sgd only
    batch_size: int = 32
    proximal_mu: float = 0.0  # FedProx; sent by the strategy as "proximal-mu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"local_epochs and batch_size must be >= 1, got {self.local_epochs}, "
                f"{self.batch_size}"
            )
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if not 0 <= self.momentum < 1 or self.proximal_mu < 0:
            raise ValueError(
                f"need 0 <= momentum < 1 and proximal_mu >= 0, got {self.momentum}, "
                f"{self.proximal_mu}"
            )

    def to_config(self) -> dict[str, Any]:
        return {
            "local-epochs": self.local_epochs,
            "lr": self.lr,
            "optimizer": self.optimizer,
            "momentum": self.momentum,
            "batch-size": self.batch_size,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainConfig:
        d = cls()
        return cls(
            local_epochs=int(config.get("local-epochs", d.local_epochs)),
            lr=float(config.get("lr", d.lr)),
            optimizer=str(config.get("optimizer", d.optimizer)),
            momentum=float(config.get("momentum", d.momentum)),
            batch_size=int(config.get("batch-size", d.batch_size)),
            proximal_mu=float(config.get("proximal-mu", d.proximal_mu)),
            seed=int(config.get("seed", d.seed)),
        )


@dataclass(frozen=True, kw_only=True)
class FitResult:
    """Loss and accuracy of a model on ``num_examples`` samples."""

    num_examples: int
    loss: float
    accuracy: float


@dataclass(kw_only=True)
class Trainer:
    """One local model: weights in, ``fit`` / ``evaluate`` on local data, weights out."""

    spec: ModelSpec
    config: TrainConfig = field(default_factory=TrainConfig)
    estimator: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.spec.family == "linear" and self.config.optimizer != "sgd":
            raise ValueError(f"a linear model trains with sgd, not {self.config.optimizer!r}")
        self.estimator = _new_estimator(self.spec, self.config)

    def weights(self) -> Weights:
        """A copy of the current weights, in the family's fixed key order."""
        est = self.estimator
        if self.spec.family == "linear":
            return {"coef": est.coef_.copy(), "intercept": est.intercept_.copy()}
        out = {f"coefs.{i}": w.copy() for i, w in enumerate(est.coefs_)}
        out.update({f"intercepts.{i}": b.copy() for i, b in enumerate(est.intercepts_)})
        return out

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Load ``weights`` (copied); raises ValueError if keys, shapes or dtypes differ."""
        check_compatible(weights, self.weights())
        est = self.estimator
        if self.spec.family == "linear":
            est.coef_ = np.array(weights["coef"], dtype=_DTYPE)
            est.intercept_ = np.array(weights["intercept"], dtype=_DTYPE)
            return
        n = len(est.coefs_)
        est.coefs_ = [np.array(weights[f"coefs.{i}"], dtype=_DTYPE) for i in range(n)]
        est.intercepts_ = [np.array(weights[f"intercepts.{i}"], dtype=_DTYPE) for i in range(n)]
        # A fresh optimizer (no momentum / Adam moments from before) for the new weights.
        vars(est).pop("_optimizer", None)

    def fit(self, x: np.ndarray, y: np.ndarray, *, round_seed: int = 0) -> FitResult:
        """``local_epochs`` passes over shuffled mini-batches; returns loss/accuracy after."""
        x, y = _check_xy(x, y, self.spec)
        if len(y) == 0:
            raise ValueError("no local training samples")
        rng = np.random.default_rng([self.config.seed, round_seed])
        start = self.weights() if self.config.proximal_mu > 0 else None
        bs = self.config.batch_size
        with _quiet():
            for _ in range(self.config.local_epochs):
                order = rng.permutation(len(y))
                for lo in range(0, len(y), bs):
                    idx = order[lo : lo + bs]
                    self.estimator.partial_fit(x[idx], y[idx])
                    if start is not None:
                        self._proximal_step(start)
        return self.evaluate(x, y)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> FitResult:
        """Log-loss and accuracy on ``x``, ``y`` (all classes of the spec count)."""
        from sklearn.metrics import log_loss

        x, y = _check_xy(x, y, self.spec)
        if len(y) == 0:
            raise ValueError("no samples to evaluate on")
        proba = self.predict_proba(x)
        loss = float(log_loss(y, proba, labels=self.spec.classes))
        accuracy = float(np.mean(np.argmax(proba, axis=1) == y))
        return FitResult(num_examples=len(y), loss=loss, accuracy=accuracy)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities as the exported model computes them (softmax head)."""
        if self.spec.family == "linear":
            z = np.asarray(x, dtype=_DTYPE) @ self.estimator.coef_.T + self.estimator.intercept_
            if z.shape[1] == 1:  # binary: one logit, as sklearn stores it
                z = np.hstack([np.zeros_like(z), z])
            z = z - z.max(axis=1, keepdims=True)
            e = np.exp(z)
            return np.asarray(e / e.sum(axis=1, keepdims=True))
        with _quiet():
            return np.asarray(self.estimator.predict_proba(np.asarray(x, dtype=_DTYPE)))

    def as_mlp(self) -> Any:
        """An ``MLPClassifier`` computing ``predict_proba`` (the exporters' input)."""
        if self.spec.family == "mlp":
            return self.estimator
        shell = Trainer(spec=ModelSpec(**{**vars(self.spec), "family": "mlp", "hidden": ()}))
        w = self.weights()
        shell.set_weights({"coefs.0": w["coef"].T, "intercepts.0": w["intercept"]})
        return shell.estimator

    def to_onnx(self, *, input_name: str = "input", output_name: str = "probabilities") -> bytes:
        """The model as ONNX (``models.onnx_export``): float32 [N, n_features] -> probabilities."""
        from edgefleet.models.onnx_export import mlp_to_onnx

        return mlp_to_onnx(self.as_mlp(), input_name=input_name, output_name=output_name)

    def to_tflite(self, *, input_name: str = "input", output_name: str = "probabilities") -> bytes:
        """The model as a ``.tflite`` flatbuffer (``models.tflite_export``), batch 1 resizable."""
        from edgefleet.models.tflite_export import mlp_to_tflite

        return mlp_to_tflite(self.as_mlp(), input_name=input_name, output_name=output_name)

    def _proximal_step(self, start: Weights) -> None:
        step = self.config.lr * self.config.proximal_mu
        est = self.estimator
        if self.spec.family == "linear":
            pairs = [(est.coef_, start["coef"]), (est.intercept_, start["intercept"])]
        else:
            pairs = [(w, start[f"coefs.{i}"]) for i, w in enumerate(est.coefs_)]
            pairs += [(b, start[f"intercepts.{i}"]) for i, b in enumerate(est.intercepts_)]
        for current, anchor in pairs:
            current -= step * (current - anchor)


def check_compatible(
    weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> None:
    """Raise ValueError unless ``weights`` has exactly ``reference``'s keys, shapes, dtypes."""
    if list(weights) != list(reference):
        raise ValueError(f"expected weights {list(reference)}, got {list(weights)}")
    for key, ref in reference.items():
        got = np.asarray(weights[key])
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise ValueError(
                f"{key}: expected {ref.dtype}{list(ref.shape)}, got {got.dtype}{list(got.shape)}"
            )


def to_array_record(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Weights as a Flower ``ArrayRecord`` (same keys, same order)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def from_array_record(record: ArrayRecord) -> Weights:
    """An ``ArrayRecord`` back as weights (keys and order kept)."""
    return {k: np.asarray(v.numpy()) for k, v in record.items()}


def _new_estimator(spec: ModelSpec, config: TrainConfig) -> Any:
    """A fitted-shape estimator (one init ``partial_fit`` on a zero row), deterministic."""
    if spec.family == "linear":
        from sklearn.linear_model import SGDClassifier

        est: Any = SGDClassifier(
            loss="log_loss",
            alpha=max(spec.l2, 1e-12),
            learning_rate="constant",
            eta0=config.lr,
            shuffle=False,
            random_state=config.seed,
        )
    else:
        from sklearn.neural_network import MLPClassifier

        est = MLPClassifier(
            hidden_layer_sizes=spec.hidden,
            activation="relu",
            solver=config.optimizer,
            alpha=spec.l2,
            batch_size=config.batch_size,
            learning_rate_init=config.lr,
            momentum=config.momentum,
            nesterovs_momentum=False,
            shuffle=False,
            random_state=config.seed,
        )
    zero = np.zeros((1, spec.n_features), dtype=_DTYPE)
    with _quiet():
        est.partial_fit(zero, spec.classes[:1], classes=spec.classes)
    if spec.family == "mlp":
        vars(est).pop("_optimizer", None)  # the init step's optimizer state is not kept
    return est


def _check_xy(x: np.ndarray, y: np.ndarray, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=_DTYPE)
    y = np.asarray(y, dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != spec.n_features or y.shape != (x.shape[0],):
        raise ValueError(
            f"expected x [N, {spec.n_features}] and y [N], got {list(x.shape)} and {list(y.shape)}"
        )
    if len(y) and (y.min() < 0 or y.max() >= spec.n_classes):
        raise ValueError(f"labels must be in [0, {spec.n_classes}), got {y.min()}..{y.max()}")
    return x, y


@contextmanager
def _quiet() -> Iterator[None]:
    """One BLAS thread (small matrices; shared cores) and no ConvergenceWarning noise."""
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        # the last mini-batch of an epoch may be shorter than ``batch_size``: that is intended
        warnings.filterwarnings("ignore", message="Got `batch_size`", category=UserWarning)
        yield
