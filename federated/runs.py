"""A federated run: R rounds of a Flower strategy, each round's global model a registry version.

``FederatedRun(spec, registrar=CoordinatorRegistrar(coordinator)).execute(grid)`` runs the
strategy's own ``start`` loop (through ``GuardedStrategy``: validation, quorum) on any Flower
``Grid``. At the end of every aggregated round (Flower's ``evaluate_fn`` hook, after the
clients' evaluation) the global model is exported to ONNX and registered through
``Coordinator.register_model`` with this lineage::

    {"parent": <previous version of this run, or the version it resumed from>,
     "fl": {"run_id", "round", "rounds", "strategy": {name, params, fraction, dp}, "model",
            "train", "quorum", "contributors": [{"device_id", "node_id", "num_examples"}],
            "num_examples", "rejected": [{"device_id", "node_id", "reason"}],
            "metrics": {"train", "eval", "central"},
            "dp": {"noise_multiplier", "clipping_norm", "epsilon", "delta",
                   "accountant_blob"} | None,
            "weights_blob": <SHA-256 of the exact float32 weights (.npz) in the blob store>,
            "reference": {"source": "device counts", "devices", "n", "grid": {lo, hi, bins}}
                         | {"source": "none", "why"}}}

The drift reference (the manifest's ``reference_stats``) of each version is built without a
row leaving a device: every training reply carries the device's counts of its own training
rows over a grid fixed before the run (``RunSpec.reference``: the same evenly spaced edges for
every feature, ``lo..hi`` being the model's input range; digits are scaled to 0..1), and the
coordinator merges the latest counts of every device that contributed so far in this run
(``models.refstats``: exact shares, mean, variance and class prior; quantiles within one grid
bin). So the statistics describe the training data of the run's contributors, which is what
the model was trained on. The counts are not noised: a run with differential privacy collects
none, and its versions carry no drift reference (the lineage says why).

A round that is not aggregated (below quorum) registers nothing and the next round starts
from the same global model. ``execute`` on a run id that already has registered rounds resumes
after the last one: its weights (exact, from the blob), its version as parent, and the DP
accountant's state, so ε keeps accumulating. What is not restored: a server-side optimizer's
state (FedAdam's moments, FedAvgM's momentum) starts afresh.

Device ids come from the grid if it has ``device_of(node_id)`` (the MQTT grid does), else the
node id as a string.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from edgefleet.models.refstats import LocalSummary, parse_summary, stats_from_summary, uniform_edges
from edgefleet.protocol.drift import MAX_CLASSES as DRIFT_MAX_CLASSES
from edgefleet.protocol.drift import MAX_FEATURES as DRIFT_MAX_FEATURES
from edgefleet.protocol.drift import ReferenceStats
from edgefleet.protocol.errors import DecodeError

from .app import REFSTATS_EDGES_KEY
from .strategies import StrategySpec, TrainOutcome, UpdatePolicy
from .trainer import ModelSpec, TrainConfig, Trainer, Weights

if TYPE_CHECKING:
    from edgefleet.coordinator.home import Coordinator
    from flwr.app import ArrayRecord, MetricRecord
    from flwr.serverapp import Grid

__all__ = [
    "CoordinatorRegistrar",
    "FederatedRun",
    "ReferenceGrid",
    "Registrar",
    "RoundRecord",
    "RunResult",
    "RunSpec",
    "Version",
    "run_spec",
]

log = logging.getLogger(__name__)

SMOKE_COUNT = 3
SMOKE_ATOL = 1e-4
CentralEval = Callable[[Trainer], dict[str, float]]


@dataclass(frozen=True, kw_only=True)
class ReferenceGrid:
    """The edges devices count their training rows over, for the drift reference."""

    lo: float = 0.0  # the model's input range (values outside count in the outer bins)
    hi: float = 1.0
    bins: int = 32  # grid bins per feature (the reference picks its cuts among their edges)

    def edges(self) -> np.ndarray:
        return uniform_edges(self.lo, self.hi, self.bins)


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    run_id: str
    model_name: str
    rounds: int
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategySpec = field(default_factory=StrategySpec)
    policy: UpdatePolicy = field(default_factory=UpdatePolicy)
    round_timeout: float = 600.0  # seconds the grid waits for replies per step
    seed: int = 0  # initial global model
    reference: ReferenceGrid | None = field(default_factory=ReferenceGrid)  # None: no counts

    def __post_init__(self) -> None:
        if not self.run_id or not self.model_name or self.rounds < 1:
            raise ValueError("a run needs a run_id, a model_name and rounds >= 1")
        if self.reference is not None:
            self.reference.edges()  # ValueError for a grid no device could count over

    @property
    def reference_grid(self) -> ReferenceGrid | None:
        """The grid the devices count over; None without one, with differential privacy (the
        counts are not noised), or for a model no manifest could carry the reference of (more
        than ``drift.MAX_FEATURES`` inputs or ``MAX_CLASSES`` classes): then nothing is sent
        to the devices nor counted there."""
        if self.strategy.dp is not None or not self._reference_fits:
            return None
        return self.reference

    @property
    def _reference_fits(self) -> bool:
        return (self.model.n_features <= DRIFT_MAX_FEATURES
                and self.model.n_classes <= DRIFT_MAX_CLASSES)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Version:
    """A registered model version as a run sees it."""

    version: str
    lineage: Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class RoundRecord:
    round: int
    version: str | None  # None: not aggregated
    parent: str | None
    lineage: Mapping[str, Any]
    skipped: str = ""
    aggregate_seconds: float = 0.0  # the strategy's own aggregate_train (incl. DP noise)
    coordinator_seconds: float = 0.0  # validation + aggregation + export + registration


@dataclass(frozen=True, kw_only=True)
class RunResult:
    run_id: str
    rounds: tuple[RoundRecord, ...]
    weights: Weights  # the final global model
    version: str | None  # its registered version (None if nothing was ever registered)


class Registrar(Protocol):
    """What a run needs from the model registry."""

    def register(
        self, *, name: str, onnx: bytes, meta: dict[str, Any], lineage: dict[str, Any]
    ) -> str: ...
    def versions(self, name: str) -> list[Version]: ...
    def put_blob(self, data: bytes) -> str: ...
    def get_blob(self, digest: str) -> bytes: ...


@runtime_checkable
class NodeDirectory(Protocol):
    def device_of(self, node_id: int) -> str | None: ...


class CoordinatorRegistrar:
    """``Registrar`` over ``Coordinator.register_model`` and its blob store."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def register(
        self, *, name: str, onnx: bytes, meta: dict[str, Any], lineage: dict[str, Any]
    ) -> str:
        with tempfile.TemporaryDirectory(prefix="edgefleet-fl-") as tmp:
            path = Path(tmp) / f"{name}.onnx"
            path.write_bytes(onnx)
            path.with_suffix(".json").write_text(json.dumps(meta))
            mv = self.coordinator.register_model(name, path, lineage=lineage)
        return mv.version

    def versions(self, name: str) -> list[Version]:
        return [
            Version(version=mv.version, lineage=mv.lineage)
            for mv in self.coordinator.registry.models()
            if mv.name == name
        ]

    def put_blob(self, data: bytes) -> str:
        return self.coordinator.blobs.put(data)

    def get_blob(self, digest: str) -> bytes:
        return self.coordinator.blobs.get(digest)


class FederatedRun:
    """One run; ``execute(grid)`` is what the ServerApp's ``main`` calls."""

    def __init__(
        self,
        spec: RunSpec,
        *,
        registrar: Registrar,
        central_eval: CentralEval | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.spec = spec
        self.registrar = registrar
        self.central_eval = central_eval
        self.on_round = on_round
        self.clock = clock

    def history(self) -> list[Version]:
        """This run's registered versions, by round."""
        mine = [
            v
            for v in self.registrar.versions(self.spec.model_name)
            if v.lineage.get("fl", {}).get("run_id") == self.spec.run_id
        ]
        return sorted(mine, key=lambda v: int(v.lineage["fl"]["round"]))

    def execute(self, grid: Grid) -> RunResult:
        from flwr.app import ConfigRecord

        from .strategies import GuardedStrategy, build_strategy
        from .trainer import to_array_record

        last = self.history()[-1] if self.history() else None
        done = int(last.lineage["fl"]["round"]) if last else 0
        weights = self._weights(last)
        population = len(list(grid.get_node_ids()))
        inner = build_strategy(self.spec.strategy, population=population)
        if last is not None:
            self._restore_accountant(inner, last)
        grid_spec = self.spec.reference_grid
        guard = GuardedStrategy(inner, policy=self.spec.policy, round_offset=done,
                                clock=self.clock, read_summary=self._summary_reader())  # fmt: skip
        state = _RunState(grid=grid, guard=guard, parent=last.version if last else None)
        remaining = self.spec.rounds - done
        if remaining <= 0:
            log.info("run %s: all %d rounds already registered", self.spec.run_id, done)
            return RunResult(
                run_id=self.spec.run_id, rounds=(), weights=weights, version=state.parent
            )
        log.info(
            "run %s: rounds %d..%d on %d nodes",
            self.spec.run_id,
            done + 1,
            self.spec.rounds,
            population,
        )
        model_config = self.spec.model.to_config()
        train_config = {**model_config, **self.spec.train.to_config()}
        if grid_spec is not None:
            train_config[REFSTATS_EDGES_KEY] = [float(e) for e in grid_spec.edges()]
        result = guard.start(
            grid,
            to_array_record(weights),
            num_rounds=remaining,
            timeout=self.spec.round_timeout,
            train_config=ConfigRecord(train_config),
            evaluate_config=ConfigRecord(model_config),
            evaluate_fn=lambda rnd, arrays: self._round_end(state, rnd + done, arrays),
        )
        from .trainer import from_array_record

        final = from_array_record(result.arrays) if len(result.arrays) else weights
        return RunResult(
            run_id=self.spec.run_id,
            rounds=tuple(state.records),
            weights=final,
            version=state.parent,
        )

    # -- one round ------------------------------------------------------------------------
    def _round_end(self, state: _RunState, rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
        from flwr.app import MetricRecord

        from .trainer import from_array_record

        if rnd == state.guard.round_offset:  # Flower's evaluation of the initial model
            return None
        outcome = state.guard.outcomes.get(rnd)
        if outcome is None or outcome.arrays is None:
            skipped = outcome.skipped if outcome else "no training replies"
            self._record(
                state,
                RoundRecord(
                    round=rnd, version=None, parent=state.parent, lineage={}, skipped=skipped
                ),
            )
            return None
        t0 = self.clock()
        trainer = _shell(self.spec.model)
        trainer.set_weights(from_array_record(arrays))
        central = self.central_eval(trainer) if self.central_eval else {}
        state.summaries.update(outcome.summaries)
        stats, reference = self._reference(state)
        lineage = self._lineage(state, outcome, trainer, central)
        lineage["fl"]["reference"] = reference
        meta = self._meta(trainer, central or state.guard.evaluations.get(rnd, {}))
        if stats is not None:
            meta["feature_stats"] = stats
        version = self.registrar.register(
            name=self.spec.model_name, onnx=trainer.to_onnx(), meta=meta, lineage=lineage
        )
        record = RoundRecord(
            round=rnd,
            version=version,
            parent=state.parent,
            lineage=lineage,
            aggregate_seconds=outcome.aggregate_seconds,
            coordinator_seconds=outcome.aggregate_seconds
            + outcome.screen_seconds
            + (self.clock() - t0),
        )
        state.parent = version
        self._record(state, record)
        values: dict[str, int | float | list[int] | list[float]] = dict(central)
        return MetricRecord(values) if central else None

    def _record(self, state: _RunState, record: RoundRecord) -> None:
        state.records.append(record)
        if record.version is None:
            log.warning(
                "run %s round %d: not aggregated (%s)",
                self.spec.run_id,
                record.round,
                record.skipped,
            )
        else:
            log.info(
                "run %s round %d: registered %s version %s",
                self.spec.run_id,
                record.round,
                self.spec.model_name,
                record.version,
            )
        if self.on_round is not None:
            self.on_round(record)

    def _lineage(
        self, state: _RunState, outcome: TrainOutcome, trainer: Trainer, central: dict[str, float]
    ) -> dict[str, Any]:
        device = _device_namer(state.grid)
        spec = self.spec
        fl: dict[str, Any] = {
            "run_id": spec.run_id,
            "round": outcome.server_round,
            "rounds": spec.rounds,
            "strategy": spec.strategy.to_dict(),
            "model": {**vars(spec.model), "hidden": list(spec.model.hidden)},
            "train": vars(spec.train).copy(),
            "quorum": spec.policy.quorum,
            "contributors": [
                {
                    "device_id": device(c.node_id),
                    "node_id": c.node_id,
                    "num_examples": c.num_examples,
                }
                for c in outcome.contributors
            ],
            "num_examples": sum(c.num_examples for c in outcome.contributors),
            "rejected": [
                {"device_id": device(r.node_id), "node_id": r.node_id, "reason": r.reason}
                for r in outcome.rejected
            ],
            "metrics": {
                "train": outcome.metrics,
                "eval": state.guard.evaluations.get(outcome.server_round, {}),
                "central": central,
            },
            "dp": self._dp(state, outcome),
            "weights_blob": self.registrar.put_blob(_npz(trainer.weights())),
        }
        return {"parent": state.parent, "fl": fl}

    def _summary_reader(self) -> Callable[[Mapping[str, Any], int], LocalSummary] | None:
        grid, model = self.spec.reference_grid, self.spec.model
        if grid is None:
            return None
        return lambda record, rows: parse_summary(record, features=model.n_features,
                                                  edges=grid.bins + 1, n_classes=model.n_classes,
                                                  n=rows)  # fmt: skip

    def _reference(self, state: _RunState) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """The drift reference from the devices' counts so far, and what it describes."""
        grid = self.spec.reference_grid
        if grid is None:
            why = ("no grid" if self.spec.reference is None
                   else "differential privacy" if self.spec.strategy.dp is not None
                   else f"{self.spec.model.n_features} inputs, {self.spec.model.n_classes} "
                        "classes: more than a manifest's drift reference holds")  # fmt: skip
            return None, {"source": "none", "why": f"{why}: no counts were collected"}
        if not state.summaries:
            return None, {"source": "none", "why": "no device sent its counts"}
        total = LocalSummary.merge(state.summaries.values())
        if total.n < 2:
            return None, {"source": "none", "why": f"{total.n} training row in the counts"}
        stats = stats_from_summary(total, grid.edges())
        try:
            ReferenceStats.from_dict(stats)  # what every manifest must carry (size bounds)
        except DecodeError as exc:
            return None, {"source": "none", "why": f"the counts do not fit a manifest: {exc}"}
        device = _device_namer(state.grid)
        return stats, {
            "source": "device counts",
            "devices": sorted(device(n) for n in state.summaries),
            "n": total.n,
            "grid": {"lo": grid.lo, "hi": grid.hi, "bins": grid.bins},
        }

    def _dp(self, state: _RunState, outcome: TrainOutcome) -> dict[str, Any] | None:
        dp = self.spec.strategy.dp
        if dp is None:
            return None
        accountant = getattr(state.guard.inner, "accountant", None)
        blob = None
        if accountant is not None:
            blob = self.registrar.put_blob(json.dumps(accountant.state_dict()).encode())
        return {
            "noise_multiplier": dp.noise_multiplier,
            "clipping_norm": dp.clipping_norm,
            "epsilon": outcome.epsilon,
            "delta": dp.target_delta if outcome.epsilon is not None else None,
            "accountant_blob": blob,
        }

    def _meta(self, trainer: Trainer, metrics: Mapping[str, float]) -> dict[str, Any]:
        n_in, n_out = self.spec.model.n_features, self.spec.model.n_classes
        smoke_x = np.random.default_rng(0).random((SMOKE_COUNT, n_in), dtype=np.float32)
        meta: dict[str, Any] = {
            "input": {"name": "input", "dtype": "float32", "shape": [None, n_in]},
            "output": {"name": "probabilities", "dtype": "float32", "shape": [None, n_out]},
            "smoke": {
                "x": smoke_x.tolist(),
                "probabilities": trainer.predict_proba(smoke_x).tolist(),
                "atol": SMOKE_ATOL,
            },
        }
        accuracy = metrics.get("accuracy", metrics.get("eval-accuracy"))
        if accuracy is not None:
            meta["accuracy"] = float(accuracy)
        return meta

    # -- resume ---------------------------------------------------------------------------
    def _weights(self, last: Version | None) -> Weights:
        if last is None:
            return _shell(self.spec.model, seed=self.spec.seed).weights()
        data = self.registrar.get_blob(last.lineage["fl"]["weights_blob"])
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            weights = {k: np.asarray(npz[k]) for k in npz.files}
        _shell(self.spec.model).set_weights(weights)  # same architecture, or ValueError
        return weights

    def _restore_accountant(self, inner: object, last: Version) -> None:
        accountant = getattr(inner, "accountant", None)
        dp = last.lineage["fl"].get("dp") or {}
        if accountant is not None and dp.get("accountant_blob"):
            accountant.load_state_dict(json.loads(self.registrar.get_blob(dp["accountant_blob"])))


@dataclass(kw_only=True)
class _RunState:
    grid: Any
    guard: Any
    parent: str | None
    records: list[RoundRecord] = field(default_factory=list)
    summaries: dict[int, LocalSummary] = field(default_factory=dict)  # node -> its latest counts


def _shell(spec: ModelSpec, *, seed: int = 0) -> Trainer:
    """A model of ``spec`` to hold weights (its optimizer settings are never used)."""
    return Trainer(spec=spec, config=TrainConfig(optimizer="sgd", seed=seed))


def _device_namer(grid: object) -> Callable[[int], str]:
    if isinstance(grid, NodeDirectory):
        directory = grid
        return lambda node_id: directory.device_of(node_id) or str(node_id)
    return str


def _npz(weights: Weights) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **weights)  # type: ignore[arg-type]  # numpy's stub wants a positional array
    return buf.getvalue()


def run_spec(
    *,
    name: str,
    rounds: int,
    run_id: str = "",
    min_clients: int = 2,
    quorum: int = 0,
    fraction: float = 1.0,
    params: Mapping[str, float] | None = None,
    family: str = "mlp",
    hidden: tuple[int, ...] = (64,),
    features: int = 64,
    classes: int = 10,
    strategy: str = "fedavg",
    local_epochs: int = 5,
    lr: float = 0.1,
    optimizer: str = "sgd",
    round_timeout: float = 60.0,
    seed: int = 0,
    max_update_norm: float | None = None,
    dp_noise: float | None = None,
    dp_clip: float | None = None,
) -> RunSpec:
    """A run's spec from the options of ``edgefleet fl start`` (and the API's FL route), with
    the same defaults; ``ValueError`` in one line for options that do not fit together."""
    from .strategies import DpSpec

    dp = None
    if dp_noise is not None or dp_clip is not None:
        if dp_noise is None or dp_clip is None:
            raise ValueError("differential privacy needs both --dp-noise and --dp-clip")
        dp = DpSpec(noise_multiplier=dp_noise, clipping_norm=dp_clip)
    k = min_clients
    return RunSpec(
        run_id=run_id or f"{name}-{int(time.time())}",
        model_name=name,
        rounds=rounds,
        model=ModelSpec(family=family, n_features=features, n_classes=classes, hidden=hidden),
        train=TrainConfig(local_epochs=local_epochs, lr=lr, optimizer=optimizer, seed=seed),
        strategy=StrategySpec(name=strategy, params=dict(params or {}), fraction_train=fraction,
                              fraction_evaluate=fraction, min_train_nodes=k,
                              min_evaluate_nodes=k, min_available_nodes=k, dp=dp),
        policy=UpdatePolicy(quorum=quorum or k, max_update_norm=max_update_norm),
        round_timeout=round_timeout,
        seed=seed,
    )  # fmt: skip
