"""The ClientApp and ServerApp on a Grid: replies, config from the message, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from edgefleet.federated.app import build_client_app, build_server_app
from edgefleet.federated.data import add_samples
from edgefleet.federated.runs import CoordinatorRegistrar, FederatedRun, RunSpec
from edgefleet.federated.strategies import StrategySpec
from edgefleet.federated.trainer import ModelSpec, TrainConfig, Trainer, to_array_record
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from .conftest import LocalGrid, honest_apps

SPEC = ModelSpec(hidden=(16,))
TRAIN = TrainConfig(local_epochs=1, lr=0.05, optimizer="sgd")


def instruction(kind: str, **config: object) -> Message:
    arrays = to_array_record(Trainer(spec=SPEC).weights())
    values = {**SPEC.to_config(), **TRAIN.to_config(), "server-round": 1, **config}
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(values)})  # type: ignore[arg-type]
    return Message(content, dst_node_id=1, message_type=kind)


def test_train_reply_carries_weights_and_metrics(federation) -> None:
    grid = LocalGrid(honest_apps(federation))
    (reply,) = grid.send_and_receive([instruction(MessageType.TRAIN)])
    assert not reply.has_error()
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == federation.clients[0].num_train
    assert metrics["unit-weight"] == 1 and 0 <= metrics["train-accuracy"] <= 1
    arrays = reply.content.array_records["arrays"]
    assert list(arrays) == list(Trainer(spec=SPEC).weights())
    assert arrays["coefs.0"].numpy().shape == (64, 16)


def test_the_round_config_drives_local_training(federation) -> None:
    grid = LocalGrid(honest_apps(federation))
    (one,) = grid.send_and_receive([instruction(MessageType.TRAIN, **{"local-epochs": 1})])
    (two,) = grid.send_and_receive([instruction(MessageType.TRAIN, **{"local-epochs": 4})])
    loss = [m.content.metric_records["metrics"]["train-loss"] for m in (one, two)]
    assert loss[1] < loss[0]


def test_evaluate_reply_uses_the_held_out_part(federation) -> None:
    grid = LocalGrid(honest_apps(federation))
    (reply,) = grid.send_and_receive([instruction(MessageType.EVALUATE)])
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == federation.clients[0].num_test
    assert set(metrics) == {"num-examples", "unit-weight", "eval-loss", "eval-accuracy"}
    assert not reply.content.array_records  # evaluation sends no weights back


def test_default_client_app_reads_the_data_dir_of_the_node_config(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    add_samples(tmp_path, rng.random((40, 64)), rng.integers(0, 10, 40))
    grid = LocalGrid({1: build_client_app()})
    grid.nodes[1].context.node_config = {"data-dir": str(tmp_path)}
    (reply,) = grid.send_and_receive([instruction(MessageType.TRAIN)])
    assert reply.content.metric_records["metrics"]["num-examples"] == 32  # 40 less 20 % held out
    grid.nodes[1].context.node_config = {}
    (failed,) = grid.send_and_receive([instruction(MessageType.TRAIN)])
    assert failed.has_error() and "data-dir" in failed.error.reason


def test_a_config_for_another_architecture_is_an_error_reply(federation) -> None:
    grid = LocalGrid(honest_apps(federation))
    (reply,) = grid.send_and_receive([instruction(MessageType.TRAIN, **{"model-hidden": [8]})])
    assert reply.has_error() and "expected" in reply.error.reason


def test_server_app_runs_the_run_on_the_grid_it_is_given(federation, coordinator) -> None:
    spec = RunSpec(
        run_id="app",
        model_name="digits-fl",
        rounds=1,
        model=SPEC,
        train=TRAIN,
        strategy=StrategySpec(min_train_nodes=5, min_evaluate_nodes=5, min_available_nodes=5),
    )
    run = FederatedRun(spec, registrar=CoordinatorRegistrar(coordinator))
    grid = LocalGrid(honest_apps(federation))
    context = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})
    build_server_app(run)(grid, context)
    assert grid.sent == 10  # 5 train + 5 evaluate
    assert [v.lineage["fl"]["round"] for v in run.history()] == [1]
