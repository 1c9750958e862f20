"""The coordinator: keys and keyring, registry, blobs, config, and building releases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from edgefleet.coordinator.blobs import BlobStore
from edgefleet.coordinator.config import CoordinatorConfig
from edgefleet.coordinator.home import Coordinator
from edgefleet.coordinator.keys import CoordinatorKeys
from edgefleet.protocol.container import HEADER_SIZE, decode_envelopes, parse_header
from edgefleet.protocol.device import DevicePublic
from edgefleet.protocol.envelope import Envelope, unwrap_key
from edgefleet.protocol.errors import DecodeError, KeyExpiredError
from edgefleet.protocol.keys import KEM_HYBRID, SigningKey, decode_public_key, generate_kem_key
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.verify import check_envelopes, verify_keyring, verify_manifest

from tests.conftest import T0, Digits

META = {"input": {"name": "x", "dtype": "float32", "shape": [None, 4]},
        "output": {"name": "y", "dtype": "float32", "shape": [None, 2]},
        "smoke": {"x": [[0.0, 0.1, 0.2, 0.3]], "probabilities": [[0.25, 0.75]], "atol": 0.001},
        "feature_stats": {"mean": [0.5] * 4}, "accuracy": 0.9}


def model_file(tmp: Path, name: str = "m.onnx", meta: dict[str, Any] | None = None,
               content: bytes = b"model") -> Path:
    """Opaque bytes that no runtime loads: registered with ``check=False``."""
    path = tmp / name
    path.write_bytes(content)
    path.with_suffix(".json").write_text(json.dumps(META if meta is None else meta))
    return path


def device(device_id: str, kem: str = "x25519") -> tuple[DevicePublic, Any]:
    private = generate_kem_key(kem)
    return DevicePublic(device_id=device_id, sign_public=SigningKey.generate().public_raw,
                        kem=private.public()), private


@pytest.fixture
def coord(tmp_path: Path) -> Coordinator:
    return Coordinator.init(tmp_path / "home", now=T0)


def test_init_makes_keys_and_a_root_signed_keyring(coord: Coordinator) -> None:
    home = coord.home
    root = decode_public_key((home / "root.pub").read_bytes())
    keyring = verify_keyring(root, coord.keys.keyring_raw, coord.keys.keyring_sig, now=T0,
                             current=None)
    assert keyring.version == 1 and [k.keyid for k in keyring.keys] == [coord.keys.release.keyid]
    for secret in ("root.json", f"release-{coord.keys.release.keyid}.json"):
        assert (home / "keys" / secret).stat().st_mode & 0o777 == 0o600
    assert CoordinatorConfig.load(home) == coord.config
    with pytest.raises(FileExistsError):
        Coordinator.init(home, now=T0)


def test_open_a_directory_that_is_not_a_home(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="coordinator init"):
        Coordinator.open(tmp_path)


def test_rotation_revokes_the_old_release_key(coord: Coordinator) -> None:
    root = decode_public_key((coord.home / "root.pub").read_bytes())
    old = coord.keys
    new = old.rotate(now=T0 + 10)
    assert new.keyring.version == 2 and new.release.keyid != old.release.keyid
    assert [k.keyid for k in new.keyring.keys] == [new.release.keyid]
    reloaded = CoordinatorKeys.load(coord.home)
    assert reloaded.keyring_raw == new.keyring_raw
    assert reloaded.release.keyid == new.release.keyid
    trusted = verify_keyring(root, old.keyring_raw, old.keyring_sig, now=T0 + 20, current=None)
    assert verify_keyring(root, new.keyring_raw, new.keyring_sig, now=T0 + 20,
                          current=trusted).version == 2


def test_rotation_is_crash_safe_and_drops_the_old_private_key(
    coord: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = coord.keys
    keys_dir = coord.home / "keys"

    def crash(*_: Any, **__: Any) -> None:
        raise OSError("power cut")

    # Crash after the new key file, before the keyring switch: the old pair still signs.
    monkeypatch.setattr(CoordinatorKeys, "_save_keyring", staticmethod(crash))
    with pytest.raises(OSError, match="power cut"):
        old.rotate(now=T0 + 10)
    monkeypatch.undo()
    survived = CoordinatorKeys.load(coord.home)
    assert survived.release.keyid == old.release.keyid and survived.keyring.version == 1
    new = survived.rotate(now=T0 + 20)
    assert CoordinatorKeys.load(coord.home).release.keyid == new.release.keyid
    assert not (keys_dir / f"release-{old.release.keyid}.json").exists()


def test_build_refuses_an_expired_keyring(coord: Coordinator, tmp_path: Path) -> None:
    coord.register_model("m", model_file(tmp_path), check=False)
    coord.enroll(device("dev-a")[0])
    expires = coord.keys.keyring.expires
    with pytest.raises(KeyExpiredError, match="expired"):
        coord.build("m", "1", "all", now=expires + 1)


def test_register_model_reads_the_sidecar_metadata(coord: Coordinator, tmp_path: Path) -> None:
    mv = coord.register_model("m", model_file(tmp_path), check=False)
    assert (mv.version, mv.format, mv.size) == ("1", "onnx", 5)
    assert mv.meta["inputs"] == [META["input"]] and mv.meta["outputs"] == [META["output"]]
    assert mv.meta["smoke"] == [{"input": [[0.0, 0.1, 0.2, 0.3]], "expected": [[0.25, 0.75]],
                                 "atol": 0.001}]
    assert mv.metrics == {"accuracy": 0.9} and coord.blobs.get(mv.blob) == b"model"
    v2 = model_file(tmp_path, content=b"v2")
    assert coord.register_model("m", v2, check=False).version == "2"
    assert [m.version for m in coord.registry.models()] == ["1", "2"]


@pytest.mark.parametrize(("name", "meta", "version", "error", "match"), [
    ("m.pt", META, None, ValueError, "onnx or .tflite"),
    ("m.onnx", {"output": META["output"]}, None, ValueError, "inputs"),
    ("m.onnx", {**META, "input": {"name": "x", "dtype": "complex", "shape": [1]}}, None,
     DecodeError, "dtype"),
    ("m.onnx", META, "1", ValueError, "already registered"),
])
def test_register_model_rejects(coord: Coordinator, tmp_path: Path, name: str,
                                meta: dict[str, Any], version: str | None,
                                error: type[Exception], match: str) -> None:
    coord.register_model("m", model_file(tmp_path, "first.onnx"), version="1", check=False)
    with pytest.raises(error, match=match):
        coord.register_model("m", model_file(tmp_path, name, meta), version=version, check=False)


def test_enroll_groups_and_selectors(coord: Coordinator) -> None:
    a, _ = device("dev-a")
    b, _ = device("dev-b", KEM_HYBRID)
    c, _ = device("dev-c")
    for d in (a, b, c):
        coord.enroll(d)
    coord.enroll(a)  # same keys again: idempotent
    with pytest.raises(ValueError, match="other keys"):
        coord.enroll(device("dev-a")[0])
    coord.registry.add_to_group("lab", ["dev-a", "dev-b"])
    reg = coord.registry
    assert reg.groups() == {"lab": ["dev-a", "dev-b"]}
    assert reg.resolve("all") == ["dev-a", "dev-b", "dev-c"]
    assert reg.resolve("group:lab") == ["dev-a", "dev-b"]
    assert reg.resolve("dev-c,dev-a") == ["dev-a", "dev-c"]
    assert reg.resolve("device:dev-b") == ["dev-b"]
    assert reg.update_device("dev-a", revoked=True)
    assert reg.resolve("group:lab") == ["dev-b"]  # revoked devices get no releases
    for selector in ("group:nope", "dev-x", "dev-a,dev-x"):
        with pytest.raises(LookupError):
            reg.resolve(selector)
    with pytest.raises(LookupError):
        reg.add_to_group("lab", ["dev-x"])


def test_build_signs_and_encrypts_for_the_selected_devices(coord: Coordinator,
                                                           tmp_path: Path) -> None:
    coord.register_model("m", model_file(tmp_path, content=b"w" * 3000), check=False)
    devices = {d: device(d, kem) for d, kem in (("dev-a", "x25519"), ("dev-b", KEM_HYBRID))}
    for public, _ in devices.values():
        coord.enroll(public)
    first, _ = coord.build("m", "1", "dev-a", now=T0)
    release, built = coord.build("m", "1", "all", now=T0 + 5, ttl=100)
    assert (first.sequence, release.sequence) == (1, 2)  # monotonic, never reused
    m = built.manifest
    assert (m.created, m.expires, m.plaintext_size) == (T0 + 5, T0 + 105, 3000)
    assert m.segment_size == coord.config.segment_size and set(m.targets) == set(devices)
    assert m.lineage["model_id"] == 1 and m.lineage["metrics"] == {"accuracy": 0.9}
    assert m.smoke[0].expected == ((0.25, 0.75),)
    stored = coord.registry.release(sequence=2)
    assert stored is not None and stored.manifest == built.manifest_raw
    assert stored.content_key == built.content_key
    assert coord.blobs.get(stored.payload_blob) == built.payload
    assert sorted(t.device_id for t in stored.targets) == ["dev-a", "dev-b"]
    assert [r.sequence for r in coord.registry.releases()] == [1, 2]

    out = tmp_path / "r.efb"
    coord.write_bundle(built, out)
    data = out.read_bytes()
    layout = parse_header(data[:HEADER_SIZE], file_size=len(data), max_payload=1 << 30)
    part = {n: data[o:o + n_] for n, (o, n_) in layout.spans.items()}
    root = decode_public_key((coord.home / "root.pub").read_bytes())
    keyring = verify_keyring(root, part["keyring"], part["keyring_sig"], now=T0 + 10, current=None)
    for dev, (_, private) in devices.items():
        got = verify_manifest(keyring, part["manifest"], part["signature"], now=T0 + 10,
                              device_id=dev, highest_sequence=1)
        assert got == m
        envs = decode_envelopes(part["envelopes"])
        check_envelopes(got, envs)
        env = next(e for e in envs if e.device_id == dev)
        assert unwrap_key(env, private, bundle_id=m.bundle_id) == built.content_key
        assert Envelope.from_dict(json.loads(next(
            t.envelope for t in stored.targets if t.device_id == dev))) == env


@pytest.mark.parametrize(("name", "version", "selector", "match"), [
    ("m", "9", "all", "not registered"),
    ("m", "1", "dev-x", "not enrolled"),
    ("m", "1", "all", "matches no enrolled device"),
])
def test_build_rejects(coord: Coordinator, tmp_path: Path, name: str, version: str,
                       selector: str, match: str) -> None:
    coord.register_model("m", model_file(tmp_path), check=False)
    with pytest.raises(LookupError, match=match):
        coord.build(name, version, selector, now=T0)


def test_register_and_build_the_real_digits_model(coord: Coordinator, digits_v1: Digits) -> None:
    coord.enroll(device("dev-a")[0])
    for path in (digits_v1.onnx, digits_v1.tflite):
        coord.register_model("digits", path, version=path.suffix[1:])
    _, built = coord.build("digits", "tflite", "all", now=T0)
    m = Manifest.decode(built.manifest_raw)
    assert m.format == "tflite" and m.plaintext_size == digits_v1.tflite.stat().st_size
    assert len(m.smoke) == 3 and m.inputs[0].shape == (None, 64)
    assert m.reference_stats["mean"] == digits_v1.meta["feature_stats"]["mean"]


def test_blobs(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    digest = blobs.put(b"hello")
    assert blobs.put(b"hello") == digest and blobs.get(digest) == b"hello"
    blobs.path(digest).write_bytes(b"jello")
    with pytest.raises(OSError, match="corrupt"):
        blobs.get(digest)
    for bad in ("../../etc/passwd", "AB" * 32, digest[:-1]):
        with pytest.raises(ValueError):
            blobs.path(bad)


def test_config(tmp_path: Path) -> None:
    cfg = CoordinatorConfig(home=tmp_path, segment_size=4096, database="sqlite:///x.db")
    (tmp_path / "coordinator.toml").write_text(cfg.to_toml())
    assert CoordinatorConfig.load(tmp_path) == cfg
    assert CoordinatorConfig.load(tmp_path, segment_size=1024).segment_size == 1024
    assert CoordinatorConfig(home=tmp_path).database_url == f"sqlite:///{tmp_path / 'registry.db'}"
    (tmp_path / "coordinator.toml").write_text("bogus = 1\n")
    with pytest.raises(ValueError, match="unknown settings"):
        CoordinatorConfig.load(tmp_path)


def test_a_device_cannot_take_the_coordinators_broker_name(coord: Coordinator) -> None:
    with pytest.raises(ValueError, match="broker username"):
        coord.enroll(device(coord.config.username)[0])


def test_broker_config_points_the_coordinator_at_its_broker(coord: Coordinator,
                                                            tmp_path: Path) -> None:
    from edgefleet.coordinator.brokerconf import write_broker_config

    files = write_broker_config(coord, tmp_path / "broker", port=18999, bind="0.0.0.0")
    reloaded = CoordinatorConfig.load(coord.home)
    assert reloaded.broker == "mqtt://127.0.0.1:18999"
    assert Path(reloaded.password_file).read_text() == files.users[coord.config.username]
    coord.update_config(broker="mqtt://elsewhere:1883")
    write_broker_config(coord, tmp_path / "broker", port=18998)
    assert CoordinatorConfig.load(coord.home).broker == "mqtt://elsewhere:1883"  # never overridden
