"""Strategy selection by name, and the guard every run puts in front of Flower's aggregation.

``build_strategy(spec, population=N)`` returns a Flower strategy from
``flwr.serverapp.strategy`` (FedAvg by default; FedProx, FedAdam, FedAvgM, FedMedian,
FedTrimmedAvg, Krum with their own parameters), optionally wrapped in Flower's
``DifferentialPrivacyServerSideFixedClipping`` with Flower's RDP accountant (ε at
``target_delta``; needs ``dp-accounting``, i.e. ``flwr[dp]``). Flower's accountant only
supports FedAvg's own aggregation with equal client weights and no sampling amplification, so
an accounted run weights clients by ``unit-weight`` (1 each) instead of ``num-examples``.

``GuardedStrategy`` wraps any strategy; it never aggregates itself. Per round it:

- drops error replies and updates that fail ``validate_update`` (exactly the global model's
  keys, shapes and dtypes, finite values, L2 norm of ``update - global`` within a bound, the
  expected metric keys with finite values and a positive example count), recording a
  ``Rejection`` against the sender's node id;
- aggregates only if at least ``quorum`` valid updates remain (FedAvg alone would aggregate
  whatever arrived before the timeout);
- records a ``TrainOutcome`` per round (the new global arrays, contributors with their sample
  counts, rejections, aggregated metrics, time spent in the wrapped ``aggregate_train``, ε);
- shifts Flower's round numbers by ``round_offset``, so a resumed run continues its count;
- takes each training reply's reference counts (the ``refstats`` ``ConfigRecord``, see
  ``app.train_reply``) out of it, so the wrapped strategy sees Flower's usual reply, and checks
  them with ``read_summary`` (a malformed one rejects the reply; a missing one only leaves
  that device out of the reference statistics).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from edgefleet.protocol.errors import MalformedError
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as fs

from .app import REFSTATS_KEY
from .trainer import from_array_record

if TYPE_CHECKING:
    from edgefleet.models.refstats import LocalSummary

__all__ = [
    "EVAL_METRIC_KEYS",
    "STRATEGIES",
    "TRAIN_METRIC_KEYS",
    "Contribution",
    "DpSpec",
    "GuardedStrategy",
    "Rejection",
    "SummaryReader",
    "StrategySpec",
    "TrainOutcome",
    "UpdatePolicy",
    "build_strategy",
    "validate_update",
]

log = logging.getLogger(__name__)

STRATEGIES: dict[str, type[fs.FedAvg]] = {
    "fedavg": fs.FedAvg,
    "fedprox": fs.FedProx,
    "fedadam": fs.FedAdam,
    "fedavgm": fs.FedAvgM,
    "fedmedian": fs.FedMedian,
    "fedtrimmedavg": fs.FedTrimmedAvg,
    "krum": fs.Krum,
}
SummaryReader = Callable[[Mapping[str, Any], int], "LocalSummary"]  # (record, rows) -> checked
WEIGHT_KEY = "num-examples"
UNIT_WEIGHT_KEY = "unit-weight"
TRAIN_METRIC_KEYS = frozenset({WEIGHT_KEY, UNIT_WEIGHT_KEY, "train-loss", "train-accuracy"})
EVAL_METRIC_KEYS = frozenset({WEIGHT_KEY, UNIT_WEIGHT_KEY, "eval-loss", "eval-accuracy"})


@dataclass(frozen=True, kw_only=True)
class DpSpec:
    """Central DP: server-side fixed clipping of each update, Gaussian noise on the sum."""

    noise_multiplier: float  # z: noise stdev = z * clipping_norm / sampled clients
    clipping_norm: float  # L2 bound of each client's update
    target_delta: float = 1e-5  # ε is reported at this δ
    account: bool = True  # Flower's RDP accountant (FedAvg only)

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and self.clipping_norm > 0):
            raise ValueError(
                f"need noise_multiplier >= 0 and clipping_norm > 0, got "
                f"{self.noise_multiplier}, {self.clipping_norm}"
            )


@dataclass(frozen=True, kw_only=True)
class StrategySpec:
    """Which Flower strategy, with its own parameters and the sampling settings."""

    name: str = "fedavg"
    params: Mapping[str, float] = field(default_factory=dict)  # e.g. {"proximal_mu": 0.1}
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    dp: DpSpec | None = None

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {self.name!r}")
        allowed = set(inspect.signature(STRATEGIES[self.name].__init__).parameters)
        unknown = set(self.params) - (allowed - set(_COMMON))
        if unknown:
            raise ValueError(f"{self.name}: unknown parameters {sorted(unknown)}")

    def sample_size(self, population: int) -> int:
        """How many clients Flower's FedAvg samples for training out of ``population``."""
        return max(int(population * self.fraction_train), self.min_train_nodes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": dict(self.params),
            "fraction_train": self.fraction_train,
            "fraction_evaluate": self.fraction_evaluate,
            "min_train_nodes": self.min_train_nodes,
            "dp": None if self.dp is None else vars(self.dp).copy(),
        }


_COMMON = (
    "fraction_train",
    "fraction_evaluate",
    "min_train_nodes",
    "min_evaluate_nodes",
    "min_available_nodes",
    "weighted_by_key",
)


def build_strategy(spec: StrategySpec, *, population: int) -> fs.Strategy:
    """The Flower strategy ``spec`` names, DP-wrapped if asked, for ``population`` clients."""
    accounted = spec.dp is not None and spec.dp.account and spec.dp.noise_multiplier > 0
    params: dict[str, Any] = dict(spec.params)
    inner = STRATEGIES[spec.name](
        fraction_train=spec.fraction_train,
        fraction_evaluate=spec.fraction_evaluate,
        min_train_nodes=spec.min_train_nodes,
        min_evaluate_nodes=spec.min_evaluate_nodes,
        min_available_nodes=spec.min_available_nodes,
        weighted_by_key=UNIT_WEIGHT_KEY if accounted else WEIGHT_KEY,
        **params,
    )
    if spec.dp is None:
        return inner
    accountant = None
    if accounted:
        from flwr.serverapp import (
            NeighboringRelation,
            PrivacyConfig,
            RdpAccountant,
            SamplingMethod,
        )

        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=spec.dp.target_delta,
                population_size=population,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
    return fs.DifferentialPrivacyServerSideFixedClipping(
        inner,
        noise_multiplier=spec.dp.noise_multiplier,
        clipping_norm=spec.dp.clipping_norm,
        num_sampled_clients=spec.sample_size(population),
        accountant=accountant,
    )


@dataclass(frozen=True, kw_only=True)
class UpdatePolicy:
    """What a client update must satisfy before it reaches the strategy."""

    quorum: int = 1  # fewer valid updates than this: the round is not aggregated
    max_update_norm: float | None = None  # L2 of (update - global) over all arrays
    max_examples: int | None = None  # a claimed sample count above this is refused

    def __post_init__(self) -> None:
        if self.quorum < 1:
            raise ValueError(f"quorum must be >= 1, got {self.quorum}")
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ValueError(f"max_update_norm must be > 0, got {self.max_update_norm}")


@dataclass(frozen=True, kw_only=True)
class Rejection:
    node_id: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class Contribution:
    node_id: int
    num_examples: int


@dataclass(frozen=True, kw_only=True)
class TrainOutcome:
    """One round's training step as the guard saw it (``arrays`` None: not aggregated)."""

    server_round: int
    arrays: ArrayRecord | None
    metrics: dict[str, float]
    contributors: tuple[Contribution, ...]
    rejected: tuple[Rejection, ...]
    skipped: str = ""  # why the round was not aggregated
    aggregate_seconds: float = 0.0  # inside the wrapped strategy's aggregate_train
    screen_seconds: float = 0.0  # validating the replies
    epsilon: float | None = None  # cumulative, from Flower's accountant
    summaries: Mapping[int, LocalSummary] = field(default_factory=dict)  # node -> its counts


def validate_update(
    reply: Message, global_arrays: ArrayRecord, policy: UpdatePolicy, *, train: bool = True
) -> int:
    """Raise ``MalformedError`` unless ``reply`` is a well-formed update; return its count."""
    content = reply.content
    if len(content.metric_records) != 1:
        raise MalformedError(f"expected one MetricRecord, got {len(content.metric_records)}")
    metrics = next(iter(content.metric_records.values()))
    expected = TRAIN_METRIC_KEYS if train else EVAL_METRIC_KEYS
    if set(metrics) != expected:
        raise MalformedError(f"expected metrics {sorted(expected)}, got {sorted(metrics)}")
    values = [metrics[k] for k in expected]
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        raise MalformedError("metrics must be finite numbers")
    count = metrics[WEIGHT_KEY]
    if not isinstance(count, int) or count < 1 or metrics[UNIT_WEIGHT_KEY] != 1:
        raise MalformedError(f"num-examples must be a positive integer, got {count!r}")
    if policy.max_examples is not None and count > policy.max_examples:
        raise MalformedError(f"num-examples {count} above the bound {policy.max_examples}")
    if train:
        _validate_arrays(content.array_records, global_arrays, policy)
    return count


def _validate_arrays(
    records: Mapping[str, ArrayRecord], global_arrays: ArrayRecord, policy: UpdatePolicy
) -> None:
    if len(records) != 1:
        raise MalformedError(f"expected one ArrayRecord, got {len(records)}")
    reference = from_array_record(global_arrays)
    try:
        update = from_array_record(next(iter(records.values())))
    except Exception as exc:  # any undecodable array is the sender's fault
        raise MalformedError(f"arrays do not decode: {exc}") from exc
    if list(update) != list(reference):
        raise MalformedError(f"expected arrays {list(reference)}, got {list(update)}")
    sq = 0.0
    for key, ref in reference.items():
        got = update[key]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise MalformedError(
                f"{key}: expected {ref.dtype}{list(ref.shape)}, got {got.dtype}{list(got.shape)}"
            )
        if not np.all(np.isfinite(got)):
            raise MalformedError(f"{key}: non-finite values")
        sq += float(np.sum(np.square(got.astype(np.float64) - ref)))
    norm = math.sqrt(sq)
    if policy.max_update_norm is not None and not norm <= policy.max_update_norm:
        raise MalformedError(f"update norm {norm:.4g} above the bound {policy.max_update_norm}")


class GuardedStrategy(fs.Strategy):
    """Validates, enforces the quorum and records each round around a Flower strategy."""

    def __init__(
        self,
        inner: fs.Strategy,
        *,
        policy: UpdatePolicy | None = None,
        round_offset: int = 0,
        clock: Callable[[], float] = time.perf_counter,
        read_summary: SummaryReader | None = None,  # None: no reference counts were asked for
    ) -> None:
        self.inner = inner
        self.policy = policy or UpdatePolicy()
        self.round_offset = round_offset
        self.clock = clock
        self.read_summary = read_summary
        self.outcomes: dict[int, TrainOutcome] = {}  # by run round (offset applied)
        self.evaluations: dict[int, dict[str, float]] = {}
        self.eval_rejected: dict[int, tuple[Rejection, ...]] = {}
        self._globals: dict[int, ArrayRecord] = {}

    @property
    def epsilon(self) -> float | None:
        spent = getattr(self.inner, "privacy_spent", lambda: None)()
        return None if spent is None else float(spent.epsilon)

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = server_round + self.round_offset
        self._globals[rnd] = arrays
        return self.inner.configure_train(rnd, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        global_arrays = self._globals.pop(rnd)
        t0 = self.clock()
        summaries: dict[int, LocalSummary] = {}
        valid, contributors, rejected = self._screen(
            rnd, replies, global_arrays, train=True, summaries=summaries
        )
        outcome: dict[str, Any] = dict(
            server_round=rnd,
            contributors=contributors,
            rejected=rejected,
            screen_seconds=self.clock() - t0,
            summaries=summaries,
        )
        if len(valid) < self.policy.quorum:
            reason = f"{len(valid)} valid updates, quorum {self.policy.quorum}"
            log.warning("round %d not aggregated: %s", rnd, reason)
            self.outcomes[rnd] = TrainOutcome(arrays=None, metrics={}, skipped=reason, **outcome)
            return None, None
        t0 = self.clock()
        arrays, metrics = self.inner.aggregate_train(rnd, valid)
        elapsed = self.clock() - t0
        skipped = "" if arrays is not None else "the strategy did not aggregate"
        self.outcomes[rnd] = TrainOutcome(
            arrays=arrays,
            metrics=_plain(metrics),
            skipped=skipped,
            aggregate_seconds=elapsed,
            epsilon=self.epsilon,
            **outcome,
        )
        log.info("round %d aggregated %d updates (%d rejected)", rnd, len(valid), len(rejected))
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        rnd = server_round + self.round_offset
        valid, _, rejected = self._screen(rnd, replies, ArrayRecord(), train=False)
        self.eval_rejected[rnd] = rejected
        metrics = self.inner.aggregate_evaluate(rnd, valid) if valid else None
        self.evaluations[rnd] = _plain(metrics)
        return metrics

    def _screen(
        self,
        rnd: int,
        replies: Iterable[Message],
        global_arrays: ArrayRecord,
        *,
        train: bool,
        summaries: dict[int, LocalSummary] | None = None,  # filled: node -> its counts
    ) -> tuple[list[Message], tuple[Contribution, ...], tuple[Rejection, ...]]:
        valid: list[Message] = []
        contributors: list[Contribution] = []
        rejected: list[Rejection] = []
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            try:
                if reply.has_error():
                    raise MalformedError(f"error reply: {reply.error.reason}")
                record = _take_summary(reply) if train else None
                count = validate_update(reply, global_arrays, self.policy, train=train)
                if record is not None and summaries is not None:
                    if self.read_summary is None:
                        raise MalformedError("reference counts that were not asked for")
                    summaries[node] = self.read_summary(record, count)
            except MalformedError as exc:
                log.warning("round %d: dropped the reply of node %d: %s", rnd, node, exc)
                rejected.append(Rejection(node_id=node, reason=str(exc)))
                continue
            valid.append(reply)
            contributors.append(Contribution(node_id=node, num_examples=count))
        return valid, tuple(contributors), tuple(rejected)


def _take_summary(reply: Message) -> dict[str, Any] | None:
    """The reply's reference counts, removed from it (None: it sent none)."""
    if reply.has_error() or REFSTATS_KEY not in reply.content.config_records:
        return None
    record = dict(reply.content.config_records[REFSTATS_KEY])
    del reply.content[REFSTATS_KEY]
    return record


def _plain(metrics: MetricRecord | None) -> dict[str, float]:
    """A MetricRecord as plain floats, without the weighting keys."""
    if metrics is None:
        return {}
    return {
        k: float(v)
        for k, v in metrics.items()
        if k not in (WEIGHT_KEY, UNIT_WEIGHT_KEY) and not isinstance(v, list)
    }
