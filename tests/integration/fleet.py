"""The integration tests' view of the fleet rig (``edgefleet.simulations``).

``open_fleet(work, digits, devices, kind=...)`` is ``simulations.fleet.open_fleet`` with the
digits model registered as version "1" (ONNX) and "2" (TFLite) and 4 KiB segments (~10 chunks
per release). ``kind`` picks the broker: ``memory`` (the in-memory broker, same ACL and
passwords), ``mosquitto`` or ``amqtt`` (embedded, on loopback). ``BROKERS`` parametrizes a test
over the in-memory broker and, where it is installed, a real mosquitto.

What is test-only lives here: clients that collect into an ``Inbox``, ``fleet status`` through
the CLI, and ``cli_mosquitto`` (a mosquitto started from ``broker-config`` output).
"""

from __future__ import annotations

import io
import json
import os
import pwd
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from edgefleet.agent.identity import DeviceIdentity
from edgefleet.agent.provision import provision
from edgefleet.coordinator.home import Coordinator
from edgefleet.infra.broker import _accepts, _free_port, _which
from edgefleet.infra.link import Link
from edgefleet.protocol.messages import DeviceStatus
from edgefleet.simulations import fleet as rig
from edgefleet.simulations.brokers import BrokerKind, SimBroker, external_broker
from edgefleet.simulations.fleet import (
    FAST_RECONNECT,
    Checkpoints,
    ChunkGate,
    ObservedDaemon,
    RunningAgent,
)
from edgefleet.simulations.homes import FleetHomes, ModelFile
from edgefleet.simulations.wait import TIMEOUT, wait_until

from tests.conftest import Digits

from .brokers import HAVE_MOSQUITTO, NEED_MOSQUITTO, Inbox

__all__ = ["BROKERS", "FAST_RECONNECT", "TIMEOUT", "ChunkGate", "Checkpoints", "FleetHarness",
           "ObservedDaemon", "RunningAgent", "cli_mosquitto", "digits_test_split",
           "make_agent_home", "open_fleet", "statuses", "wait_until"]

SEGMENT = 4096  # bytes per segment: the ~39 KB digits model is ~10 chunks
#: run a test on the in-memory broker and on a real mosquitto (skipped where it is missing)
BROKERS = pytest.mark.parametrize("kind", [
    "memory",
    pytest.param("mosquitto", marks=pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NEED_MOSQUITTO)),
])


class FleetHarness(rig.Fleet):
    digits: Digits

    def client(self, user: str, client_id: str, subscribe: Sequence[str] = (),
               *, password: str | None = None, **config: Any) -> tuple[Link, Inbox]:
        """A plain MQTT client logged in as ``user``, started, subscribed, with an inbox."""
        inbox = Inbox()
        link = super().client(user, client_id, subscribe, on_message=inbox, password=password,
                              **config)
        return link, inbox

    def fleet_status(self) -> list[dict[str, Any]]:
        """``edgefleet fleet status --json`` for this coordinator, parsed."""
        from edgefleet.cli import main

        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["fleet", "status", "--home", str(self.coordinator.home), "--json"]) == 0
        return list(json.loads(out.getvalue()))


def make_agent_home(home: Path, device: str, root_public: bytes, **config: Any) -> DeviceIdentity:
    """What ``edgefleet agent init`` does: device keys, pinned root key, agent.toml."""
    return provision(home, device, root_public, **config)


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
               broker: Callable[[Coordinator], Any] | None = None,
               **agent_config: Any) -> Iterator[FleetHarness]:
    """The rig with the digits models, on a broker of ``kind`` (or the context manager
    ``broker(coordinator)`` returns, e.g. ``cli_mosquitto``)."""
    def external(homes: FleetHomes) -> SimBroker:
        assert broker is not None
        cm = broker(homes.coordinator)
        started = cm.__enter__()
        return external_broker(started.url, started.protocol,
                               close=lambda: cm.__exit__(None, None, None))

    models = [ModelFile(name="digits", path=digits.onnx, version="1"),
              ModelFile(name="digits", path=digits.tflite, version="2")]
    with rig.open_fleet(work, devices, models=models, segment_size=SEGMENT,
                        broker=external if broker is not None else kind,
                        fleet_type=FleetHarness, **agent_config) as fleet:
        assert isinstance(fleet, FleetHarness)
        fleet.digits = digits
        yield fleet


def digits_test_split(digits: Digits) -> tuple[np.ndarray, np.ndarray]:
    with np.load(digits.test_path) as npz:
        return np.asarray(npz["x"]), np.asarray(npz["y"])


def statuses(inbox: Inbox, device: str) -> list[DeviceStatus]:
    """The device's status reports an observer received, in order (cleared ones skipped)."""
    topic = f"ef/v1/dev/{device}/up/status"
    return [DeviceStatus.decode(m.payload) for m in list(inbox.messages)
            if m.topic == topic and m.payload]
