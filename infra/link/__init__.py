"""The link port and its paho-free implementation; ``MqttLink`` lives in ``.mqtt`` (paho).

Importing this package does not import paho: unit tests and simulations run on
``InMemoryBroker`` alone.
"""

from __future__ import annotations

from .config import HEADER_ALLOWANCE, MqttConfig, Will
from .memory import DROP_REASONS, DropRule, InMemoryBroker, InMemoryLink
from .port import Delivery, Link, LinkFactory, MessageProps, OnMessage

__all__ = [
    "DROP_REASONS",
    "HEADER_ALLOWANCE",
    "Delivery",
    "DropRule",
    "InMemoryBroker",
    "InMemoryLink",
    "Link",
    "LinkFactory",
    "MessageProps",
    "MqttConfig",
    "OnMessage",
    "Will",
]
