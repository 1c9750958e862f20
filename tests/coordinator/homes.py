"""A small coordinator home for the application-layer tests: real keys, real crypto, a
registered (tiny, never loaded) model and enrolled devices whose private keys the test keeps.
Self-contained, so these tests need nothing from the agent side."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgefleet.coordinator.home import Coordinator
from edgefleet.coordinator.registry import Release
from edgefleet.protocol.device import DevicePublic
from edgefleet.protocol.keys import KemPrivateKey, SigningKey, generate_kem_key

T0 = 1_700_000_000  # unix seconds: when the keys were made and releases built
META = {"input": {"name": "x", "dtype": "float32", "shape": [None, 4]},
        "output": {"name": "y", "dtype": "float32", "shape": [None, 2]},
        "smoke": [], "feature_stats": {}}
DEVICES = ("dev-a", "dev-b", "dev-c")


@dataclass
class Home:
    coordinator: Coordinator
    kem_private: dict[str, KemPrivateKey]  # device id -> its KEM private key

    def build(self, version: str = "1", selector: str = "all") -> Release:
        release, _ = self.coordinator.build("m", version, selector, now=T0)
        return release


def make_home(tmp: Path, devices: tuple[str, ...] = DEVICES) -> Home:
    coord = Coordinator.init(tmp / "coordinator", now=T0)
    for version, content in (("1", b"model one" * 100), ("2", b"model two" * 100)):
        path = tmp / f"m{version}.onnx"
        path.write_bytes(content)
        path.with_suffix(".json").write_text(json.dumps(META))
        coord.register_model("m", path, version=version)
    keys = {}
    for dev in devices:
        keys[dev] = generate_kem_key("x25519")
        coord.enroll(DevicePublic(device_id=dev, sign_public=SigningKey.generate().public_raw,
                                  kem=keys[dev].public()))
    return Home(coord, keys)
