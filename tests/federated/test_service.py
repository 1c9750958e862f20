"""The FL service: who is sampled (presence), seeded sampling, metrics for release decisions,
too few devices as one error, and a release installing while a round is running."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import pytest
from edgefleet.federated import wire
from edgefleet.federated.app import build_client_app, train_reply
from edgefleet.federated.data import load_dir
from edgefleet.federated.service import (
    FlService,
    NotEnoughDevicesError,
    Presence,
    metric_of,
)
from edgefleet.infra.link import InMemoryBroker, MqttConfig
from edgefleet.protocol.messages import DeviceStatus
from edgefleet.simulations.fl import BOOTSTRAP, FlSimConfig, fl_fleet
from edgefleet.simulations.homes import provision_fleet
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

WAIT = 60.0
T = 1_800_000_000


class Clock:
    def __init__(self) -> None:
        self.wall, self.mono = float(T), 0.0

    def tick(self, s: float) -> None:
        self.wall += s
        self.mono += s


def _status(device: str, t: int, state: str = "idle", *, fl: bool = True) -> bytes:
    caps = (DeviceStatus.FL,) if fl else ()
    return DeviceStatus(device_id=device, time=t, state=state, capabilities=caps).encode()


@pytest.fixture
def presence(tmp_path: Path) -> tuple[Presence, Clock, Any]:
    homes = provision_fleet(tmp_path, ["a", "b", "c", "d"])
    clock = Clock()
    p = Presence(homes.coordinator.registry, window=10, clock=lambda: clock.wall,
                 monotonic=lambda: clock.mono)  # fmt: skip
    return p, clock, homes.coordinator


def test_only_enrolled_recently_seen_devices_are_eligible(presence: Any) -> None:
    p, clock, coordinator = presence
    assert p.eligible() == []  # enrolled, never seen
    for d in ("d", "b", "a", "c"):
        p.status(d, _status(d, T), retained=False)
    assert p.eligible() == ["a", "b", "c", "d"]  # sorted: Flower samples from this order
    p.status("b", _status("b", T, "offline"), retained=False)
    p.status("c", _status("x", T), retained=False)  # another device's status on c's topic
    p.status("c", b"not json", retained=False)
    coordinator.revoke("d")
    assert p.eligible() == ["a", "c"]
    clock.tick(11)  # a and c fall silent past the window ...
    p.status("a", _status("a", int(clock.wall)), retained=False)
    assert p.eligible() == ["a"]
    coordinator.registry.update_device("c", last_seen=int(clock.wall))  # ... or serve saw c
    assert p.eligible() == ["a", "c"]


def test_only_devices_whose_status_says_opted_in_are_eligible(presence: Any) -> None:
    p, clock, coordinator = presence
    p.status("a", _status("a", T), retained=True)
    p.status("b", _status("b", T, fl=False), retained=False)  # online, not opted in
    old = {"type": "status", "schema_version": 1, "device_id": "c", "time": T, "state": "idle",
           "active": None, "highest_sequence": 0, "last_result": None, "progress": None,
           "counter": 1}  # fmt: skip
    p.status("c", json.dumps(old).encode(), retained=False)  # an agent before the field
    coordinator.registry.update_device("d", last_seen=T)  # serve saw d, this link did not
    assert p.eligible() == ["a"]
    p.status("b", _status("b", T + 1), retained=False)  # b opts in (restarted with fl_enabled)
    assert p.eligible() == ["a", "b"]
    p.status("a", _status("a", T + 1, fl=False), retained=False)  # ... and a opts out
    assert p.eligible() == ["b"]


def test_settle_waits_for_the_status_of_every_device_the_registry_saw(presence: Any) -> None:
    p, _, coordinator = presence
    for d in ("a", "b", "c"):
        coordinator.registry.update_device(d, last_seen=T)  # coordinator serve saw them
    coordinator.revoke("c")
    p.status("a", _status("a", T), retained=True)
    assert not p.settle(0)  # b's retained status has not come in yet
    p.status("b", _status("b", T, fl=False), retained=True)
    assert p.settle(0)  # d was never seen: nothing to wait for
    assert p.eligible() == ["a"]


def test_a_device_that_missed_a_reply_waits_for_a_live_status(presence: Any) -> None:
    p, clock, _ = presence
    for d in ("a", "b"):
        p.status(d, _status(d, T), retained=False)
    p.missed(["b"])
    assert p.eligible() == ["a"]
    clock.tick(1)
    p.status("b", _status("b", T), retained=True)  # a retained one is old news
    assert p.eligible() == ["a"]
    p.status("b", _status("b", T + 1), retained=False)
    assert p.eligible() == ["a", "b"]


def test_sampling_is_seeded_for_the_run_and_restored_after() -> None:
    from flwr.serverapp.strategy import strategy_utils

    def draws(seed: int) -> list[list[int]]:
        with wire.seeded_sampling(seed):
            return [strategy_utils.random.sample(range(100), 5) for _ in range(3)]

    assert draws(7) == draws(7) != draws(8)
    assert strategy_utils.random is random


@pytest.mark.parametrize(
    ("lineage", "metrics", "name", "expected"),
    [
        ({"fl": {"metrics": {"central": {"accuracy": 0.9}, "eval": {"eval-accuracy": 0.8}}}},
         {}, "accuracy", 0.9),
        ({"fl": {"metrics": {"central": {}, "eval": {"eval-accuracy": 0.8}}}}, {}, "accuracy",
         0.8),
        ({"fl": {"metrics": {"train": {"train-loss": 0.3}}}}, {}, "loss", 0.3),
        ({}, {"accuracy": 0.7}, "accuracy", 0.7),
        ({}, {}, "accuracy", None),
    ],
)  # fmt: skip
def test_metric_of(lineage: Any, metrics: Any, name: str, expected: float | None) -> None:
    assert metric_of(lineage, metrics, name) == expected


def test_too_few_devices_is_one_error_not_an_endless_wait(tmp_path: Path) -> None:
    homes = provision_fleet(tmp_path, ["a", "b"])
    with InMemoryBroker() as broker:
        service = FlService(homes.coordinator, MqttConfig(url=broker.url, client_id="fl"),
                            link_factory=broker.link)  # fmt: skip
        with service:
            with pytest.raises(NotEnoughDevicesError, match="0 eligible devices.*needs 2"):
                service.run(FlSimConfig(agents=2).spec(), wait_devices=0)


# -- a release installs while a round is running ------------------------------------------


def test_a_release_installs_while_a_round_is_training(tmp_path: Path) -> None:
    entered, gate = threading.Event(), threading.Event()

    def gated() -> ClientApp:
        app = ClientApp()
        real = build_client_app(lambda ctx: load_dir(Path(ctx.node_config["data-dir"])))

        @app.train()
        def train(msg: Message, context: Context) -> Message:
            entered.set()
            assert gate.wait(WAIT)
            return train_reply(msg, load_dir(Path(context.node_config["data-dir"])))

        @app.evaluate()
        def evaluate(msg: Message, context: Context) -> Message:
            return real(msg, context)

        return app

    cfg = FlSimConfig(agents=2, rounds=1, round_timeout=WAIT, release="")
    with fl_fleet(tmp_path, cfg, apps={"fl-0": gated}) as sim:
        out: dict[str, Any] = {}
        runner = threading.Thread(target=lambda: out.update(outcome=sim.service.run(cfg.spec())))
        runner.start()
        try:
            assert entered.wait(WAIT)  # fl-0's ClientApp is mid-training ...
            onnx = next((tmp_path / "bootstrap").glob("*.onnx"))  # what fl_fleet released
            sim.fleet.coordinator.register_model(BOOTSTRAP, onnx, version="2")
            release = sim.fleet.release("2", name=BOOTSTRAP)
            sim.fleet.wait_active(sim.devices, release.sequence)  # ... and it installs
            agent = sim.fleet.agents["fl-0"]
            assert agent.active_sequence() == release.sequence
            assert agent.agent.predict(sim.federation.x_test[:4]).shape == (4, 10)
            assert runner.is_alive()  # the round is still waiting for fl-0
        finally:
            gate.set()
            runner.join(WAIT)
        assert [r.version for r in out["outcome"].result.rounds] == ["1"]

