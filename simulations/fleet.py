"""The one fleet rig: a coordinator, a broker and N agents, for tests, ``bench/`` and the demo.

``open_fleet(work, devices, models=..., broker="memory" | "mosquitto" | "amqtt")`` provisions
the homes (``simulations.homes``), starts the broker with the fleet's passwords and ACL
(``simulations.brokers``) and yields a ``Fleet``. A test then starts the ``CoordinatorService``
and ``AgentDaemon`` s in this process — over the in-memory broker or a real one, the same code —
or agents as ``edgefleet agent run`` processes (real brokers only; for SIGKILL).

Determinism: ``ChunkGate`` lets only the first *k* chunks per device out until opened;
``ObservedDaemon`` counts the events an agent's worker has handled, so a test can wait for
"the agent has processed it"; ``Checkpoints`` (the store's fault-injection hook) counts
activations. Faults: ``drop`` (in-memory broker: lose matching messages), ``delay`` (hold an
agent's incoming messages), ``disconnect`` (kick a client), ``kill`` (an agent dies without
cleaning up; a process gets SIGKILL), ``broker.restart()``.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.daemon import AgentDaemon
from edgefleet.agent.daemon import mqtt_config_for as agent_mqtt_config
from edgefleet.coordinator.chunks import ChunkServer
from edgefleet.coordinator.fleet import wait_for
from edgefleet.coordinator.home import Coordinator
from edgefleet.coordinator.registry import Device, Release
from edgefleet.coordinator.release import offers
from edgefleet.coordinator.service import CoordinatorService
from edgefleet.coordinator.service import mqtt_config_for as coordinator_mqtt_config
from edgefleet.infra.fsutil import atomic_write
from edgefleet.infra.link import Link, LinkFactory, MessageProps, MqttConfig, OnMessage
from edgefleet.protocol.messages import ChunkReply, ChunkRequest, ReleaseOffer

from .brokers import BrokerKind, SimBroker, start_broker
from .homes import FleetHomes, ModelFile, point_agents_at, provision_fleet
from .wait import TIMEOUT, wait_until

__all__ = ["ChunkGate", "Checkpoints", "Fleet", "ObservedDaemon", "RunningAgent", "open_fleet"]

FAST_RECONNECT: dict[str, Any] = {"reconnect_min": 0.1, "reconnect_max": 0.5}  # s


class Checkpoints:
    """A ``ModelStore`` checkpoint hook that counts labels: ``pointer:after`` = activations."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def __call__(self, label: str) -> None:
        with self._lock:
            self.counts[label] += 1

    @property
    def activations(self) -> int:
        return self.counts["pointer:after"]


class ObservedDaemon(AgentDaemon):
    """An ``AgentDaemon`` that counts the events its worker thread has finished handling."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.handled: collections.Counter[str] = collections.Counter()
        self._handled_cond = threading.Condition()
        super().__init__(*args, on_event=self._count, **kwargs)

    def _count(self, kind: str) -> None:
        with self._handled_cond:
            self.handled[kind] += 1
            self._handled_cond.notify_all()

    def wait_handled(self, kind: str, count: int, timeout: float = TIMEOUT) -> None:
        with self._handled_cond:
            ok = self._handled_cond.wait_for(lambda: self.handled[kind] >= count, timeout)
        assert ok, f"{self.device_id}: handled {self.handled[kind]} {kind} messages, wanted {count}"


class ChunkGate:
    """Wraps ``ChunkServer.answer`` so a test decides when chunks flow.

    Open by default. ``close(devices, allow=k)``: each of those devices gets k more chunk
    requests answered, later ones are dropped (as a lost message would be) and counted as
    held, so "the agent has its k chunks and asks for more" is an observable event. ``open()``
    lets everything through again; the agents re-send what was dropped after their timeout.
    """

    def __init__(self, server: ChunkServer) -> None:
        self._answer = server.answer
        server.answer = self._gated  # type: ignore[method-assign]
        self.answered: collections.Counter[str] = collections.Counter()
        self.held: collections.Counter[str] = collections.Counter()
        self.indexes: dict[str, list[int]] = collections.defaultdict(list)  # answered, in order
        self._closed: set[str] = set()
        self._allow = 0
        self._base: collections.Counter[str] = collections.Counter()
        self._cond = threading.Condition()

    def close(self, devices: Iterable[str], *, allow: int = 0) -> None:
        with self._cond:
            self._closed, self._allow = set(devices), allow
            self._base = collections.Counter(self.answered)
            self.held.clear()

    def open(self) -> None:
        with self._cond:
            self._closed = set()

    def _gated(self, device_id: str, req: ChunkRequest) -> list[ChunkReply]:
        with self._cond:
            if (
                device_id in self._closed
                and self.answered[device_id] - self._base[device_id] >= self._allow
            ):
                self.held[device_id] += 1
                self._cond.notify_all()
                return []
            self.answered[device_id] += len(req.indexes)
            self.indexes[device_id].extend(req.indexes)
        return self._answer(device_id, req)

    def wait_held(self, devices: Iterable[str], timeout: float = TIMEOUT) -> None:
        """Until every device has had its allowance answered and asked for another chunk."""
        devices = list(devices)
        with self._cond:
            ok = self._cond.wait_for(lambda: all(self.held[d] for d in devices), timeout)
        assert ok, f"chunk gate: answered {dict(self.answered)}, held {dict(self.held)}"


class _Delay:
    """Holds an agent's incoming messages while set (``Fleet.delay``), then delivers them."""

    def __init__(self) -> None:
        self.holding = threading.Event()
        self._held: list[tuple[str, bytes, MessageProps]] = []
        self._lock = threading.Lock()
        self._deliver: OnMessage | None = None

    def wrap(self, factory: LinkFactory) -> LinkFactory:
        def build(config: Any, on_message: OnMessage, **kw: Any) -> Link:
            self._deliver = on_message
            return factory(config, self._receive, **kw)

        return build

    def _receive(self, topic: str, payload: bytes, props: MessageProps) -> None:
        with self._lock:
            if self.holding.is_set():
                self._held.append((topic, payload, props))
                return
        assert self._deliver is not None
        self._deliver(topic, payload, props)

    def release(self) -> None:
        with self._lock:
            self.holding.clear()
            held, self._held = self._held, []
        for message in held:  # on the caller's thread; the daemon only queues them
            assert self._deliver is not None
            self._deliver(*message)


@dataclass
class RunningAgent:
    agent: Agent
    daemon: ObservedDaemon
    checkpoints: Checkpoints
    delay: _Delay

    @property
    def device_id(self) -> str:
        return self.daemon.device_id

    def active_sequence(self) -> int | None:
        active = self.agent.active
        return None if active is None else active.manifest.sequence

    def stop(self) -> None:
        self.daemon.stop()
        self.agent.close()


@dataclass
class Fleet:
    work: Path
    setup: FleetHomes
    broker: SimBroker
    service: CoordinatorService | None = None
    gate: ChunkGate = field(init=False)
    agents: dict[str, RunningAgent] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    links: list[Link] = field(default_factory=list)

    @property
    def coordinator(self) -> Coordinator:
        return self.setup.coordinator

    @property
    def homes(self) -> dict[str, Path]:
        """Device id -> agent home."""
        return self.setup.homes

    @property
    def users(self) -> dict[str, str]:
        return self.setup.users

    @property
    def protocol(self) -> int:
        return self.broker.protocol

    @property
    def devices(self) -> list[str]:
        return list(self.setup.homes)

    # -- coordinator ---------------------------------------------------------------------------
    def start_service(
        self, *, hold: Iterable[str] = (), allow: int = 0, client_id: str = "coordinator-sim"
    ) -> CoordinatorService:
        """Start the coordinator service; chunks for ``hold`` devices stop after ``allow``."""
        cfg = coordinator_mqtt_config(
            self.coordinator,
            client_id=client_id,
            broker=self.broker.url,
            password=self.users[self.coordinator.config.username],
            protocol=self.protocol,
        )
        svc = CoordinatorService(
            self.coordinator,
            dataclasses.replace(cfg, **FAST_RECONNECT),
            link_factory=self.broker.link_factory,
        )
        self.gate = ChunkGate(svc.chunks)
        self.gate.close(hold, allow=allow)
        svc.start()
        assert svc.link.wait_connected(TIMEOUT), svc.link.last_error
        self.service = svc
        return svc

    def build(self, version: str = "1", selector: str = "all", name: str = "digits") -> Release:
        release, _ = self.coordinator.build(name, version, selector)
        return release

    def release(self, version: str = "1", selector: str = "all", name: str = "digits") -> Release:
        """Build a release and publish it through the running service."""
        assert self.service is not None, "start_service() first"
        release = self.build(version, selector, name)
        self.service.release(release.sequence)
        return release

    @staticmethod
    def offer(release: Release, device: str) -> ReleaseOffer:
        return offers(release)[device]

    def device(self, device_id: str) -> Device:
        dev = self.coordinator.registry.device(device_id)
        assert dev is not None, device_id
        return dev

    def wait_registry(
        self,
        devices: Iterable[str],
        predicate: Callable[[Device], bool],
        what: str,
        timeout: float = TIMEOUT,
    ) -> None:
        devices = list(devices)
        wait_until(lambda: all(predicate(self.device(d)) for d in devices), what, timeout)

    def wait_active(self, devices: Iterable[str], sequence: int, timeout: float = TIMEOUT) -> None:
        """Until the coordinator's registry shows every device running ``sequence``
        (``coordinator.fleet.wait_for``, as ``model release --wait`` does)."""
        devices = list(devices)
        result = wait_for(self.coordinator.registry, sequence, devices, timeout, poll=0.02)
        if not result.ok:
            raise TimeoutError(f"after {timeout} s, not on release {sequence}: {result.pending}")
        beyond = {d: self.device(d).active_sequence for d in devices}
        if set(beyond.values()) != {sequence}:
            raise AssertionError(f"expected release {sequence} everywhere, saw {beyond}")

    def wait_result(self, device: str, code: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Until the registry shows ``code`` as the device's last result; return that result."""
        self.wait_registry(
            [device],
            lambda d: (d.last_result or {}).get("code") == code,
            f"{device} to report {code!r}",
            timeout,
        )
        return dict(self.device(device).last_result)

    # -- agents --------------------------------------------------------------------------------
    def set_agent(self, device: str, **changes: Any) -> None:
        home = self.homes[device]
        cfg = dataclasses.replace(AgentConfig.load(home), **changes)
        atomic_write(home / "agent.toml", cfg.to_toml().encode())

    def start_agent(
        self,
        device: str,
        *,
        heartbeat: float = 0.5,
        request_timeout: float = 1.0,
        wait: bool = True,
        **daemon_kwargs: Any,
    ) -> RunningAgent:
        """An agent daemon as threads of this process (any broker)."""
        checkpoints, delay = Checkpoints(), _Delay()
        agent = Agent(AgentConfig.load(self.homes[device]), checkpoint=checkpoints)
        mqtt = dataclasses.replace(agent_mqtt_config(agent), **FAST_RECONNECT)
        daemon = ObservedDaemon(
            agent,
            mqtt,
            heartbeat=heartbeat,
            request_timeout=request_timeout,
            link_factory=delay.wrap(self.broker.link_factory),
            **daemon_kwargs,
        )
        running = RunningAgent(agent, daemon, checkpoints, delay)
        self.agents[device] = running
        daemon.start()
        if wait:
            assert daemon.link.wait_connected(TIMEOUT), daemon.link.last_error
        return running

    def spawn_agent(self, device: str, tag: str = "") -> subprocess.Popen[bytes]:
        """``edgefleet agent run`` as a separate process (real brokers only)."""
        if not self.broker.networked:
            raise RuntimeError("agent processes need a real broker, not the in-memory one")
        log = self.work / f"{device}{tag}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgefleet", "-v", "agent", "run", "--home",
                 str(self.homes[device]), "--no-http", "--heartbeat", "0.5"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.procs[f"{device}{tag}"] = proc
        return proc

    def log_of(self, device: str, tag: str = "") -> str:
        return (self.work / f"{device}{tag}.log").read_text(errors="replace")

    # -- faults ----------------------------------------------------------------------------------
    def delay(self, device: str) -> Callable[[], None]:
        """Hold everything ``device`` receives until the returned function is called."""
        d = self.agents[device].delay
        d.holding.set()
        return d.release

    def drop(self, predicate: Callable[[str, bytes, str], bool]) -> Any:
        """Lose messages for which ``predicate(topic, payload, sender client id)`` holds."""
        if self.broker.memory is None:
            raise RuntimeError("drop() needs the in-memory broker")
        return self.broker.memory.drop(predicate)

    def disconnect(self, client_id: str) -> None:
        """Kick one client off the broker; it reconnects by itself."""
        if self.broker.memory is None:
            raise RuntimeError("disconnect() needs the in-memory broker")
        self.broker.memory.disconnect(client_id)

    def kill(self, device: str, tag: str = "") -> None:
        """The agent dies: a process gets SIGKILL; a thread agent stops without a goodbye."""
        proc = self.procs.get(f"{device}{tag}")
        if proc is not None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        self.agents.pop(device).stop()

    # -- raw clients -----------------------------------------------------------------------------
    def client(
        self,
        user: str,
        client_id: str,
        subscribe: Sequence[str] = (),
        *,
        on_message: OnMessage,
        password: str | None = None,
        **config: Any,
    ) -> Link:
        """A plain MQTT client logged in as ``user``, started and subscribed."""
        cfg = MqttConfig(
            url=self.broker.url,
            client_id=client_id,
            username=user,
            password=password or self.users[user],
            protocol=self.broker.protocol,
            **{**FAST_RECONNECT, **config},
        )
        link = self.broker.link_factory(cfg, on_message)
        for topic in subscribe:
            link.subscribe(topic, qos=1)
        self.links.append(link)
        link.start()
        assert link.wait_connected(TIMEOUT), f"{client_id}: {link.last_error}"
        return link

    # -- teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for running in self.agents.values():
            running.stop()
        for link in self.links:
            link.stop()
        if self.service is not None:
            self.service.stop()
        self.coordinator.registry.engine.dispose()


@contextmanager
def open_fleet(
    work: Path,
    devices: Sequence[str],
    *,
    models: Sequence[ModelFile],
    broker: BrokerKind | Callable[[FleetHomes], SimBroker] = "memory",
    segment_size: int | None = None,
    fleet_type: type[Fleet] = Fleet,  # a subclass with a test's or bench's own helpers
    **agent_config: Any,
) -> Iterator[Fleet]:
    """A provisioned fleet and a running broker with its passwords and ACL: ``broker`` is a
    kind to start, or a function that starts one for these homes (e.g. from broker-config)."""
    homes = provision_fleet(
        work, devices, models=models, segment_size=segment_size, **agent_config
    )
    running = (
        start_broker(broker, users=homes.users, data_dir=work / "broker",
                     coordinator_user=homes.coordinator.config.username)
        if isinstance(broker, str)
        else broker(homes)
    )  # fmt: skip
    try:
        point_agents_at(homes.coordinator, homes.homes, running.url, running.protocol)
        fleet = fleet_type(work, homes, running)
        try:
            yield fleet
        finally:
            fleet.close()
    finally:
        running.close()
