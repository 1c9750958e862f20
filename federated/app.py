"""The Flower apps, written once with the Message API; they run on any ``Grid``.

``build_client_app(load_data)`` is the device side: ``@app.train()`` reads the model spec and
the local training settings from the message's ``ConfigRecord`` (``ModelSpec.to_config`` and
``TrainConfig.to_config`` keys, FedProx's ``proximal-mu``, Flower's ``server-round``), trains
on the device's own data from the global ``ArrayRecord`` and replies with the new weights and
a ``MetricRecord`` of ``num-examples``, ``unit-weight`` (1, for DP accounting), ``train-loss``
and ``train-accuracy``, plus, when the config names a grid (``refstats-edges``), a
``ConfigRecord`` ``refstats``: the counts of its training rows over that grid
(``models.refstats.summarize``: histogram counts, sums, sums of squares, class counts), from
which the coordinator builds the new version's drift reference. ``@app.evaluate()`` replies
with ``eval-loss`` / ``eval-accuracy`` on the local held-out part. ``load_data(context)``
defaults to the ``data-dir`` entry of the node config (Flower's ``--node-config`` on a native
SuperNode).

``build_server_app(run)`` is the coordinator side: its ``main`` runs ``run.execute(grid)``
(see ``runs.FederatedRun``), i.e. a Flower strategy's own ``start`` loop.

Only weights and these aggregate metrics and counts leave the device, never samples. Any
exception in a handler propagates to the caller (the client loop turns it into an error reply).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from edgefleet.models.refstats import summarize
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .data import LocalData, load_dir
from .trainer import ModelSpec, TrainConfig, Trainer, from_array_record, to_array_record

__all__ = [
    "ARRAYS_KEY",
    "CONFIG_KEY",
    "METRICS_KEY",
    "REFSTATS_EDGES_KEY",
    "REFSTATS_KEY",
    "Runnable",
    "build_client_app",
    "build_server_app",
    "data_from_node_config",
    "evaluate_reply",
    "train_reply",
]

log = logging.getLogger(__name__)

ARRAYS_KEY = "arrays"  # Flower strategies' default arrayrecord_key
CONFIG_KEY = "config"  # and configrecord_key
METRICS_KEY = "metrics"
REFSTATS_KEY = "refstats"  # the reply's ConfigRecord of reference counts
REFSTATS_EDGES_KEY = "refstats-edges"  # the train config's grid (one list for every feature)
DataLoader = Callable[[Context], LocalData]


class Runnable(Protocol):
    def execute(self, grid: Grid) -> object: ...


def data_from_node_config(context: Context) -> LocalData:
    """The device's data directory, named by ``data-dir`` in the node config."""
    data_dir = context.node_config.get("data-dir")
    if not isinstance(data_dir, str) or not data_dir:
        raise ValueError("node config has no 'data-dir' for the local training data")
    return load_dir(Path(data_dir))


def train_reply(message: Message, data: LocalData) -> Message:
    """Train from the message's global weights on ``data``; the reply to ``message``."""
    config = message.content.config_records[CONFIG_KEY]
    server_round = config.get("server-round", 0)
    trainer = _trainer(message)
    round_seed = server_round if isinstance(server_round, int) else 0
    result = trainer.fit(data.x_train, data.y_train, round_seed=round_seed)
    log.debug("trained on %d samples: loss %.4f", result.num_examples, result.loss)
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "unit-weight": 1,
            "train-loss": result.loss,
            "train-accuracy": result.accuracy,
        }
    )
    content = RecordDict({ARRAYS_KEY: to_array_record(trainer.weights()), METRICS_KEY: metrics})
    edges = config.get(REFSTATS_EDGES_KEY)
    if isinstance(edges, list) and edges:
        counts = summarize(data.x_train, data.y_train, np.asarray(edges), trainer.spec.n_classes)
        record: dict[str, Any] = counts.to_dict()  # ints and lists of numbers
        content[REFSTATS_KEY] = ConfigRecord(record)
    return Message(content, reply_to=message)


def evaluate_reply(message: Message, data: LocalData) -> Message:
    """Evaluate the message's global weights on the held-out part of ``data``."""
    if data.num_test == 0:
        raise ValueError("no held-out local samples to evaluate on")
    result = _trainer(message).evaluate(data.x_test, data.y_test)
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "unit-weight": 1,
            "eval-loss": result.loss,
            "eval-accuracy": result.accuracy,
        }
    )
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=message)


def build_client_app(load_data: DataLoader = data_from_node_config) -> ClientApp:
    """A ``ClientApp`` whose handlers train/evaluate on ``load_data(context)``."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return train_reply(message, load_data(context))

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return evaluate_reply(message, load_data(context))

    return app


def build_server_app(run: Runnable) -> ServerApp:
    """A ``ServerApp`` whose ``main`` executes ``run`` on the grid it is given."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run.execute(grid)

    return app


def _trainer(message: Message) -> Trainer:
    config = message.content.config_records[CONFIG_KEY]
    trainer = Trainer(spec=ModelSpec.from_config(config), config=TrainConfig.from_config(config))
    trainer.set_weights(from_array_record(message.content.array_records[ARRAYS_KEY]))
    return trainer
