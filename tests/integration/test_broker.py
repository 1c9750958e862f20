"""edgefleet.infra.broker: password files, ACL and config text, the embedded broker's lifecycle."""

from __future__ import annotations

import base64
import functools
import socket
import stat
from pathlib import Path

import pytest
from edgefleet.infra import broker as broker_mod
from edgefleet.infra.broker import (
    EmbeddedBroker,
    TlsFiles,
    edgefleet_acl,
    mosquitto_config,
    mosquitto_password_file,
)

from .brokers import HAVE_MOSQUITTO, NEED_MOSQUITTO, LinkFactory

needs_mosquitto = pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NEED_MOSQUITTO)
pytestmark = pytest.mark.timeout(60)


# -- password files ------------------------------------------------------------------------


def test_pbkdf2_hash_has_mosquitto_shape() -> None:
    line = broker_mod._pbkdf2_hash("pw", salt=b"\x01" * 12)
    _, kind, iterations, salt, digest = line.split("$")
    assert (kind, iterations) == ("7", "101")
    assert base64.b64decode(salt) == b"\x01" * 12 and len(base64.b64decode(digest)) == 64


@pytest.mark.skipif(broker_mod._which("mosquitto_passwd") is None, reason="needs mosquitto_passwd")
def test_pbkdf2_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    path = mosquitto_password_file(tmp_path / "pw", {"alice": "s3cret"})  # via the tool
    user, hashed = path.read_text().strip().split(":", 1)
    salt = base64.b64decode(hashed.split("$")[3])
    assert user == "alice"
    assert broker_mod._pbkdf2_hash("s3cret", salt=salt) == hashed


@needs_mosquitto
@pytest.mark.parametrize("use_tool", [True, False])
def test_password_file_is_accepted_by_mosquitto(
    tmp_path: Path, links: LinkFactory, monkeypatch: pytest.MonkeyPatch, use_tool: bool
) -> None:
    writer = functools.partial(mosquitto_password_file, use_tool=use_tool)
    monkeypatch.setattr(broker_mod, "mosquitto_password_file", writer)
    users = {"alice": "a-pw", "bob": "b:pw"}  # ':' is hashed by us even with the tool
    with EmbeddedBroker(data_dir=tmp_path, users=users, force_kind="mosquitto") as running:
        path = running.data_dir / "passwd"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert "a-pw" not in path.read_text() and "b:pw" not in path.read_text()
        for user, password in users.items():
            ok = links.make(running, user, username=user, password=password)
            assert ok.link.connected.is_set()
        bad = links.make(running, "mallory", username="alice", password="b:pw", wait=False)
        assert bad.events.wait_disconnects(1) and "Not authorized" in str(bad.link.last_error)
        links.close()


@pytest.mark.parametrize("name", ["", "a:b", "a\nb"])
def test_password_file_rejects_bad_usernames(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="bad username"):
        mosquitto_password_file(tmp_path / "pw", {name: "x"})


# -- ACL and config text -------------------------------------------------------------------


def test_acl_text() -> None:
    acl = edgefleet_acl("coord-1")
    rules = [line for line in acl.splitlines() if line and not line.startswith("#")]
    assert rules == [
        "pattern read ef/v1/dev/%u/release",
        "pattern read ef/v1/dev/%u/chunk",
        "pattern read ef/v1/dev/%u/cmd",
        "pattern read ef/v1/dev/%u/cmd/#",
        "pattern read ef/v1/dev/%u/fl",
        "pattern write ef/v1/dev/%u/up/status",
        "pattern write ef/v1/dev/%u/up/chunkreq",
        "pattern write ef/v1/dev/%u/up/telemetry",
        "pattern write ef/v1/dev/%u/up/fl",
        "user coord-1",
        "topic readwrite ef/v1/#",
    ]


@pytest.mark.parametrize("name", ["", "two words", "x\ntopic readwrite #", "a/b", "#"])
def test_acl_rejects_bad_coordinator_names(name: str) -> None:
    with pytest.raises(ValueError):
        edgefleet_acl(name)


def test_config_text(tmp_path: Path) -> None:
    open_conf = mosquitto_config(port=1234, data_dir=tmp_path)
    assert "listener 1234 127.0.0.1" in open_conf
    assert "allow_anonymous true" in open_conf
    assert "persistence true" in open_conf
    assert f"persistence_location {tmp_path.resolve()}/" in open_conf
    assert "max_queued_messages 10000" in open_conf
    assert "max_packet_size" not in open_conf
    tls = TlsFiles(ca=tmp_path / "ca", cert=tmp_path / "c", key=tmp_path / "k")
    closed = mosquitto_config(
        port=1,
        data_dir=tmp_path,
        password_file=tmp_path / "pw",
        acl_file=tmp_path / "acl",
        tls=tls,
        persistence=False,
        max_packet_size=4096,
        message_size_limit=2048,
        user="edgefleet",
    )
    assert not any(line.startswith("user ") for line in open_conf.splitlines())
    for line in (
        "user edgefleet",
        "allow_anonymous false",
        f"password_file {tmp_path.resolve()}/pw",
        f"acl_file {tmp_path.resolve()}/acl",
        "persistence false",
        "max_packet_size 4096",
        "message_size_limit 2048",
        "require_certificate false",
    ):
        assert line in closed.splitlines()
    with pytest.raises(ValueError, match="newlines"):
        mosquitto_config(port=1, data_dir=tmp_path, acl_file="x\nallow_anonymous true")


# -- embedded broker -----------------------------------------------------------------------


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("kind", [pytest.param("mosquitto", marks=needs_mosquitto), "amqtt"])
def test_lifecycle_and_restart_on_same_port(tmp_path: Path, links: LinkFactory, kind: str) -> None:
    with EmbeddedBroker(data_dir=tmp_path, force_kind=kind) as running:  # type: ignore[arg-type]
        assert running.kind == kind
        assert running.protocol == (5 if kind == "mosquitto" else 311)
        assert running.url == f"mqtt://127.0.0.1:{running.port}" and _accepts(running.port)
        port = running.port
        running.stop()
        assert not _accepts(port)
        running.restart()
        assert running.port == port and _accepts(port)
        sub = links.make(running, "s", subscribe=("t",))
        links.make(running, "p").link.publish("t", b"hello")
        assert sub.inbox.wait_topic("t").payload == b"hello"
        links.close()
    assert not _accepts(port)
    assert tmp_path.exists()  # a given data dir is never deleted


def test_temporary_data_dir_is_removed() -> None:
    with EmbeddedBroker() as running:
        data_dir = running.data_dir
        assert data_dir.is_dir()
    assert not data_dir.exists()


def test_amqtt_fallback_round_trip_311(links: LinkFactory) -> None:
    with EmbeddedBroker(force_kind="amqtt") as running:
        assert running.protocol == 311
        sub = links.make(running, "dev", subscribe=("ef/v1/dev/dev/release",))
        links.make(running, "coord").link.publish("ef/v1/dev/dev/release", b"offer")
        got = sub.inbox.wait_topic("ef/v1/dev/dev/release")
        assert got.payload == b"offer" and got.props.correlation_data is None
        links.close()


def test_amqtt_fallback_checks_passwords(links: LinkFactory) -> None:
    with EmbeddedBroker(force_kind="amqtt", users={"dev": "right"}) as running:
        assert links.make(running, "ok", username="dev", password="right").link.connected.is_set()
        bad = links.make(running, "bad", username="dev", password="wrong", wait=False)
        assert bad.events.wait_disconnects(1)
        assert not bad.link.connected.is_set() and bad.link.last_error
        links.close()


def test_force_mosquitto_without_binary_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_mod, "_which", lambda name: None)
    with pytest.raises(RuntimeError, match="no mosquitto binary"):
        EmbeddedBroker(force_kind="mosquitto")
    assert EmbeddedBroker(data_dir="unused").kind == "amqtt"


@needs_mosquitto
def test_mosquitto_that_cannot_listen_reports_why(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        running = EmbeddedBroker(data_dir=tmp_path, start_timeout=5)
        running.port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="mosquitto exited"):
            running.start()
