"""Flower ``Message`` <-> bytes with Flower's own serde, and the few Flower internals we touch.

Everything that reaches into Flower below its public API is here, so the pin in pyproject
(``flwr>=1.42,<1.43``) has one place to check and ``tests/federated/test_wire.py`` to fail:

- ``flwr.common.serde.message_to_proto`` / ``message_from_proto`` and the proto ``Message``;
- the message id, which Flower's own links set in ``Metadata.__dict__["_message_id"]``
  (``InMemoryGrid.push_messages`` does the same);
- ``flwr.supercore.task_identity.TaskIdentity``, the process-global that ``Message(...)``
  reads for ``run_id``/``src_node_id`` (the native ServerApp runtime sets it the same way);
- ``flwr.supercore.run.Run``.

FL topics are the ``fl`` / ``up/fl`` kinds of ``protocol.topics`` (under each device's subtree).
This module imports Flower: import it only when a round starts.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

from edgefleet.protocol import topics
from edgefleet.protocol.errors import DecodeError
from google.protobuf.message import DecodeError as ProtoDecodeError

if TYPE_CHECKING:
    from flwr.app import Message
    from flwr.supercore.run import Run

__all__ = [
    "REPLY_FILTER",
    "SERVER_NODE_ID",
    "decode",
    "encode",
    "empty_run",
    "instruction_topic",
    "reply_topic",
    "set_message_id",
    "seeded_sampling",
    "set_task_identity",
]

#: Flower's node id for the server side (``flwr.common.constant.SUPERLINK_NODE_ID``)
SERVER_NODE_ID = 1
#: what the coordinator subscribes to for every device's FL replies
REPLY_FILTER = topics.up_all("fl")


def instruction_topic(device_id: str) -> str:
    """Coordinator -> device: ``ef/v1/dev/<id>/fl``."""
    return topics.fl(device_id)


def reply_topic(device_id: str) -> str:
    """Device -> coordinator: ``ef/v1/dev/<id>/up/fl``."""
    return topics.up(device_id, "fl")


def encode(message: Message) -> bytes:
    from flwr.common.serde import message_to_proto

    return bytes(message_to_proto(message).SerializeToString())


def decode(data: bytes) -> Message:
    """One Flower ``Message``; anything Flower's serde refuses becomes ``DecodeError``."""
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    try:
        proto = ProtoMessage.FromString(data)
        if not proto.HasField("metadata"):
            raise DecodeError("flower message: no metadata")
        return message_from_proto(proto)
    except DecodeError:
        raise
    except (ProtoDecodeError, ValueError, TypeError, KeyError) as exc:
        raise DecodeError(f"flower message: {type(exc).__name__}: {exc}"[:300]) from exc


def set_message_id(message: Message, message_id: str) -> None:
    """Set the id a Flower link assigns on delivery (Metadata has no public setter)."""
    message.metadata.__dict__["_message_id"] = message_id


def set_task_identity(run_id: int, *, node_id: int = SERVER_NODE_ID, task_id: int = 1) -> None:
    """What ``Message(...)`` reads for ``run_id`` and ``src_node_id``: process-global."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = task_id


def empty_run(run_id: int) -> Run:
    from flwr.supercore.run import Run

    return Run.create_empty(run_id)



@contextlib.contextmanager
def seeded_sampling(seed: int) -> Iterator[None]:
    """Flower's ``sample_nodes`` draws from the ``random`` module; give it a seeded
    generator of its own meanwhile (a Flower internal: pinned with ``flwr``)."""
    from flwr.serverapp.strategy import strategy_utils

    if getattr(strategy_utils, "random", None) is not random:
        raise RuntimeError("flwr's strategy_utils no longer samples with the random module")
    setattr(strategy_utils, "random", random.Random(seed))  # noqa: B010
    try:
        yield
    finally:
        setattr(strategy_utils, "random", random)  # noqa: B010
