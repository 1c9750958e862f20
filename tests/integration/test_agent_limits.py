"""The agent's incoming size limit, enforced by a real mosquitto before anything is read.

The daemon announces ``MAX_INCOMING`` as its MQTT 5 Maximum Packet Size, so the broker never
sends it a larger packet (it drops it for this client instead): an oversize message costs the
device no memory at all, and the agent stays connected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from edgefleet.agent.daemon import MAX_INCOMING
from edgefleet.infra.broker import EmbeddedBroker
from edgefleet.infra.link.mqtt import MqttConfig
from edgefleet.protocol.messages import MAX_OFFER

from tests.conftest import Fleet, open_agent

from .brokers import HAVE_MOSQUITTO, NEED_MOSQUITTO, LinkFactory
from .fleet import FAST_RECONNECT, TIMEOUT, ObservedDaemon, wait_until

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NEED_MOSQUITTO),
]
RELEASE = "ef/v1/dev/dev-a/release"


@pytest.fixture
def daemon(fleet: Fleet, broker: EmbeddedBroker, tmp_path: Path) -> Iterator[ObservedDaemon]:
    agent = open_agent(fleet.agent_home(tmp_path / "home", "dev-a"))
    config = MqttConfig(url=broker.url, client_id="agent-dev-a", **FAST_RECONNECT)
    d = ObservedDaemon(agent, config, heartbeat=3600)
    d.start()
    try:
        assert d.link.wait_connected(TIMEOUT), d.link.last_error
        yield d
    finally:
        d.stop()
        agent.close()


def test_message_over_the_announced_maximum_never_reaches_the_agent(
    daemon: ObservedDaemon, broker: EmbeddedBroker, links: LinkFactory
) -> None:
    assert daemon.link._config.max_incoming == MAX_INCOMING
    pub = links.make(broker, "coordinator", default_max_packet=2 * MAX_INCOMING)

    # Larger than the agent accepts: the broker takes it, but does not forward it to dev-a.
    pub.link.publish(RELEASE, b"{" + b" " * MAX_INCOMING + b"}").wait(TIMEOUT)
    pub.link.publish(RELEASE, b"sentinel").wait(TIMEOUT)
    daemon.wait_handled("release", 1)  # same publisher and topic: in order, so it is final
    assert daemon.dropped == 0, "the oversize message was delivered and read"

    # Under the packet limit but over the offer cap: delivered, then dropped unparsed.
    pub.link.publish(RELEASE, b"{" + b" " * MAX_OFFER + b"}").wait(TIMEOUT)
    wait_until(lambda: daemon.dropped == 1, "the over-cap offer to arrive and be dropped")
    assert daemon.handled["release"] == 1
    assert daemon.link.connected.is_set() and daemon.link.last_error is None
    assert daemon.agent.last_result()["code"] == "decode"  # type: ignore[index]  # sentinel


def test_daemon_fills_in_the_limit_when_the_config_has_none(fleet: Fleet, tmp_path: Path) -> None:
    agent = open_agent(fleet.agent_home(tmp_path / "home", "dev-a"))
    try:
        config = MqttConfig(url="mqtt://127.0.0.1:1", client_id="c")
        assert ObservedDaemon(agent, config).link._config.max_incoming == MAX_INCOMING
        own = dataclasses.replace(config, max_incoming=50_000)
        assert ObservedDaemon(agent, own).link._config.max_incoming == 50_000
    finally:
        agent.close()
