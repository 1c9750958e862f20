"""``MqttLink`` reads the socket in blocks: what it has buffered is always delivered, however
much arrives at once, without waiting for the socket's next byte. A hand-written broker on a
loopback socket sends one burst of PUBLISH packets and then nothing (no ping answers before
the keep-alive, 60 s away), so a message left in the link's buffer would never arrive."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from edgefleet.infra.link.mqtt import READ_REFILLS, RECV_CHUNK, MqttConfig, MqttLink

TIMEOUT = 30.0  # s; below the keep-alive (60 s), the only other thing that would wake the link


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (128 if n else 0))
        if not n:
            return bytes(out)


def _publish(topic: str, payload: bytes) -> bytes:
    """A v5 QoS 0 PUBLISH: topic, empty properties, payload."""
    body = len(topic).to_bytes(2, "big") + topic.encode() + b"\x00" + payload
    return b"\x30" + _varint(len(body)) + body


def _read_packet(conn: socket.socket) -> None:
    conn.recv(1)
    length, mult = 0, 1
    while True:
        b = conn.recv(1)[0]
        length += (b & 127) * mult
        mult *= 128
        if not b & 128:
            break
    while length:
        length -= len(conn.recv(length))


@pytest.fixture
def burst_broker() -> Iterator[tuple[int, list[bytes]]]:
    """(port, bursts to send once the client is connected)."""
    server = socket.create_server(("127.0.0.1", 0))
    bursts: list[bytes] = []
    done = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            _read_packet(conn)  # CONNECT
            conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK: accepted, no properties
            for burst in bursts:
                conn.sendall(burst)
            done.wait(TIMEOUT * 2)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield server.getsockname()[1], bursts
    done.set()
    t.join(TIMEOUT)
    server.close()


@pytest.mark.parametrize("count, size", [
    (3000, 10),  # thousands of small packets in one read
    (40, (READ_REFILLS * RECV_CHUNK) // 20),  # more than one iteration's reads, in one burst
])  # fmt: skip
def test_a_burst_is_delivered_whole(
    burst_broker: tuple[int, list[bytes]], count: int, size: int
) -> None:
    port, bursts = burst_broker
    bursts.append(b"".join(_publish(f"t/{i}", bytes([i % 256]) * size) for i in range(count)))
    got: list[tuple[str, bytes]] = []
    all_in = threading.Event()

    def on_message(topic: str, payload: bytes, props: object) -> None:
        got.append((topic, payload))
        if len(got) == count:
            all_in.set()

    link = MqttLink(MqttConfig(url=f"mqtt://127.0.0.1:{port}", client_id="reads", keepalive=60,
                               clean_start=True, session_expiry=0), on_message)  # fmt: skip
    link.start()
    try:
        assert all_in.wait(TIMEOUT), f"{len(got)} of {count} messages delivered"
    finally:
        link.stop()
    assert got == [(f"t/{i}", bytes([i % 256]) * size) for i in range(count)]
