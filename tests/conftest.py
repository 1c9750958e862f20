"""Shared fixtures: the digits reference models, trained once, and a small fleet.

``digits_v1`` / ``digits_v2`` train the reference MLP once per session through
``models.digits.write_digits_artifacts`` (plus the same fit in memory, for scikit-learn's own
probabilities). ``fleet`` is a coordinator home with two enrolled devices and a set of
``.efb`` bundles built at the fixed time ``T0`` with 1 KiB segments; tests get agent homes
from it by copying cached templates, so every test starts from the same disk state.
Clocks are injected (``NOW``); nothing sleeps.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.identity import DeviceIdentity
from edgefleet.agent.provision import provision
from edgefleet.coordinator.home import Coordinator
from edgefleet.models.digits import load_digits_split, train_digits, write_digits_artifacts
from edgefleet.protocol.build import ReleaseSpec, build_release
from edgefleet.protocol.canonical import b64d
from edgefleet.protocol.keys import KEM_HYBRID, KEM_X25519, SigningKey
from edgefleet.protocol.manifest import SmokeVector, TensorSpec
from edgefleet.simulations.homes import ModelFile, provision_fleet
from sklearn.neural_network import MLPClassifier

from tests.databases import db_url, pg_url  # noqa: F401  (fixtures: SQLite and PostgreSQL)

T0 = 1_700_000_000  # unix seconds: when the fixture coordinator made its keys and releases
NOW = T0 + 60  # the agents' clock
SEGMENT = 1024  # bytes of plaintext per segment: a ~40 KB model gives ~40 segments
DEVICES = {"dev-a": KEM_X25519, "dev-b": KEM_HYBRID}


@dataclass(frozen=True)
class Digits:
    """One trained digits model: its artifact files and the scikit-learn model behind them."""

    dir: Path
    onnx: Path
    tflite: Path
    meta_path: Path
    test_path: Path
    accuracy: float
    clf: MLPClassifier

    @property
    def meta(self) -> dict[str, Any]:
        return dict(json.loads(self.meta_path.read_text()))

    def proba(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.clf.predict_proba(x), dtype=np.float64)


def _train(out: Path, seed: int, hidden: int) -> Digits:
    art = write_digits_artifacts(out, seed=seed, hidden=hidden)
    split = load_digits_split(seed)
    clf = train_digits(split, seed=seed, hidden=hidden)
    assert float(clf.score(split.X_test, split.y_test)) == art.accuracy  # same fit, deterministic
    return Digits(out, art.onnx_path, art.tflite_path, art.metadata_path, art.test_path,
                  art.accuracy, clf)


@pytest.fixture(scope="session")
def digits_v1(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    return _train(tmp_path_factory.mktemp("digits-v1"), seed=0, hidden=128)


@pytest.fixture(scope="session")
def digits_v2(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    return _train(tmp_path_factory.mktemp("digits-v2"), seed=1, hidden=128)


@pytest.fixture(scope="session")
def x_test(digits_v1: Digits) -> np.ndarray:
    """The held-out digits split (v1's), float32 [450, 64]."""
    with np.load(digits_v1.test_path) as npz:
        return np.asarray(npz["x"])


def make_agent_home(home: Path, device_id: str, root_public: bytes, *,
                    kem: str = KEM_X25519, **config: Any) -> DeviceIdentity:
    """What ``edgefleet agent init`` does: device keys, pinned root key, agent.toml."""
    return provision(home, device_id, root_public, kem=kem, **config)


def open_agent(home: Path, *, now: float = NOW, checkpoint: Callable[[str], None] | None = None,
               **overrides: Any) -> Agent:
    return Agent(AgentConfig.load(home, **overrides), clock=lambda: now, checkpoint=checkpoint)


@dataclass
class Fleet:
    """A coordinator, its enrolled devices and the bundles it built (all at ``T0``).

    Bundles (sequence, model, targets):
        old    1  digits v2 ONNX     dev-a           (an older release, for replay)
        v1     2  digits v1 ONNX     dev-a, dev-b    (the baseline every tamper test starts on)
        v2     3  digits v2 ONNX     dev-a, dev-b    (the update the tamper corpus corrupts)
        other  4  digits v2 ONNX     dev-b           (not for dev-a)
        v3     5  digits v1 TFLite   dev-a, dev-b    (a third version: prune path, parity)
    """

    coordinator: Coordinator
    root_public: bytes
    identities: dict[str, DeviceIdentity]
    bundles: dict[str, Path]
    models: dict[str, Digits]  # bundle name -> the model inside
    work: Path
    _templates: dict[tuple[str, tuple[str, ...]], Path] = field(default_factory=dict)

    @property
    def release_key(self) -> SigningKey:
        return self.coordinator.keys.release

    def root_key(self) -> SigningKey:
        d = json.loads((self.coordinator.home / "keys" / "root.json").read_bytes())
        return SigningKey.from_raw(b64d(d["seed"], what="root seed"))

    def bundle_bytes(self, name: str) -> bytes:
        return self.bundles[name].read_bytes()

    def expected(self, bundle: str, x: np.ndarray) -> np.ndarray:
        return self.models[bundle].proba(x)

    def agent_home(self, dest: Path, device: str = "dev-a", installed: Sequence[str] = ()) -> Path:
        """A copy of ``device``'s home after installing ``installed`` bundles, in order."""
        key = (device, tuple(installed))
        template = self._templates.get(key)
        if template is None:
            template = self.work / f"{device}-{'-'.join(installed) or 'empty'}"
            if installed:
                self.agent_home(template, device, installed[:-1])
                agent = open_agent(template)
                agent.install_file(self.bundles[installed[-1]])
                agent.close()
            else:
                shutil.copytree(self.work / device, template)
            self._templates[key] = template
        if dest != template:
            shutil.copytree(template, dest)
        return dest

    def release(self, model: bytes, *, sequence: int, fmt: str = "onnx",
                smoke: Sequence[SmokeVector] | None = None, release_key: SigningKey | None = None,
                recipients: Sequence[str] = ("dev-a",), keyring: tuple[bytes, bytes] | None = None,
                lineage: Mapping[str, Any] | None = None, created: int = T0) -> bytes:
        """A validly built ``.efb`` of arbitrary model bytes (signed by the release key)."""
        meta = self.models["v1"].meta
        spec = ReleaseSpec(
            name="digits", format=fmt, model_version=f"crafted-{sequence}", sequence=sequence,
            inputs=(TensorSpec.from_dict(meta["input"]),),
            outputs=(TensorSpec.from_dict(meta["output"]),), created=created,
            segment_size=SEGMENT, smoke=tuple(smoke or ()), lineage=dict(lineage or {}))
        built = build_release(model, spec, release_key=release_key or self.release_key,
                              recipients={d: self.identities[d].public().kem for d in recipients})
        keys = self.coordinator.keys
        kr, kr_sig = keyring or (keys.keyring_raw, keys.keyring_sig)
        return built.to_file_bytes(kr, kr_sig)


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, digits_v1: Digits, digits_v2: Digits) -> Fleet:
    work = tmp_path_factory.mktemp("fleet")
    homes = provision_fleet(
        work,
        DEVICES,
        models=[
            ModelFile(name="digits", path=digits_v1.onnx, version="1"),
            ModelFile(name="digits", path=digits_v2.onnx, version="2"),
            ModelFile(name="digits", path=digits_v1.tflite, version="1-tflite"),
        ],
        segment_size=SEGMENT,
        now=T0,
    )
    coord = homes.coordinator
    assert coord.config.segment_size == SEGMENT
    plan = [("old", "2", "dev-a"), ("v1", "1", "dev-a,dev-b"), ("v2", "2", "dev-a,dev-b"),
            ("other", "2", "dev-b"), ("v3", "1-tflite", "dev-a,dev-b")]
    bundles = {}
    for name, version, selector in plan:
        release, built = coord.build("digits", version, selector, now=T0)
        assert built.manifest.segment_size == SEGMENT
        bundles[name] = work / f"{name}.efb"
        coord.write_bundle(built, bundles[name])
    models = {"old": digits_v2, "v1": digits_v1, "v2": digits_v2, "other": digits_v2,
              "v3": digits_v1}
    return Fleet(coord, homes.root_public, homes.identities, bundles, models, work)
