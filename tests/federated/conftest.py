"""A tiny in-process Flower ``Grid`` for the FL app tests.

Flower 1.42's ``InMemoryGrid`` is not usable on its own: it needs a SuperLink ``LinkState``
with registered nodes and a SuperNode pulling from it (and polls with ``sleep``). ``LocalGrid``
hands each instruction, serialized and parsed again with Flower's serde
(``edgefleet.federated.wire``), to the destination node's ``ClientApp`` and serializes its reply
back, synchronously: no threads, no sleeping, deterministic. An exception in a ClientApp
becomes a Flower error reply, as on a SuperNode.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pytest

flwr = pytest.importorskip("flwr")

from edgefleet.federated import wire  # noqa: E402
from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.run import Run  # noqa: E402


@dataclass(kw_only=True)
class Node:
    app: ClientApp
    context: Context
    online: bool = True


class LocalGrid(Grid):
    def __init__(self, apps: Mapping[int, ClientApp], *, run_id: int = 7) -> None:
        self.nodes = {
            node_id: Node(
                app=app,
                context=Context(
                    run_id=run_id,
                    node_id=node_id,
                    node_config={},
                    state=RecordDict(),
                    run_config={},
                ),
            )
            for node_id, app in apps.items()
        }
        self._run = wire.empty_run(run_id)
        wire.set_task_identity(run_id)
        self._replies: dict[str, Message] = {}
        self.sent = 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return [n for n, node in self.nodes.items() if node.online]

    def device_of(self, node_id: int) -> str | None:
        return f"dev-{node_id}" if node_id in self.nodes else None

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg_id = uuid.uuid4().hex
            wire.set_message_id(msg, msg_id)
            ids.append(msg_id)
            self.sent += 1
            node = self.nodes[msg.metadata.dst_node_id]
            if not node.online:
                continue
            received = wire.decode(wire.encode(msg))
            try:
                reply = node.app(received, node.context)
            except Exception as exc:  # what a SuperNode does with a raising ClientApp
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)),
                    reply_to=received,
                )
            wire.set_message_id(reply, uuid.uuid4().hex)
            self._replies[msg_id] = wire.decode(wire.encode(reply))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


# -- shared set-up for the app, strategy and run tests ---------------------------------------
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from edgefleet.federated.app import build_client_app, evaluate_reply, train_reply  # noqa: E402
from edgefleet.federated.data import Federation, LocalData, digits_federation  # noqa: E402
from edgefleet.federated.trainer import (  # noqa: E402
    Trainer,
    Weights,
    from_array_record,
    to_array_record,
)

N_CLIENTS, ALPHA, SEED = 5, 0.5, 0


@pytest.fixture(scope="session")
def federation() -> Federation:
    return digits_federation(n_clients=N_CLIENTS, alpha=ALPHA, seed=SEED)


@pytest.fixture
def coordinator(tmp_path: Path):  # type: ignore[no-untyped-def]
    from edgefleet.coordinator.home import Coordinator

    return Coordinator.init(tmp_path / "coord")


def honest_apps(fed: Federation) -> dict[int, ClientApp]:
    """Node i+1 trains on partition i (device ``dev-<i+1>``)."""
    return {i + 1: build_client_app(lambda ctx, d=data: d) for i, data in enumerate(fed.clients)}


def poisoned_app(data: LocalData, tamper: Callable[[Weights], Weights]) -> ClientApp:
    """Trains honestly on ``data``, then sends ``tamper(weights)`` instead."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        reply = train_reply(message, data)
        arrays = reply.content.array_records["arrays"]
        reply.content["arrays"] = to_array_record(tamper(from_array_record(arrays)))
        return reply

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return evaluate_reply(message, data)

    return app


def central_eval(fed: Federation) -> Callable[[Trainer], dict[str, float]]:
    def evaluate(trainer: Trainer) -> dict[str, float]:
        r = trainer.evaluate(fed.x_test, fed.y_test)
        return {"accuracy": r.accuracy, "loss": r.loss}

    return evaluate


def finite(weights: Weights) -> bool:
    return all(bool(np.all(np.isfinite(w))) for w in weights.values())
