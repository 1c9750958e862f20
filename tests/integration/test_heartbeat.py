"""Presence through the MQTT last will: an agent killed mid-wave shows as offline within one
keep-alive and is not counted healthy by ``telemetry.version_health``, on the in-memory
broker and on a real mosquitto (where the agent is an ``edgefleet agent run`` process that
gets SIGKILL); a hung agent (in-memory: no packet for 1.5 keep-alives) too; a clean stop says
``offline`` itself. The live agent's inference telemetry is stored and read back."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.daemon import mqtt_config_for
from edgefleet.coordinator import telemetry
from edgefleet.protocol import topics

from tests.conftest import Digits

from .fleet import BROKERS, FAST_RECONNECT, TIMEOUT, ObservedDaemon, open_fleet, wait_until

KEEPALIVE = 30  # s: MqttConfig's default, what `agent run` uses


def _offline(fleet: object, device: str) -> bool:
    return fleet.device(device).state == "offline"  # type: ignore[attr-defined]


@BROKERS
def test_a_killed_agent_is_offline_within_one_keepalive_and_not_healthy(
    tmp_path: Path, digits: Digits, kind: str
) -> None:
    since = int(time.time()) - 5
    with open_fleet(tmp_path, digits, ["dev-a", "dev-b"], kind=kind) as fleet:  # type: ignore[arg-type]
        fleet.start_service()
        release = fleet.release("1")
        live = fleet.start_agent("dev-b")
        if kind == "memory":
            doomed = fleet.start_agent("dev-a")
        else:
            fleet.spawn_agent("dev-a")
        fleet.wait_active(["dev-a", "dev-b"], release.sequence)
        x = np.zeros((4, 64), dtype=np.float32)
        for _ in range(25):
            live.daemon.recorder.predict(x)
        wait_until(
            lambda: telemetry.version_health(
                fleet.coordinator.registry, name="digits", version="1", since=since
            ).get("dev-b", None) is not None and telemetry.version_health(
                fleet.coordinator.registry, name="digits", version="1", since=since
            )["dev-b"].count == 25,
            "dev-b's inference telemetry to be stored",
        )
        assert not _offline(fleet, "dev-a")

        if kind == "memory":  # the process dies: no DISCONNECT, the socket closes
            assert fleet.broker.memory is not None
            assert fleet.broker.memory.kill(topics.device_client_id("dev-a"))
        else:
            fleet.kill("dev-a")
        wait_until(lambda: _offline(fleet, "dev-a"), "dev-a offline", timeout=KEEPALIVE)

        health = telemetry.version_health(
            fleet.coordinator.registry, name="digits", version="1", since=since,
            device_ids=["dev-a", "dev-b", "dev-x"],
        )  # fmt: skip
        assert (health["dev-a"].online, health["dev-a"].healthy) == (False, False)
        assert health["dev-a"].state == "offline"
        assert (health["dev-b"].online, health["dev-b"].count, health["dev-b"].errors) == (
            True, 25, 0)  # fmt: skip
        assert health["dev-b"].rows == 100 and sum(health["dev-b"].class_counts.values()) == 100
        assert health["dev-b"].p95_ms is not None
        assert (health["dev-x"].online, health["dev-x"].state) == (False, "unknown")
        # the offline will changed the state only: what dev-a runs is still known
        assert fleet.device("dev-a").active_sequence == release.sequence
        if kind == "memory":
            doomed.daemon.stop()  # its link is dead already: nothing more reaches the broker
            doomed.agent.close()
            del fleet.agents["dev-a"]


def test_a_hung_agent_is_offline_after_its_keepalive_and_a_clean_stop_says_so(
    tmp_path: Path, digits: Digits
) -> None:
    keepalive = 1  # s, so the broker's 1.5 keep-alives pass quickly
    with open_fleet(tmp_path, digits, ["dev-a", "dev-b"], kind="memory") as fleet:
        fleet.start_service()
        agents = {}
        for dev in ("dev-a", "dev-b"):
            agent = Agent(AgentConfig.load(fleet.homes[dev]))
            mqtt = dataclasses.replace(mqtt_config_for(agent), keepalive=keepalive,
                                       **FAST_RECONNECT)  # fmt: skip
            daemon = ObservedDaemon(agent, mqtt, heartbeat=0.5,
                                    link_factory=fleet.broker.link_factory)  # fmt: skip
            daemon.start()
            assert daemon.link.wait_connected(TIMEOUT)
            agents[dev] = (agent, daemon)
        fleet.wait_registry(["dev-a", "dev-b"], lambda d: d.state == "idle", "both idle")
        assert fleet.broker.memory is not None
        assert fleet.broker.memory.kill(topics.device_client_id("dev-a"), hang=True)
        wait_until(lambda: _offline(fleet, "dev-a"), "hung dev-a offline", timeout=3 * keepalive)
        assert not _offline(fleet, "dev-b")
        agents["dev-b"][1].stop()  # clean: a DISCONNECT discards the will, so it says it
        wait_until(lambda: _offline(fleet, "dev-b"), "stopped dev-b offline")
        for agent, daemon in agents.values():
            if daemon.alive:
                daemon.stop()
            agent.close()


@pytest.fixture
def digits(digits_v1: Digits) -> Digits:
    return digits_v1
