"""The brokers a simulated fleet runs on, behind one small interface.

- ``memory``: an ``InMemoryBroker`` (no sockets; agents are threads of this process), with the
  fleet's passwords and the very ACL the real broker gets (``protocol.topics.acl``).
- ``mosquitto`` / ``amqtt``: an ``EmbeddedBroker`` on a free loopback port with a generated
  config (passwords, ACL), reached through ``MqttLink``; agents may also be processes.
- ``external``: a broker someone else started (e.g. ``mosquitto -c`` from ``broker-config``).
- ``hardened``: ``hardened()`` (an ``open_fleet`` broker) / ``start_hardened``: mosquitto
  started from ``coordinator broker-config`` output (``write_broker_config``: the
  dynamic-security plugin, client ids bound to accounts, ``BrokerLimits``), exactly what
  operators deploy; ``SimBroker.pid`` and ``log_file`` for memory and log checks.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edgefleet.infra.broker import (
    BrokerLimits,
    EmbeddedBroker,
    _accepts,
    _free_port,
    _which,
    edgefleet_acl,
)
from edgefleet.infra.link import InMemoryBroker, LinkFactory
from edgefleet.protocol import topics

if TYPE_CHECKING:
    from edgefleet.coordinator.home import Coordinator

    from .homes import FleetHomes

__all__ = ["BrokerKind", "SimBroker", "external_broker", "hardened", "start_broker",
           "start_hardened"]  # fmt: skip

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
    #: a hardened broker's limits, config file and log (None for the other kinds)
    limits: BrokerLimits | None = None
    config_file: Path | None = None
    log_file: Path | None = None
    _pid: Callable[[], int | None] | None = field(default=None, repr=False)
    _restart: Callable[[], None] | None = field(default=None, repr=False)
    _close: Callable[[], None] | None = field(default=None, repr=False)
    _stop: Callable[[], None] | None = field(default=None, repr=False)
    _start: Callable[[], Any] | None = field(default=None, repr=False)

    @property
    def networked(self) -> bool:
        """True if agents in other processes can reach it (``Fleet.spawn_agent``)."""
        return self.memory is None

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs (a real mosquitto), else None."""
        return None if self._pid is None else self._pid()

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
        _pid=lambda: real._proc.pid if real._proc is not None else None,
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


class _Mosquitto:
    """``mosquitto -c <conf>`` on a fixed port; stop keeps the data dir for a restart."""

    def __init__(self, conf: Path, port: int, log_file: Path, start_timeout: float) -> None:
        binary = _which("mosquitto")
        if binary is None:
            raise RuntimeError("a hardened broker needs the mosquitto binary on PATH")
        self._cmd = [binary, "-c", str(conf)]
        self.port, self.log_file, self._timeout = port, log_file, start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.proc is not None:
            raise RuntimeError("broker already running")
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.log_file.with_name("mosquitto.stderr"), "ab") as err:
            self.proc = subprocess.Popen(self._cmd, stdin=subprocess.DEVNULL, stdout=err,
                                         stderr=err)  # fmt: skip
        from .wait import wait_until

        try:  # "running" in our own log proves the listener is ours
            wait_until(lambda: self._exited() or (" running" in self._log(offset)
                                                  and _accepts(self.port)),
                       f"mosquitto to listen on {self.port}", self._timeout)  # fmt: skip
        except TimeoutError:
            self.stop()
            raise
        if self._exited():
            self.proc = None
            raise RuntimeError(f"mosquitto exited at start-up: {self._log(offset)[-1000:]}")

    def _exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def _log(self, offset: int) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()  # SIGTERM: mosquitto saves its persistence database
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


def start_hardened(
    coordinator: Coordinator,
    out: Path,
    *,
    limits: BrokerLimits | None = None,
    port: int | None = None,
    start_timeout: float = 10.0,  # s
) -> SimBroker:
    """``edgefleet coordinator broker-config --out OUT`` (``write_broker_config``) for the
    coordinator's enrolled devices on a free loopback port, then ``mosquitto -c`` on it."""
    from edgefleet.coordinator.brokerconf import write_broker_config

    port = port or _free_port()
    files = write_broker_config(coordinator, out, port=port, limits=limits)
    broker = _Mosquitto(files.config, port, out / "data" / "mosquitto.log", start_timeout)
    broker.start()
    return SimBroker(
        kind="hardened",
        url=f"mqtt://127.0.0.1:{port}",
        protocol=5,
        link_factory=_mqtt_link_factory(),
        limits=limits or BrokerLimits(),
        config_file=files.config,
        log_file=broker.log_file,
        _pid=lambda: broker.proc.pid if broker.proc is not None else None,
        _restart=broker.restart,
        _close=broker.stop,
        _stop=broker.stop,
        _start=broker.start,
    )


def hardened(
    out: Path | None = None, *, limits: BrokerLimits | None = None
) -> Callable[[FleetHomes], SimBroker]:
    """A ``broker=`` for ``open_fleet``: ``start_hardened`` for the fleet's coordinator, its
    files in ``out`` (default ``<coordinator home>/broker``, where ``broker-config`` puts them)."""

    def start(homes: FleetHomes) -> SimBroker:
        c = homes.coordinator
        return start_hardened(c, out or c.home / "broker", limits=limits)

    return start
