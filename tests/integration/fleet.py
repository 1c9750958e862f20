"""An end-to-end fleet on loopback for the delivery tests: coordinator, broker, agents.

``open_fleet`` makes a coordinator home (the digits model registered as version "1" in ONNX
and "2" in TFLite, 4 KiB segments: ~10 chunks per release), enrolls the devices, writes their
agent homes and starts a broker with the passwords from ``coordinator.brokerconf.credentials``
and the EdgeFleet ACL. Tests then start a ``CoordinatorService`` and ``AgentDaemon`` s as
in-process threads, or agents as separate ``edgefleet agent run`` processes (for SIGKILL).

Determinism comes from a ``ChunkGate`` around the coordinator's chunk server (it lets only the
first *k* chunks per device out until it is opened), from ``ObservedDaemon`` (counts handled
messages, so a test can wait for "the agent has processed it") and from ``Checkpoints`` (the
store's fault-injection hook, used here to count activations). Every wait polls a condition
with a deadline; nothing sleeps blindly.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import pwd
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.daemon import AgentDaemon
from edgefleet.agent.daemon import mqtt_config_for as agent_mqtt_config
from edgefleet.agent.identity import DeviceIdentity
from edgefleet.agent.provision import provision
from edgefleet.coordinator.brokerconf import credentials
from edgefleet.coordinator.chunks import ChunkServer
from edgefleet.coordinator.home import Coordinator
from edgefleet.coordinator.registry import Device, Release
from edgefleet.coordinator.service import CoordinatorService, offers
from edgefleet.coordinator.service import mqtt_config_for as coordinator_mqtt_config
from edgefleet.infra.broker import (
    BrokerKind,
    EmbeddedBroker,
    _accepts,
    _free_port,
    _which,
    edgefleet_acl,
)
from edgefleet.infra.link.mqtt import MqttConfig, MqttLink
from edgefleet.protocol.keys import decode_public_key
from edgefleet.protocol.messages import ChunkReply, ChunkRequest, DeviceStatus, ReleaseOffer

from tests.conftest import Digits

from .brokers import Inbox

__all__ = ["ChunkGate", "Checkpoints", "FleetHarness", "ObservedDaemon", "RunningAgent",
           "cli_mosquitto", "open_fleet", "wait_until"]

T = TypeVar("T")
TIMEOUT = 30.0  # s: upper bound of any single wait; passing runs stay far below it
SEGMENT = 4096  # bytes per segment: the ~39 KB digits model is ~10 chunks
FAST_RECONNECT = {"reconnect_min": 0.1, "reconnect_max": 0.5}  # s


def wait_until(predicate: Callable[[], T], what: str, timeout: float = TIMEOUT,
               interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} "
                                 f"(last: {value!r})")
        time.sleep(interval)


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
    """An ``AgentDaemon`` that counts the messages its worker thread has finished handling."""

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

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


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
            if (device_id in self._closed
                    and self.answered[device_id] - self._base[device_id] >= self._allow):
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


@dataclass
class RunningAgent:
    agent: Agent
    daemon: ObservedDaemon
    checkpoints: Checkpoints

    @property
    def device_id(self) -> str:
        return self.daemon.device_id

    def active_sequence(self) -> int | None:
        active = self.agent.status()["active"]
        return None if active is None else int(active["sequence"])

    def stop(self) -> None:
        self.daemon.stop()
        self.agent.close()


@dataclass
class FleetHarness:
    work: Path
    coordinator: Coordinator
    broker: Any  # EmbeddedBroker, or an ExternalBroker (url, protocol)
    users: dict[str, str]  # broker username -> password
    homes: dict[str, Path]  # device id -> agent home
    digits: Digits
    service: CoordinatorService | None = None
    gate: ChunkGate = field(init=False)
    agents: dict[str, RunningAgent] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    links: list[MqttLink] = field(default_factory=list)

    @property
    def protocol(self) -> int:
        return self.broker.protocol

    # -- coordinator ---------------------------------------------------------------------------
    def start_service(self, *, hold: Iterable[str] = (), allow: int = 0) -> CoordinatorService:
        """Start the coordinator service; chunks for ``hold`` devices stop after ``allow``."""
        cfg = coordinator_mqtt_config(self.coordinator, client_id="coordinator-test",
                                      broker=self.broker.url, password=self.users["coordinator"],
                                      protocol=self.protocol)
        svc = CoordinatorService(self.coordinator, dataclasses.replace(cfg, **FAST_RECONNECT))
        self.gate = ChunkGate(svc.chunks)
        self.gate.close(hold, allow=allow)
        svc.start()
        assert svc.link.wait_connected(TIMEOUT), svc.link.last_error
        self.service = svc
        return svc

    def build(self, version: str = "1", selector: str = "all") -> Release:
        release, _ = self.coordinator.build("digits", version, selector)
        return release

    def release(self, version: str = "1", selector: str = "all") -> Release:
        """Build a release and publish it through the running service."""
        assert self.service is not None, "start_service() first"
        release = self.build(version, selector)
        self.service.release(release.sequence)
        return release

    @staticmethod
    def offer(release: Release, device: str) -> ReleaseOffer:
        return offers(release)[device]

    def device(self, device_id: str) -> Device:
        dev = self.coordinator.registry.device(device_id)
        assert dev is not None
        return dev

    def wait_registry(self, devices: Iterable[str], predicate: Callable[[Device], bool],
                      what: str, timeout: float = TIMEOUT) -> None:
        devices = list(devices)
        wait_until(lambda: all(predicate(self.device(d)) for d in devices), what, timeout)

    def wait_active(self, devices: Iterable[str], sequence: int, timeout: float = TIMEOUT) -> None:
        """Until the coordinator's registry shows every device running ``sequence``."""
        self.wait_registry(devices, lambda d: d.active_sequence == sequence,
                           f"registry: devices on release {sequence}", timeout)

    def wait_result(self, device: str, code: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Until the registry shows ``code`` as the device's last result; return that result."""
        self.wait_registry([device], lambda d: (d.last_result or {}).get("code") == code,
                           f"{device} to report {code!r}", timeout)
        return dict(self.device(device).last_result)

    def fleet_status(self) -> list[dict[str, Any]]:
        """``edgefleet fleet status --json`` for this coordinator, parsed."""
        from edgefleet.cli import main

        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["fleet", "status", "--home", str(self.coordinator.home), "--json"]) == 0
        return list(json.loads(out.getvalue()))

    # -- agents --------------------------------------------------------------------------------
    def set_agent(self, device: str, **changes: Any) -> None:
        home = self.homes[device]
        cfg = dataclasses.replace(AgentConfig.load(home), **changes)
        (home / "agent.toml").write_text(cfg.to_toml())

    def start_agent(self, device: str, *, heartbeat: float = 0.5, request_timeout: float = 1.0,
                    wait: bool = True, **daemon_kwargs: Any) -> RunningAgent:
        checkpoints = Checkpoints()
        agent = Agent(AgentConfig.load(self.homes[device]), checkpoint=checkpoints)
        mqtt = dataclasses.replace(agent_mqtt_config(agent), **FAST_RECONNECT)
        daemon = ObservedDaemon(agent, mqtt, heartbeat=heartbeat,
                                request_timeout=request_timeout, **daemon_kwargs)
        running = RunningAgent(agent, daemon, checkpoints)
        self.agents[device] = running
        daemon.start()
        if wait:
            assert daemon.link.wait_connected(TIMEOUT), daemon.link.last_error
        return running

    def spawn_agent(self, device: str, tag: str = "") -> subprocess.Popen[bytes]:
        """``edgefleet agent run`` as a separate process (broker and password from agent.toml)."""
        log = self.work / f"{device}{tag}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgefleet", "-v", "agent", "run", "--home",
                 str(self.homes[device]), "--no-http", "--heartbeat", "0.5"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def log_of(self, device: str, tag: str = "") -> str:
        return (self.work / f"{device}{tag}.log").read_text(errors="replace")

    # -- raw clients -----------------------------------------------------------------------------
    def client(self, user: str, client_id: str, subscribe: Sequence[str] = (),
               *, password: str | None = None, **config: Any) -> tuple[MqttLink, Inbox]:
        """A plain MQTT client logged in as ``user``, started and subscribed."""
        inbox = Inbox()
        cfg = MqttConfig(url=self.broker.url, client_id=client_id, username=user,
                         password=password or self.users[user], protocol=self.protocol,
                         **{**FAST_RECONNECT, **config})
        link = MqttLink(cfg, inbox)
        for topic in subscribe:
            link.subscribe(topic, qos=1)
        self.links.append(link)
        link.start()
        assert link.wait_connected(TIMEOUT), f"{client_id}: {link.last_error}"
        return link, inbox

    # -- teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
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


def make_agent_home(home: Path, device: str, root_public: bytes, **config: Any) -> DeviceIdentity:
    """What ``edgefleet agent init`` does: device keys, pinned root key, agent.toml."""
    return provision(home, device, root_public, **config)


def make_coordinator(home: Path, digits: Digits, devices: Iterable[str], agent_root: Path,
                     **agent_config: Any) -> tuple[Coordinator, dict[str, Path]]:
    """A coordinator with the digits model registered and ``devices`` enrolled."""
    c = Coordinator.init(home)
    c.update_config(segment_size=SEGMENT)
    c.register_model("digits", digits.onnx, version="1")
    c.register_model("digits", digits.tflite, version="2")
    root_public = decode_public_key((home / "root.pub").read_bytes())
    homes = {}
    for dev in devices:
        homes[dev] = agent_root / dev
        c.enroll(make_agent_home(homes[dev], dev, root_public, **agent_config).public())
    return c, homes


@dataclass
class ExternalBroker:
    """A mosquitto the test started from config files (not an ``EmbeddedBroker``)."""

    url: str
    proc: subprocess.Popen[bytes]
    protocol: Literal[5, 311] = 5


@contextmanager
def cli_mosquitto(coordinator: Coordinator, out: Path) -> Iterator[ExternalBroker]:
    """``edgefleet coordinator broker-config`` on a free port, then ``mosquitto -c`` on it."""
    from edgefleet.cli import main

    port = _free_port()
    run_as = []  # started as root, mosquitto drops to a user that cannot read the 0600 files
    if os.geteuid() == 0:
        run_as = ["--run-as", pwd.getpwuid(0).pw_name]
    assert main(["coordinator", "broker-config", "--home", str(coordinator.home),
                 "--out", str(out), "--port", str(port), *run_as]) == 0
    mosquitto = _which("mosquitto")
    assert mosquitto is not None
    log = out / "data" / "mosquitto.log"
    with open(out / "mosquitto.stderr", "wb") as err:
        proc = subprocess.Popen([mosquitto, "-c", str(out / "mosquitto.conf")],
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        wait_until(lambda: proc.poll() is not None or (
            log.exists() and " running" in log.read_text(errors="replace") and _accepts(port)),
            f"mosquitto -c {out / 'mosquitto.conf'} to listen on {port}")
        assert proc.poll() is None, (out / "mosquitto.stderr").read_text(errors="replace")
        yield ExternalBroker(f"mqtt://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def open_fleet(work: Path, digits: Digits, devices: Sequence[str], *,
               kind: BrokerKind = "mosquitto",
               broker: Callable[[Coordinator], AbstractContextManager[Any]] | None = None,
               **agent_config: Any) -> Iterator[FleetHarness]:
    """A coordinator, enrolled agent homes and a running broker with their passwords and ACL
    (an ``EmbeddedBroker`` of ``kind``, or what ``broker(coordinator)`` starts)."""
    c, homes = make_coordinator(work / "coordinator", digits, devices, work, **agent_config)
    users = credentials(c)
    running_broker = broker(c) if broker is not None else EmbeddedBroker(
        data_dir=work / "broker", users=users, acl=edgefleet_acl(), force_kind=kind)
    with running_broker as running:
        c.update_config(broker=running.url, mqtt_protocol=running.protocol)
        secrets = c.home / "secrets" / "devices"
        for dev, home in homes.items():
            cfg = AgentConfig.load(home)
            cfg = dataclasses.replace(cfg, broker=running.url, mqtt_protocol=running.protocol,
                                      password_file=str((secrets / f"{dev}.password").resolve()))
            (home / "agent.toml").write_text(cfg.to_toml())
        harness = FleetHarness(work, c, running, users, homes, digits)
        try:
            yield harness
        finally:
            harness.close()


def digits_test_split(digits: Digits) -> tuple[np.ndarray, np.ndarray]:
    with np.load(digits.test_path) as npz:
        return np.asarray(npz["x"]), np.asarray(npz["y"])


def statuses(inbox: Inbox, device: str) -> list[DeviceStatus]:
    """The device's status reports an observer received, in order (cleared ones skipped)."""
    topic = f"ef/v1/dev/{device}/up/status"
    return [DeviceStatus.decode(m.payload) for m in list(inbox.messages)
            if m.topic == topic and m.payload]
