"""The link port: what the agent and the coordinator need from an MQTT connection.

Two implementations: ``MqttLink`` (paho-mqtt 2.x, a real broker) and the links of an
``InMemoryBroker`` (tests and simulations). Code above this layer builds a link through a
``LinkFactory`` and never sees a paho type, so the same daemon and service run on both.

Contract (both implementations honour it, and ``tests/infra`` checks it on both):

- ``start()`` connects in the background and returns at once; the link reconnects by itself.
  ``connected`` is set only once the broker acknowledged the subscriptions made so far, so
  "connected" means "connected and listening".
- Callbacks run on the link's own thread, never on the caller's: keep them short and hand
  work to a queue. ``on_connect(session_present)`` follows every accepted connection;
  ``on_disconnect(reason)`` a lost connection or a failed attempt.
- ``publish`` raises ``TransportError`` when a message cannot be sent as asked: larger than
  the broker accepts (checked before anything is queued), outgoing queue full, or QoS 0 while
  disconnected. QoS 1 messages published while disconnected are queued and sent on reconnect.
  It returns a ``Delivery`` handle that carries no transport type.
- ``subscribe`` is remembered and re-sent on every reconnect; retained messages arrive again
  each time, so handlers must be idempotent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .config import MqttConfig

__all__ = ["Delivery", "Link", "LinkFactory", "MessageProps", "OnMessage"]


@dataclass(frozen=True, kw_only=True)
class MessageProps:
    qos: int
    retain: bool
    response_topic: str | None = None  # v5 only
    correlation_data: bytes | None = None  # v5 only


OnMessage = Callable[[str, bytes, MessageProps], None]  # (topic, payload, properties)


class Delivery(Protocol):
    """What became of one publish."""

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the message was published (QoS 0: handed to the network; QoS 1: the
        broker acknowledged it); True if it was, False at the timeout."""
        ...

    @property
    def published(self) -> bool: ...


class Link(Protocol):
    connected: threading.Event

    def start(self) -> None: ...

    def stop(self) -> None:
        """Disconnect (the broker keeps a persistent session) and stop the link's thread."""
        ...

    def wait_connected(self, timeout: float | None = None) -> bool: ...

    def subscribe(self, topic: str, qos: int = 1) -> threading.Event:
        """Subscribe now and after every reconnect; the event is set once the broker answered."""
        ...

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> Delivery: ...

    def wait_writable(self, max_unsent: int, timeout: float) -> bool:
        """Backpressure for bulk senders: block until at most ``max_unsent`` bytes are unsent."""
        ...

    @property
    def unsent_bytes(self) -> int: ...

    @property
    def max_payload(self) -> int:
        """Largest payload (bytes) the broker accepts with an ordinary topic."""
        ...

    @property
    def last_error(self) -> str | None:
        """Why the last connection attempt failed or the connection dropped."""
        ...


class LinkFactory(Protocol):
    """Builds an unstarted link: ``MqttLink`` itself, or ``InMemoryBroker.link``."""

    def __call__(
        self,
        config: MqttConfig,
        on_message: OnMessage,
        *,
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
    ) -> Link: ...
