"""The agent's trusted state (pinned root, keyring rotation), identity and configuration."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.identity import DeviceIdentity
from edgefleet.agent.trust import TrustStore
from edgefleet.protocol.device import DevicePublic
from edgefleet.protocol.errors import DecodeError, KeyringError, StoreError, UntrustedSignerError
from edgefleet.protocol.keyring import KeyEntry, Keyring, Signature
from edgefleet.protocol.keys import KEM_HYBRID, KEM_X25519, SigningKey

T0 = 1_700_000_000


@dataclass
class Root:
    key: SigningKey

    def keyring(self, version: int, *, expires: int = T0 + 1000,
                release: SigningKey | None = None) -> tuple[bytes, bytes]:
        rel = release or SigningKey.generate()
        kr = Keyring(version=version, expires=expires, root_keyid=self.key.keyid,
                     keys=(KeyEntry(keyid=rel.keyid, public=rel.public_raw, expires=expires),))
        raw = kr.encode()
        return raw, Signature(keyid=self.key.keyid, sig=self.key.sign(raw)).encode()


@pytest.fixture
def root() -> Root:
    return Root(SigningKey.generate())


@pytest.fixture
def trust(tmp_path: Path, root: Root) -> TrustStore:
    return TrustStore.pin(tmp_path / "trust", root.key.public_raw)


def stored(trust: TrustStore) -> bytes:
    return (trust.dir / TrustStore.KEYRING).read_bytes()


def test_pin_then_reopen(trust: TrustStore, root: Root) -> None:
    assert trust.root_public == root.key.public_raw and trust.keyring is None
    assert TrustStore(trust.dir).root_public == root.key.public_raw


def test_missing_root_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no pinned root key"):
        TrustStore(tmp_path)


def test_newer_keyring_is_adopted_and_persisted(trust: TrustStore, root: Root) -> None:
    assert trust.accept(*root.keyring(1), now=T0).version == 1
    assert TrustStore(trust.dir).keyring == trust.keyring
    v2 = root.keyring(2)
    assert trust.accept(*v2, now=T0).version == 2
    reopened = TrustStore(trust.dir)
    assert reopened.keyring is not None and reopened.keyring.version == 2
    assert json.loads(stored(trust))["keyring"]  # the bytes as signed, with their signature


def test_older_genuine_keyring_is_ignored(trust: TrustStore, root: Root) -> None:
    trust.accept(*root.keyring(3), now=T0)
    before = stored(trust)
    kept = trust.accept(*root.keyring(2), now=T0)
    assert kept.version == 3 and trust.keyring == kept
    assert stored(trust) == before


def test_same_version_with_other_content_is_rejected(trust: TrustStore, root: Root) -> None:
    raw, sig = root.keyring(2)
    trust.accept(raw, sig, now=T0)
    assert trust.accept(raw, sig, now=T0).version == 2  # the same keyring again is fine
    before = stored(trust)
    with pytest.raises(KeyringError, match="differs"):
        trust.accept(*root.keyring(2), now=T0)
    assert stored(trust) == before


@pytest.mark.parametrize(("case", "error"), [
    ("expired", KeyringError),
    ("bad-signature", KeyringError),
    ("other-signer", UntrustedSignerError),
    ("garbage-signature", DecodeError),
])
def test_bad_keyring_is_rejected_and_not_persisted(trust: TrustStore, root: Root, case: str,
                                                   error: type[Exception]) -> None:
    raw, sig = root.keyring(1, expires=T0) if case == "expired" else root.keyring(1)
    if case == "bad-signature":
        raw = raw.replace(b'"version":1', b'"version":9')
    elif case == "other-signer":
        other = SigningKey.generate()
        sig = Signature(keyid=other.keyid, sig=other.sign(raw)).encode()
    elif case == "garbage-signature":
        sig = b"{}"
    with pytest.raises(error):
        trust.accept(raw, sig, now=T0)
    assert trust.keyring is None and not (trust.dir / TrustStore.KEYRING).exists()


@pytest.mark.parametrize("kem", [KEM_X25519, KEM_HYBRID])
def test_identity_round_trip(tmp_path: Path, kem: str) -> None:
    ident = DeviceIdentity.create(tmp_path / "keys", "dev-1", kem=kem)
    assert (tmp_path / "keys" / "device.json").stat().st_mode & 0o777 == 0o600
    loaded = DeviceIdentity.load(tmp_path / "keys")
    assert loaded.device_id == "dev-1" and loaded.kem == ident.kem
    assert loaded.signing.raw() == ident.signing.raw()
    public = DevicePublic.decode((tmp_path / "keys" / "device.pub.json").read_bytes())
    assert public == ident.public() and public.kem.kem == kem
    assert b"kem_private" not in (tmp_path / "keys" / "device.pub.json").read_bytes()


@pytest.mark.parametrize("bad", ["", "-dev", "dev/1", "d" * 65, "dév"])
def test_identity_rejects_bad_device_ids(tmp_path: Path, bad: str) -> None:
    with pytest.raises(DecodeError):
        DeviceIdentity.create(tmp_path / "keys", bad)


def test_config_round_trip_and_overrides(tmp_path: Path) -> None:
    cfg = AgentConfig(home=tmp_path, device_id="dev-1", keep=3, broker="mqtt://h:1883")
    (tmp_path / "agent.toml").write_text(cfg.to_toml())
    assert AgentConfig.load(tmp_path) == cfg
    assert AgentConfig.load(tmp_path, keep=5, threads=None).keep == 5


@pytest.mark.parametrize(("toml", "error", "match"), [
    ('device_id = "d"\nbogus = 1\n', ValueError, "unknown settings"),
    ('device_id = "d"\nkeep = 0\n', ValueError, "keep"),
    ('device_id = "d"\nmqtt_protocol = 4\n', ValueError, "mqtt_protocol"),
    ("keep = 2\n", TypeError, "device_id"),
])
def test_bad_config(tmp_path: Path, toml: str, error: type[Exception], match: str) -> None:
    (tmp_path / "agent.toml").write_text(toml)
    with pytest.raises(error, match=match):
        AgentConfig.load(tmp_path)


def test_missing_config_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="agent init"):
        AgentConfig.load(tmp_path)
