"""Runs: accuracy against a centralized baseline, one registry version per round, resume."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from edgefleet.federated.app import build_client_app
from edgefleet.federated.runs import CoordinatorRegistrar, FederatedRun, RoundRecord, RunSpec
from edgefleet.federated.strategies import StrategySpec, UpdatePolicy
from edgefleet.federated.trainer import ModelSpec, TrainConfig, Trainer
from edgefleet.models.digits import load_digits_split, train_digits

from .conftest import N_CLIENTS, SEED, LocalGrid, central_eval, honest_apps

HIDDEN = 64


def spec(rounds: int, **overrides: Any) -> RunSpec:
    fields: dict[str, Any] = dict(
        run_id="run-1",
        model_name="digits-fl",
        rounds=rounds,
        model=ModelSpec(hidden=(HIDDEN,)),
        train=TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, local_epochs=5, seed=SEED),
        strategy=StrategySpec(
            min_train_nodes=N_CLIENTS, min_evaluate_nodes=N_CLIENTS, min_available_nodes=N_CLIENTS
        ),
        policy=UpdatePolicy(quorum=3, max_update_norm=100.0),
    )
    fields.update(overrides)
    return RunSpec(**fields)


@pytest.fixture(scope="module")
def ten_rounds(federation, tmp_path_factory):  # type: ignore[no-untyped-def]
    """One 10-round FedAvg run (5 clients, Dirichlet 0.5), shared by the checks below."""
    from edgefleet.coordinator.home import Coordinator

    coord = Coordinator.init(tmp_path_factory.mktemp("fl") / "coord")
    records: list[RoundRecord] = []
    run = FederatedRun(
        spec(10),
        registrar=CoordinatorRegistrar(coord),
        central_eval=central_eval(federation),
        on_round=records.append,
    )
    result = run.execute(LocalGrid(honest_apps(federation)))
    return coord, run, result, records


def test_fedavg_reaches_097_of_centralized_within_10_rounds(federation, ten_rounds) -> None:
    _, _, result, records = ten_rounds
    baseline = train_digits(load_digits_split(SEED), seed=SEED, hidden=HIDDEN)
    centralized = float(baseline.score(federation.x_test, federation.y_test))
    acc = [r.lineage["fl"]["metrics"]["central"]["accuracy"] for r in records]
    print("centralized", centralized, "per round", [round(a, 4) for a in acc])
    assert len(acc) == 10
    assert acc[-1] > acc[0]  # it learns
    assert max(acc) >= 0.97 * centralized
    assert acc[-1] >= 0.97 * centralized


def test_one_version_per_round_with_lineage(federation, ten_rounds) -> None:
    coord, run, result, records = ten_rounds
    versions = run.history()
    assert [v.lineage["fl"]["round"] for v in versions] == list(range(1, 11))
    assert [r.version for r in records] == [v.version for v in versions]
    assert result.version == versions[-1].version
    parent = None
    for v in versions:
        fl = v.lineage["fl"]
        assert v.lineage["parent"] == parent
        parent = v.version
        assert fl["run_id"] == "run-1" and fl["strategy"]["name"] == "fedavg"
        contributors = {c["device_id"]: c["num_examples"] for c in fl["contributors"]}
        assert contributors == {
            f"dev-{i + 1}": c.num_train for i, c in enumerate(federation.clients)
        }
        assert fl["num_examples"] == sum(c.num_train for c in federation.clients)
        assert fl["rejected"] == [] and fl["dp"] is None
        assert set(fl["metrics"]["train"]) == {"train-loss", "train-accuracy"}
        assert set(fl["metrics"]["eval"]) == {"eval-loss", "eval-accuracy"}
        assert 0 < fl["metrics"]["central"]["accuracy"] <= 1
    mv = coord.registry.model("digits-fl", versions[-1].version)
    assert mv.metrics["accuracy"] == versions[-1].lineage["fl"]["metrics"]["central"]["accuracy"]


def test_final_model_in_the_registry_matches_sklearn_in_onnx_runtime(federation, ten_rounds):
    coord, run, result, _ = ten_rounds
    mv = coord.registry.model("digits-fl", result.version)
    session = ort.InferenceSession(coord.blobs.get(mv.blob), providers=["CPUExecutionProvider"])
    trainer = Trainer(spec=ModelSpec(hidden=(HIDDEN,)))
    trainer.set_weights(result.weights)
    got = session.run(None, {"input": federation.x_test})[0]
    np.testing.assert_allclose(got, trainer.predict_proba(federation.x_test), atol=1e-5)
    assert np.array_equal(got.argmax(1), trainer.estimator.predict(federation.x_test))
    # the weights blob holds exactly the registered global model
    blob = coord.blobs.get(run.history()[-1].lineage["fl"]["weights_blob"])
    with np.load(io.BytesIO(blob)) as npz:
        assert all(np.array_equal(npz[k], v) for k, v in result.weights.items())


def test_resume_continues_after_the_last_registered_round(federation, coordinator) -> None:
    registrar = CoordinatorRegistrar(coordinator)
    first = FederatedRun(spec(2), registrar=registrar).execute(LocalGrid(honest_apps(federation)))
    assert [r.round for r in first.rounds] == [1, 2]

    grid = LocalGrid(honest_apps(federation))
    seen: list[dict[str, np.ndarray]] = []
    push = grid.push_messages

    def spy(messages):  # type: ignore[no-untyped-def]
        messages = list(messages)
        seen.extend(
            {k: a.numpy() for k, a in m.content.array_records["arrays"].items()} for m in messages
        )
        return push(messages)

    grid.push_messages = spy  # type: ignore[method-assign]
    resumed = FederatedRun(spec(4), registrar=registrar).execute(grid)
    assert [r.round for r in resumed.rounds] == [3, 4]
    assert resumed.rounds[0].parent == first.version
    # round 3 starts from the exact round-2 global model
    assert all(np.array_equal(seen[0][k], v) for k, v in first.weights.items())
    history = FederatedRun(spec(4), registrar=registrar).history()
    assert [v.lineage["fl"]["round"] for v in history] == [1, 2, 3, 4]
    # nothing left to do: no round runs, no version is added
    again = FederatedRun(spec(4), registrar=registrar).execute(LocalGrid(honest_apps(federation)))
    assert again.rounds == () and again.version == history[-1].version
    assert len(coordinator.registry.models()) == 4


def test_a_round_below_quorum_registers_nothing(federation, coordinator) -> None:
    apps = honest_apps(federation)
    grid = LocalGrid(apps)
    for node in (1, 2, 3):
        grid.nodes[node].context.node_config = {}
        grid.nodes[node].app = build_client_app()  # no data-dir: it raises, an error reply
    result = FederatedRun(
        spec(2, policy=UpdatePolicy(quorum=3)), registrar=CoordinatorRegistrar(coordinator)
    ).execute(grid)
    assert [r.version for r in result.rounds] == [None, None]
    assert "quorum 3" in result.rounds[0].skipped
    assert coordinator.registry.models() == []
    initial = FederatedRun(spec(1), registrar=CoordinatorRegistrar(coordinator))._weights(None)
    assert all(np.array_equal(result.weights[k], v) for k, v in initial.items())


def test_lineage_is_json_and_fits_a_manifest(ten_rounds) -> None:
    _, run, _, _ = ten_rounds
    text = json.dumps(run.history()[-1].lineage, allow_nan=False)
    assert len(text) < 8192
