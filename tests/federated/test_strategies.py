"""Strategy selection, update validation, poisoned and malicious clients, DP accounting."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from edgefleet.federated import wire
from edgefleet.federated.runs import CoordinatorRegistrar, FederatedRun, RunSpec
from edgefleet.federated.strategies import (
    DpSpec,
    StrategySpec,
    UpdatePolicy,
    build_strategy,
    validate_update,
)
from edgefleet.federated.trainer import ModelSpec, TrainConfig, Trainer, to_array_record
from edgefleet.protocol.errors import MalformedError
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as fs

from .conftest import LocalGrid, central_eval, finite, honest_apps, poisoned_app

SPEC = ModelSpec(hidden=(16,))


def run_spec(rounds: int, strategy: StrategySpec, **overrides: Any) -> RunSpec:
    return RunSpec(
        run_id="r",
        model_name="digits-fl",
        rounds=rounds,
        model=ModelSpec(hidden=(64,)),
        train=TrainConfig(optimizer="sgd", lr=0.1, local_epochs=5),
        strategy=strategy,
        **overrides,
    )


def nodes(n: int) -> dict[str, int]:
    return dict(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)


# -- selection ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "params", "cls", "attr"),
    [
        ("fedavg", {}, fs.FedAvg, None),
        ("fedprox", {"proximal_mu": 0.1}, fs.FedProx, "proximal_mu"),
        ("fedadam", {"eta": 0.05}, fs.FedAdam, "eta"),
        ("fedavgm", {"server_momentum": 0.5}, fs.FedAvgM, "server_momentum"),
        ("fedmedian", {}, fs.FedMedian, None),
        ("fedtrimmedavg", {"beta": 0.1}, fs.FedTrimmedAvg, "beta"),
        ("krum", {"num_malicious_nodes": 1}, fs.Krum, "num_malicious_nodes"),
    ],
)
def test_strategy_by_name_with_its_parameters(name, params, cls, attr) -> None:
    strategy = build_strategy(StrategySpec(name=name, params=params), population=5)
    assert type(strategy) is cls
    if attr:
        assert getattr(strategy, attr) == params[attr]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "fedsgd"},
        {"name": "fedavg", "params": {"eta": 1.0}},
        {"name": "krum", "params": {"x": 1}},
    ],
)
def test_unknown_strategy_or_parameter_is_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        StrategySpec(**kwargs)


def test_dp_wraps_the_strategy_with_flowers_accountant() -> None:
    spec = StrategySpec(dp=DpSpec(noise_multiplier=1.0, clipping_norm=2.0), **nodes(5))
    strategy = build_strategy(spec, population=5)
    assert isinstance(strategy, fs.DifferentialPrivacyServerSideFixedClipping)
    assert strategy.accountant is not None and strategy.num_sampled_clients == 5
    assert strategy.strategy.weighted_by_key == "unit-weight"  # accounting needs equal weights
    plain = build_strategy(
        StrategySpec(dp=DpSpec(noise_multiplier=1.0, clipping_norm=2.0, account=False)),
        population=5,
    )
    assert plain.accountant is None and plain.strategy.weighted_by_key == "num-examples"


# -- validation --------------------------------------------------------------------------------
def reply(weights: dict[str, np.ndarray], metrics: dict[str, Any] | None = None) -> Message:
    metrics = metrics or {
        "num-examples": 10,
        "unit-weight": 1,
        "train-loss": 0.5,
        "train-accuracy": 0.9,
    }
    content = RecordDict({"arrays": to_array_record(weights), "metrics": MetricRecord(metrics)})
    wire.set_task_identity(1)  # what Message(...) reads; a Grid sets it in set_run
    return Message(content, dst_node_id=1, message_type="train")


GLOBAL = Trainer(spec=SPEC).weights()


def _with(key: str, value: np.ndarray) -> dict[str, np.ndarray]:
    return {**GLOBAL, key: value}


BAD_UPDATES = {
    "nan": _with("coefs.0", np.full_like(GLOBAL["coefs.0"], np.nan)),
    "inf": _with("intercepts.1", np.full_like(GLOBAL["intercepts.1"], np.inf)),
    "wrong shape": _with("coefs.0", np.zeros((64, 17), np.float32)),
    "wrong dtype": _with("coefs.0", GLOBAL["coefs.0"].astype(np.float64)),
    "missing array": {k: v for k, v in GLOBAL.items() if k != "coefs.1"},
    "extra array": {**GLOBAL, "backdoor": np.zeros(3, np.float32)},
    "huge norm": _with("coefs.0", GLOBAL["coefs.0"] + 1e3),
}


@pytest.mark.parametrize("case", sorted(BAD_UPDATES))
def test_bad_update_is_refused(case: str) -> None:
    policy = UpdatePolicy(max_update_norm=50.0)
    with pytest.raises(MalformedError):
        validate_update(reply(BAD_UPDATES[case]), to_array_record(GLOBAL), policy)


BAD_METRICS = {
    "zero examples": {"num-examples": 0},
    "float examples": {"num-examples": 10.5},
    "too many examples": {"num-examples": 10**9},
    "nan loss": {"train-loss": float("nan")},
    "unit weight 5": {"unit-weight": 5},
}


@pytest.mark.parametrize("case", sorted(BAD_METRICS))
def test_bad_metrics_are_refused(case: str) -> None:
    metrics = {"num-examples": 10, "unit-weight": 1, "train-loss": 0.5, "train-accuracy": 0.9}
    metrics.update(BAD_METRICS[case])
    with pytest.raises(MalformedError):
        validate_update(
            reply(GLOBAL, metrics), to_array_record(GLOBAL), UpdatePolicy(max_examples=10**6)
        )


def test_extra_metric_key_is_refused_not_a_crash() -> None:
    metrics = {
        "num-examples": 10,
        "unit-weight": 1,
        "train-loss": 0.5,
        "train-accuracy": 0.9,
        "x": 1.0,
    }
    with pytest.raises(MalformedError, match="expected metrics"):
        validate_update(reply(GLOBAL, metrics), to_array_record(GLOBAL), UpdatePolicy())


def test_a_good_update_passes_and_returns_its_count() -> None:
    moved = _with("coefs.0", GLOBAL["coefs.0"] + 0.01)
    assert (
        validate_update(reply(moved), to_array_record(GLOBAL), UpdatePolicy(max_update_norm=5))
        == 10
    )


# -- poisoned and malicious clients in a run ---------------------------------------------------
POISONS = {
    "nan": lambda w: {**w, "coefs.0": np.full_like(w["coefs.0"], np.nan)},
    "shape": lambda w: {**w, "coefs.1": np.zeros((64, 11), np.float32)},
    "norm": lambda w: {k: v * 1e4 for k, v in w.items()},
}


def test_poisoned_updates_are_rejected_and_the_model_stays_accurate(federation, coordinator):
    apps = honest_apps(federation)
    for i, name in enumerate(sorted(POISONS)):
        apps[10 + i] = poisoned_app(federation.clients[i], POISONS[name])
    result = FederatedRun(
        run_spec(4, StrategySpec(**nodes(8)), policy=UpdatePolicy(quorum=3, max_update_norm=100.0)),
        registrar=CoordinatorRegistrar(coordinator),
        central_eval=central_eval(federation),
    ).execute(LocalGrid(apps))
    assert [r.version for r in result.rounds] != [None] * 4
    for record in result.rounds:
        rejected = {r["device_id"]: r["reason"] for r in record.lineage["fl"]["rejected"]}
        assert set(rejected) == {"dev-10", "dev-11", "dev-12"}
        assert "non-finite" in rejected["dev-10"]  # sorted: nan, norm, shape
        assert "norm" in rejected["dev-11"] and "expected float32" in rejected["dev-12"]
        assert {c["device_id"] for c in record.lineage["fl"]["contributors"]} == {
            f"dev-{i}" for i in range(1, 6)
        }
    assert finite(result.weights)
    assert result.rounds[-1].lineage["fl"]["metrics"]["central"]["accuracy"] >= 0.9


def scaled_attacker(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A finite, well-formed update pointing far away (within any sane dtype/shape check)."""
    return {k: -20.0 * v for k, v in w.items()}


@pytest.mark.parametrize(
    ("name", "params", "floor", "ceiling"),
    [
        ("fedavg", {}, 0.0, 0.5),  # the attacker wrecks plain FedAvg: the others are not luck
        ("fedmedian", {}, 0.85, 1.0),
        # Krum keeps one client's model: never the attacker's, but on label-skewed (non-IID)
        # partitions one client's model is much weaker than an average
        ("krum", {"num_malicious_nodes": 1}, 0.5, 1.0),
    ],
)
def test_robust_strategy_tolerates_one_malicious_client(
    federation, coordinator, name, params, floor, ceiling
) -> None:
    apps = honest_apps(federation)
    apps[9] = poisoned_app(federation.clients[0], scaled_attacker)
    result = FederatedRun(
        run_spec(3, StrategySpec(name=name, params=params, **nodes(6))),  # no norm bound
        registrar=CoordinatorRegistrar(coordinator),
        central_eval=central_eval(federation),
    ).execute(LocalGrid(apps))
    accuracy = result.rounds[-1].lineage["fl"]["metrics"]["central"]["accuracy"]
    print(name, "under attack:", accuracy)
    assert floor <= accuracy <= ceiling, accuracy
    assert finite(result.weights)


# -- differential privacy ----------------------------------------------------------------------
def test_dp_run_records_noise_clip_and_epsilon(federation, coordinator) -> None:
    from flwr.serverapp import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )

    dp = DpSpec(noise_multiplier=1.0, clipping_norm=5.0, target_delta=1e-5)
    result = FederatedRun(
        run_spec(2, StrategySpec(dp=dp, **nodes(5))),
        registrar=CoordinatorRegistrar(coordinator),
        central_eval=central_eval(federation),
    ).execute(LocalGrid(honest_apps(federation)))
    reference = RdpAccountant(
        PrivacyConfig(
            target_delta=1e-5,
            population_size=5,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    for record in result.rounds:
        reference.compose(
            GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=5, population_size=5)
        )
        rec = record.lineage["fl"]["dp"]
        assert rec["noise_multiplier"] == 1.0 and rec["clipping_norm"] == 5.0
        assert rec["delta"] == 1e-5
        assert rec["epsilon"] == pytest.approx(reference.get_epsilon(1e-5))
        print(
            "round",
            record.round,
            "epsilon",
            rec["epsilon"],
            "accuracy",
            record.lineage["fl"]["metrics"]["central"]["accuracy"],
        )
    eps = [r.lineage["fl"]["dp"]["epsilon"] for r in result.rounds]
    assert eps[0] < eps[1]
    assert finite(result.weights)


def test_dp_epsilon_keeps_accumulating_after_resume(federation, coordinator) -> None:
    dp = DpSpec(noise_multiplier=2.0, clipping_norm=5.0)
    registrar = CoordinatorRegistrar(coordinator)
    first = FederatedRun(run_spec(1, StrategySpec(dp=dp, **nodes(5))), registrar=registrar)
    one = first.execute(LocalGrid(honest_apps(federation))).rounds[0]
    again = FederatedRun(run_spec(2, StrategySpec(dp=dp, **nodes(5))), registrar=registrar)
    two = again.execute(LocalGrid(honest_apps(federation))).rounds[0]
    assert two.round == 2
    assert two.lineage["fl"]["dp"]["epsilon"] > one.lineage["fl"]["dp"]["epsilon"]
