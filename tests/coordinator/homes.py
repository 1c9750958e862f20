"""A small coordinator home for the application-layer tests: real keys, real crypto, a
registered (tiny, never loaded) model and enrolled devices whose private keys the test keeps.
Self-contained, so these tests need nothing from the agent side."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from edgefleet.coordinator.home import Coordinator
from edgefleet.coordinator.registry import Release
from edgefleet.infra.link import MessageProps, MqttConfig
from edgefleet.protocol.device import DevicePublic
from edgefleet.protocol.keys import KemPrivateKey, SigningKey, generate_kem_key

T0 = 1_700_000_000  # unix seconds: when the keys were made and releases built
META = {"input": {"name": "x", "dtype": "float32", "shape": [None, 4]},
        "output": {"name": "y", "dtype": "float32", "shape": [None, 2]},
        "smoke": [], "feature_stats": {}}
DEVICES = ("dev-a", "dev-b", "dev-c")
SEGMENT = 1024  # bytes: each model is a few segments


@dataclass
class Home:
    coordinator: Coordinator
    kem_private: dict[str, KemPrivateKey]  # device id -> its KEM private key

    def build(self, version: str = "1", selector: str = "all") -> Release:
        release, _ = self.coordinator.build("m", version, selector, now=T0)
        return release


def make_home(tmp: Path, devices: tuple[str, ...] = DEVICES, database: str = "") -> Home:
    coord = Coordinator.init(tmp / "coordinator", database=database, now=T0)
    coord.update_config(segment_size=SEGMENT)
    for version, content in (("1", b"model one" * 400), ("2", b"model two" * 400)):
        path = tmp / f"m{version}.onnx"
        path.write_bytes(content)
        path.with_suffix(".json").write_text(json.dumps(META))
        coord.register_model("m", path, version=version, check=False)  # opaque bytes
    keys = {}
    for dev in devices:
        keys[dev] = generate_kem_key("x25519")
        coord.enroll(DevicePublic(device_id=dev, sign_public=SigningKey.generate().public_raw,
                                  kem=keys[dev].public()))
    return Home(coord, keys)


TIMEOUT = 10.0  # s: the longest any wait in these tests may take before it fails


@dataclass(frozen=True, kw_only=True)
class Received:
    topic: str
    payload: bytes
    retain: bool


class Inbox:
    """What one link received, in order; ``wait_for`` blocks on a condition, never sleeps."""

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self._cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes, props: MessageProps) -> None:
        with self._cond:
            self.messages.append(Received(topic=topic, payload=payload, retain=props.retain))
            self._cond.notify_all()

    def on(self, topic: str) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def wait_for(self, count: int, topic: str | None = None) -> list[Received]:
        """The first ``count`` messages (on ``topic``, if given); fails at the timeout."""
        def matching() -> list[Received]:
            return [m for m in self.messages if topic is None or m.topic == topic]

        with self._cond:
            assert self._cond.wait_for(lambda: len(matching()) >= count, TIMEOUT), (
                f"expected {count} messages on {topic or 'any topic'}, saw {self.messages}")
            return matching()[:count]


def mqtt(client_id: str, **changes: object) -> MqttConfig:
    """A config for an in-memory broker link (the URL is ignored)."""
    return MqttConfig(url="mqtt://in-memory.invalid:1883", client_id=client_id,
                      **changes)  # type: ignore[arg-type]
