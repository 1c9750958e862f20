"""The generated broker config against one device's own credentials (issue 7, items 1, 2, 4,
6, 15 and the root start-up), each on a real mosquitto started from ``broker-config`` output.

"Never arrives" is shown with sentinels (see test_rogue.py); memory is read from
``/proc/<pid>/status`` once the broker has provably handled everything sent (a QoS 1
sentinel from the same connection is acknowledged after every earlier publish).
"""

from __future__ import annotations

import io
import json
import logging
import socket
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from edgefleet.agent.provision import provision
from edgefleet.coordinator import brokerconf
from edgefleet.coordinator.home import Coordinator
from edgefleet.infra.broker import MAX_PACKET, BrokerLimits, dynsec_plugin
from edgefleet.infra.link.mqtt import MqttConfig, MqttLink
from edgefleet.protocol import topics
from edgefleet.protocol.keys import decode_public_key
from edgefleet.protocol.messages import ChunkRequest
from edgefleet.simulations.attacks import RawMqtt, publish_packet
from edgefleet.simulations.homes import provision_fleet

from edgefleet.cli import main
from tests.conftest import Digits

from .brokers import HAVE_MOSQUITTO, NEED_MOSQUITTO, Events, Inbox
from .fleet import TIMEOUT, ExternalBroker, cli_mosquitto, open_fleet, wait_until

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NEED_MOSQUITTO),
    pytest.mark.skipif(dynsec_plugin() is None, reason="needs mosquitto's dynamic-security plugin"),
]


# -- helpers -----------------------------------------------------------------------------------


def _conf_limits(conf: Path) -> BrokerLimits:
    """The bounds a mosquitto.conf states, mosquitto 2.0's defaults for those it leaves out
    (what the RSS bound is derived from)."""
    values = dict(line.split(" ", 1) for line in conf.read_text().splitlines() if " " in line)
    defaults = {
        "max_packet_size": 268_435_455,
        "max_queued_messages": 1000,
        "max_queued_bytes": 0,
        "max_inflight_messages": 20,
        "max_inflight_bytes": 0,
    }
    return BrokerLimits(**{f: int(values.get(f, d)) for f, d in defaults.items()})


def _rss(pid: int) -> int:
    """Resident set size of a process, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _raw(port: int, client_id: str, user: str, password: str) -> RawMqtt:
    """A bare MQTT 3.1.1 socket that reads only when told to: a client that stops reading."""
    raw = RawMqtt("127.0.0.1", port, client_id, user, password)
    assert raw.return_code == 0, "CONNACK: connection refused"
    return raw


def _port(broker: ExternalBroker) -> int:
    return int(broker.url.rsplit(":", 1)[1])


def _closed_by_peer(sock: socket.socket, data: bytes) -> bool:
    """Send ``data``; True if the broker closed the connection instead of taking it all."""
    try:
        sock.sendall(data)
        return sock.recv(1) == b""
    except TimeoutError:  # took it and kept the connection open
        return False
    except OSError:  # reset while we were still sending
        return True


@pytest.fixture
def homes(tmp_path: Path) -> Coordinator:
    return provision_fleet(tmp_path, ["dev-a", "dev-b"]).coordinator


@pytest.fixture
def running(homes: Coordinator, tmp_path: Path) -> Iterator[ExternalBroker]:
    with cli_mosquitto(homes, tmp_path / "broker") as broker:
        yield broker


def _link(
    broker: ExternalBroker, coord: Coordinator, user: str, client_id: str, *,
    inbox: Inbox | None = None, subscribe: tuple[str, ...] = (), wait: bool = True,
) -> tuple[MqttLink, Events, Inbox]:  # fmt: skip
    events, inbox = Events(), inbox or Inbox()
    link = MqttLink(
        MqttConfig(url=broker.url, client_id=client_id, username=user,
                   password=brokerconf.credentials(coord).get(user, "revoked"),
                   reconnect_min=0.2, reconnect_max=0.5),
        inbox, on_connect=events.on_connect, on_disconnect=events.on_disconnect,
    )  # fmt: skip
    for topic in subscribe:
        link.subscribe(topic, qos=1)
    link.start()
    if wait:
        assert link.wait_connected(TIMEOUT), link.last_error
    return link, events, inbox


# -- item 1: what a client that stops reading costs the broker -------------------------------


@pytest.mark.parametrize("qos", [0, 1])
def test_a_slow_reader_costs_the_broker_a_bounded_amount(
    homes: Coordinator, running: ExternalBroker, tmp_path: Path, qos: int
) -> None:
    limits = _conf_limits(tmp_path / "broker" / "mosquitto.conf")
    chunk = topics.chunk("dev-a")
    slow = _raw(_port(running), "agent-dev-a", "dev-a", brokerconf.credentials(homes)["dev-a"])
    assert slow.subscribe(chunk, wait=True) == 1
    coord, _, _ = _link(running, homes, "coordinator", "coordinator-flood")
    frame = 64 * 1024  # a release with 64 KiB segments: ~65 KiB chunk packets
    count = 3000  # 192 MiB: three times the bound of the QoS 0 path
    bound = {0: limits.per_client_qos0 * (frame + 1024) // limits.max_packet_size,
             1: limits.per_client_qos1}[qos]  # fmt: skip
    before = _rss(running.proc.pid)
    try:
        for _ in range(count):
            delivery = coord.publish(chunk, b"\x00" * frame, qos=qos)
            if qos:
                assert delivery.wait(TIMEOUT)
            else:
                assert coord.wait_writable(4 * frame, TIMEOUT)
        assert coord.publish(topics.cmd("dev-b"), b"sentinel", qos=1).wait(TIMEOUT)
        grown = _rss(running.proc.pid) - before
    finally:
        slow.close()
        coord.stop()
    slack = 32 << 20  # socket buffers, allocator, the log
    assert grown < bound + slack, f"mosquitto grew {grown >> 20} MiB; bound {bound >> 20} MiB"
    assert grown < count * frame // 2, f"grew {grown >> 20} MiB"  # the bound held
    assert limits == BrokerLimits()
    log = (tmp_path / "broker" / "data" / "mosquitto.log").read_text(errors="replace")
    assert "Outgoing messages are being dropped for client agent-dev-a" in log


def test_the_packet_bound_admits_every_legitimate_message() -> None:
    from edgefleet.agent.daemon import MAX_INCOMING

    assert MAX_PACKET >= MAX_INCOMING  # what an agent accepts, the broker takes
    assert BrokerLimits().max_packet_size == MAX_PACKET


# -- item 2: the coordinators' shared subscription is closed to devices ----------------------


def test_a_device_cannot_join_the_coordinators_share_group(
    tmp_path: Path, digits_v1: Digits, caplog: pytest.LogCaptureFixture
) -> None:
    devices = ["dev-a", "dev-b", "dev-c"]
    with open_fleet(
        tmp_path,
        digits_v1,
        [*devices, "dev-r"],
        broker=lambda c: cli_mosquitto(c, tmp_path / "broker-conf"),
    ) as fleet:
        caplog.set_level(logging.WARNING, logger="edgefleet.infra.link.mqtt")
        _, rogue = fleet.client("dev-r", "agent-dev-r", [topics.chunk_requests_shared()])
        wait_until(
            lambda: any("refused a subscription" in r.getMessage() for r in caplog.records),
            "the rogue's SUBACK failure",
        )
        _, watch = fleet.client("coordinator", "watch", [topics.up_all("chunkreq")])
        fleet.start_service()
        svc = fleet.service
        assert svc is not None
        agents = [fleet.start_agent(d) for d in devices]
        release = fleet.release("1", ",".join(devices))
        for a in agents:
            assert a.daemon.installed.wait(TIMEOUT), a.device_id
        fleet.wait_active(devices, release.sequence)

        def requested() -> int:  # chunk indexes the agents asked for, as the watcher saw them
            return sum(len(ChunkRequest.decode(m.payload).indexes) for m in list(watch.messages))

        # Every request reached the coordinator and was served once: none was lost to the
        # rogue (which would make agents time out and ask again, so requested > served).
        wait_until(
            lambda: requested() == svc.chunks.sent_chunks > 0,
            "every chunk request to be served by the coordinator",
        )
        assert svc.chunks.refused == 0
        assert rogue.messages == []


# -- item 4: client ids are bound to accounts ---------------------------------------------------


def test_a_device_cannot_take_another_clients_id(
    homes: Coordinator, running: ExternalBroker
) -> None:
    victim, victim_events, _ = _link(running, homes, "dev-a", "agent-dev-a")
    coord, coord_events, _ = _link(running, homes, "coordinator", "coordinator-host-1")
    coord2, coord2_events, _ = _link(running, homes, "coordinator", "coordinator-host-2")
    for stolen in ("agent-dev-a", "coordinator-host-1", "coordinator-host-2"):
        rogue, events, _ = _link(running, homes, "dev-b", stolen, wait=False)
        assert events.wait_disconnects(2), f"{stolen}: not refused"  # refused, and again
        assert "Not authorized" in str(rogue.last_error) and events.connects == []
        rogue.stop()
    # A sentinel round trip through each victim: all still connected, never kicked.
    for link, ev in ((victim, victim_events), (coord, coord_events), (coord2, coord2_events)):
        assert link.publish(
            topics.up("dev-a", "status") if link is victim else topics.cmd("dev-b"), b"ping", qos=1
        ).wait(TIMEOUT)
        assert ev.disconnects == [] and ev.connects == [False]
        link.stop()
    own, events, _ = _link(running, homes, "dev-b", "agent-dev-b")  # its own id works
    assert events.connects == [False]
    own.stop()


# -- item 6: no unbounded retained data --------------------------------------------------------


def test_a_device_cannot_retain_large_or_stray_messages(
    homes: Coordinator, running: ExternalBroker, tmp_path: Path
) -> None:
    dev, _, _ = _link(running, homes, "dev-a", "agent-dev-a")
    up = "ef/v1/dev/dev-a/up/"
    for topic in (up + "anything-else", up + "status/x", "ef/v1/dev/dev-a/upx"):
        assert dev.publish(topic, b"stray" * 1000, qos=1, retain=True).wait(TIMEOUT)
    assert dev.publish(up + "status", b"sentinel", qos=1, retain=True).wait(TIMEOUT)
    assert dev.max_payload < 5 << 20  # the broker announced its packet bound
    dev.stop()
    # A 20 MB retained publish from a client that ignores the announced maximum: mosquitto
    # closes the connection on the packet's length, before reading (or storing) the payload.
    raw = _raw(_port(running), "agent-dev-a", "dev-a", brokerconf.credentials(homes)["dev-a"])
    packet = publish_packet(up + "telemetry", b"\x00" * (20 << 20), retain=True)  # QoS 0
    before = _rss(running.proc.pid)
    assert _closed_by_peer(raw.sock, packet)
    raw.close()
    assert _rss(running.proc.pid) - before < 10 << 20
    _, _, seen = _link(running, homes, "coordinator", "watch", subscribe=(up + "#",))
    wait_until(lambda: seen.topics(), "the retained status")
    assert seen.topics() == [up + "status"]  # only the exact upstream topic kept anything
    running.proc.terminate()  # mosquitto saves its persistence database on SIGTERM
    running.proc.wait(TIMEOUT)
    db = tmp_path / "broker" / "data" / "mosquitto.db"
    assert db.exists() and db.stat().st_size < 64 * 1024


# -- item 15: enrolment and revocation reach the running broker ---------------------------------


def _cli(*argv: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(list(argv)) == 0
    return out.getvalue()


def test_revoke_disconnects_and_refuses_and_enroll_admits(
    homes: Coordinator, running: ExternalBroker, tmp_path: Path
) -> None:
    dev, events, _ = _link(running, homes, "dev-a", "agent-dev-a")
    password = brokerconf.credentials(homes)["dev-a"]
    said = _cli("coordinator", "revoke", "--home", str(homes.home), "--device-id", "dev-a")
    assert "dev-a disconnected and refused" in said, said
    assert events.wait_disconnects(2)  # kicked off, then its reconnect is refused
    assert "Not authorized" in str(dev.last_error) and not dev.connected.is_set()
    dev.stop()
    again = MqttLink(MqttConfig(url=running.url, client_id="agent-dev-a", username="dev-a",
                                password=password), lambda *_: None)  # fmt: skip
    again.start()
    wait_until(lambda: again.last_error, "the revoked device to be refused")
    assert "Not authorized" in str(again.last_error)
    again.stop()
    # A device enrolled while the broker runs may connect straight away, as agent-<id> only.
    root_public = decode_public_key((homes.home / "root.pub").read_bytes())
    provision(tmp_path / "dev-new", "dev-new", root_public)  # `agent init`
    pub_file = tmp_path / "dev-new" / "keys" / "device.pub.json"
    assert pub_file.exists()
    said = _cli("coordinator", "enroll", "--home", str(homes.home), "--device-id", "dev-new",
                "--public-key", str(pub_file))  # fmt: skip
    assert "dev-new may connect as client agent-dev-new" in said, said
    new, new_events, _ = _link(running, homes, "dev-new", "agent-dev-new")
    assert new_events.connects == [False]
    new.stop()


def test_enroll_and_revoke_say_what_to_run_without_a_broker(homes: Coordinator) -> None:
    said = _cli("coordinator", "revoke", "--home", str(homes.home), "--device-id", "dev-a")
    assert said.splitlines()[-1].startswith("broker: not managed here")
    assert "broker-config" in said
    brokerconf.write_broker_config(homes, homes.home / "broker", port=1)  # nothing listens
    said = brokerconf.sync_revoked(homes, "dev-b", timeout=1.0)
    assert said.startswith("broker not updated (") and "broker-config" in said, said
    assert "\n" not in said


# -- the new user: `mosquitto -c broker/mosquitto.conf` as root --------------------------------


def test_broker_config_as_root_keeps_mosquitto_able_to_read_its_files(
    homes: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(brokerconf.os, "geteuid", lambda: 0)
    said = _cli("coordinator", "broker-config", "--home", str(homes.home), "--port", "1")
    conf = (homes.home / "broker" / "mosquitto.conf").read_text()
    assert "user root" in conf.splitlines()
    assert "running as root" in said and "--run-as" in said
    monkeypatch.setattr(brokerconf.os, "geteuid", lambda: 1000)
    said = _cli("coordinator", "broker-config", "--home", str(homes.home), "--port", "1")
    conf = (homes.home / "broker" / "mosquitto.conf").read_text()
    assert not [line for line in conf.splitlines() if line.startswith("user ")]
    assert "running as root" not in said
    assert json.loads((homes.home / "broker" / "dynamic-security.json").read_text())["clients"]
