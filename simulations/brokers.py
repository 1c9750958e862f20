"""The brokers a simulated fleet runs on, behind one small interface.

- ``memory``: an ``InMemoryBroker`` (no sockets; agents are threads of this process), with the
  fleet's passwords and the very ACL the real broker gets (``protocol.topics.acl``).
- ``mosquitto`` / ``amqtt``: an ``EmbeddedBroker`` on a free loopback port with a generated
  config (passwords, ACL), reached through ``MqttLink``; agents may also be processes.
- ``external``: a broker someone else started (e.g. ``mosquitto -c`` from ``broker-config``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgefleet.infra.broker import EmbeddedBroker, edgefleet_acl
from edgefleet.infra.link import InMemoryBroker, LinkFactory
from edgefleet.protocol import topics

__all__ = ["BrokerKind", "SimBroker", "external_broker", "start_broker"]

#: "auto" = mosquitto where it is installed, else amqtt (the demo's embedded default)
BrokerKind = Literal["memory", "mosquitto", "amqtt", "auto"]
#: URL given to links of the in-memory broker (MqttConfig wants one; nothing resolves it)
MEMORY_URL = "mqtt://in-memory.invalid:1883"


@dataclass(kw_only=True)
class SimBroker:
    kind: str  # "memory", "mosquitto", "amqtt" or "external"
    url: str
    protocol: Literal[5, 311]
    link_factory: LinkFactory
    #: the InMemoryBroker, for fault injection (drop, disconnect); None on a real broker
    memory: InMemoryBroker | None = None
    #: the EmbeddedBroker (port, process) of a started mosquitto/amqtt; None otherwise
    embedded: EmbeddedBroker | None = None
    _restart: Callable[[], None] | None = field(default=None, repr=False)
    _close: Callable[[], None] | None = field(default=None, repr=False)
    _stop: Callable[[], None] | None = field(default=None, repr=False)
    _start: Callable[[], Any] | None = field(default=None, repr=False)

    @property
    def networked(self) -> bool:
        """True if agents in other processes can reach it (``Fleet.spawn_agent``)."""
        return self.memory is None

    def restart(self) -> None:
        """Every client is disconnected; retained messages and persistent sessions stay."""
        if self._restart is None:
            raise RuntimeError(f"a {self.kind} broker cannot be restarted from here")
        self._restart()

    def stop(self) -> None:
        """Take a real broker down (same port and data dir on ``start``): clients see it gone."""
        if self._stop is None:
            raise RuntimeError(f"a {self.kind} broker cannot be stopped and started from here")
        self._stop()

    def start(self) -> None:
        if self._start is None:
            raise RuntimeError(f"a {self.kind} broker cannot be stopped and started from here")
        self._start()

    def close(self) -> None:
        if self._close is not None:
            self._close()


def _mqtt_link_factory() -> LinkFactory:
    from edgefleet.infra.link.mqtt import MqttLink  # paho: only for real brokers

    return MqttLink


def start_broker(
    kind: BrokerKind,
    *,
    users: Mapping[str, str],
    coordinator_user: str = "coordinator",
    data_dir: Path | None = None,
    extra_acl: str = "",  # mosquitto acl_file lines appended (bench baselines' own topics)
    **options: Any,
) -> SimBroker:
    """Start a broker of ``kind`` with these users and the EdgeFleet ACL."""
    if kind == "memory":
        mem = InMemoryBroker(users=dict(users), acl=topics.acl(coordinator_user), **options)
        return SimBroker(
            kind=kind,
            url=MEMORY_URL,
            protocol=5,
            link_factory=mem.link,
            memory=mem,
            _restart=mem.restart,
            _close=mem.close,
        )
    real = EmbeddedBroker(
        data_dir=data_dir,
        users=users,
        acl=edgefleet_acl(coordinator_user) + extra_acl,
        force_kind=None if kind == "auto" else kind,
        **options,
    ).start()

    def close() -> None:
        real.__exit__(None, None, None)

    return SimBroker(
        kind=real.kind,
        url=real.url,
        protocol=real.protocol,
        link_factory=_mqtt_link_factory(),
        embedded=real,
        _restart=real.restart,
        _close=close,
        _stop=real.stop,
        _start=real.start,
    )


def external_broker(
    url: str, protocol: Literal[5, 311] = 5, *, close: Callable[[], Any] | None = None
) -> SimBroker:
    """A broker started elsewhere (its config, passwords and ACL are the caller's);
    ``close`` is called when the fleet is done with it."""
    return SimBroker(
        kind="external",
        url=url,
        protocol=protocol,
        link_factory=_mqtt_link_factory(),
        _close=close,
    )
