"""Coordinator keys read back from disk: re-verified, and one clear error per broken file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from edgefleet.coordinator.config import CoordinatorConfig
from edgefleet.coordinator.keys import CoordinatorKeys, sign_keyring
from edgefleet.protocol.canonical import b64d, b64e, canonical_json
from edgefleet.protocol.errors import (
    BundleError,
    ConfigError,
    CorruptStateError,
    DecodeError,
    KeyExpiredError,
    KeyringError,
    StoreError,
    UntrustedSignerError,
)
from edgefleet.protocol.keyring import KeyEntry, Keyring
from edgefleet.protocol.keys import SigningKey, encode_public_key

T0 = 1_700_000_000
Mutate = Callable[[Path, CoordinatorKeys], object]


@pytest.fixture
def keys(tmp_path: Path) -> CoordinatorKeys:
    return CoordinatorKeys.create(tmp_path / "home", now=T0)


def release_file(home: Path, keys: CoordinatorKeys) -> Path:
    return home / "keys" / f"release-{keys.release.keyid}.json"


def edit_keyring_file(change: Callable[[dict[str, str]], None]) -> Mutate:
    def mutate(home: Path, keys: CoordinatorKeys) -> None:
        d = json.loads((home / "keyring.json").read_bytes())
        change(d)
        (home / "keyring.json").write_bytes(canonical_json(d))
    return mutate


def flip_signature(d: dict[str, str]) -> None:
    sig = json.loads(b64d(d["signature"], what="test"))
    raw = bytearray(b64d(sig["sig"], what="test"))
    raw[0] ^= 1
    sig["sig"] = b64e(bytes(raw))
    d["signature"] = b64e(canonical_json(sig))


def resign_with_another_root(home: Path, keys: CoordinatorKeys) -> None:
    raw, sig = sign_keyring(SigningKey.generate(), keys.keyring)
    (home / "keyring.json").write_bytes(canonical_json({"keyring": b64e(raw),
                                                        "signature": b64e(sig)}))


def another_root_pub(home: Path, keys: CoordinatorKeys) -> None:
    (home / "root.pub").write_bytes(encode_public_key(SigningKey.generate().public_raw))


def truncate(path: Callable[[Path, CoordinatorKeys], Path]) -> Mutate:
    def mutate(home: Path, keys: CoordinatorKeys) -> None:
        p = path(home, keys)
        p.write_bytes(p.read_bytes()[:25])
    return mutate


def rewrite_key(**changes: str) -> Mutate:
    def mutate(home: Path, keys: CoordinatorKeys) -> None:
        p = release_file(home, keys)
        d = json.loads(p.read_bytes())
        d.update(changes)
        p.write_bytes(canonical_json(d))
    return mutate


def other_seed(home: Path, keys: CoordinatorKeys) -> None:
    rewrite_key(seed=b64e(SigningKey.generate().raw()))(home, keys)


def other_key_same_name(home: Path, keys: CoordinatorKeys) -> None:
    other = SigningKey.generate()
    rewrite_key(seed=b64e(other.raw()), keyid=other.keyid)(home, keys)


KEYRING = lambda h, k: h / "keyring.json"  # noqa: E731
ROOT_PUB = lambda h, k: h / "root.pub"  # noqa: E731

# (case, what happens on disk, the error, its cause (None: none), message fragment)
LOAD_CASES: list[tuple[str, Mutate, type[Exception], type[Exception] | None, str]] = [
    ("keyring-missing", lambda h, k: (h / "keyring.json").unlink(), StoreError,
     FileNotFoundError, "keyring.json: cannot read the keyring: No such file"),
    ("keyring-truncated", truncate(KEYRING), CorruptStateError, DecodeError,
     "keyring.json: not a keyring file"),
    ("keyring-empty", lambda h, k: (h / "keyring.json").write_bytes(b""), CorruptStateError,
     DecodeError, "invalid JSON"),
    ("keyring-no-signature", edit_keyring_file(lambda d: d.pop("signature")), CorruptStateError,
     DecodeError, "missing field 'signature'"),
    ("keyring-signature-tampered", edit_keyring_file(flip_signature), CorruptStateError,
     KeyringError, "does not verify against"),
    ("keyring-bytes-tampered", edit_keyring_file(
        lambda d: d.update(keyring=b64e(b64d(d["keyring"], what="t").replace(
            b'"version":1', b'"version":2')))), CorruptStateError, KeyringError, "signature"),
    ("keyring-signed-by-another-root", resign_with_another_root, CorruptStateError,
     UntrustedSignerError, "expected root key"),
    ("root-pub-missing", lambda h, k: (h / "root.pub").unlink(), StoreError, FileNotFoundError,
     "root.pub: cannot read the root public key: No such file"),
    ("root-pub-truncated", truncate(ROOT_PUB), CorruptStateError, DecodeError,
     "not a public key file"),
    ("root-pub-of-another-root", another_root_pub, CorruptStateError, UntrustedSignerError,
     "does not verify against"),
    ("release-key-missing", lambda h, k: release_file(h, k).unlink(), ConfigError, None,
     "no private key for any release key in keyring v1"),
    ("release-key-a-directory", lambda h, k: (release_file(h, k).unlink(),
                                              release_file(h, k).mkdir()),
     StoreError, IsADirectoryError, "Is a directory"),
    ("release-key-truncated", truncate(release_file), CorruptStateError, DecodeError,
     "not a signing key file"),
    ("release-key-short-seed", rewrite_key(seed=b64e(b"s" * 31)), CorruptStateError, ValueError,
     "32 bytes"),
    ("release-key-other-seed", other_seed, CorruptStateError, None, "holds key"),
    ("release-key-other-key-same-name", other_key_same_name, CorruptStateError, None,
     "does not hold the key keyring.json names"),
]


@pytest.mark.parametrize(("case", "mutate", "error", "cause", "match"), LOAD_CASES,
                         ids=[c[0] for c in LOAD_CASES])
def test_broken_key_files_give_one_clear_error(
    keys: CoordinatorKeys, case: str, mutate: Mutate, error: type[Exception],
    cause: type[Exception] | None, match: str,
) -> None:
    mutate(keys.home, keys)
    with pytest.raises(error) as info:
        CoordinatorKeys.load(keys.home)
    assert type(info.value) is error
    assert type(info.value.__cause__) is cause if cause else info.value.__cause__ is None
    assert match in str(info.value) and str(keys.home) in str(info.value)
    assert not isinstance(info.value, BundleError)  # our own files: never "the sender's fault"


def test_intact_keys_load_as_they_were_made(keys: CoordinatorKeys) -> None:
    loaded = CoordinatorKeys.load(keys.home)
    assert (loaded.release.raw(), loaded.keyring_raw, loaded.keyring_sig) == (
        keys.release.raw(), keys.keyring_raw, keys.keyring_sig)


@pytest.mark.parametrize(("case", "mutate", "error", "match"), [
    ("missing", lambda p: p.unlink(), ConfigError, "moved offline"),
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:25]), CorruptStateError,
     "not a signing key file"),
])
def test_rotation_without_a_usable_root_key(
    keys: CoordinatorKeys, case: str, mutate: Callable[[Path], object], error: type[Exception],
    match: str,
) -> None:
    mutate(keys.home / "keys" / "root.json")
    with pytest.raises(error, match=match) as info:
        keys.rotate(now=T0 + 1)
    assert type(info.value) is error
    assert CoordinatorKeys.load(keys.home).keyring_raw == keys.keyring_raw  # nothing changed


def test_expired_own_keyring_is_the_operators_error_and_can_still_be_rotated(
    keys: CoordinatorKeys,
) -> None:
    expires = keys.keyring.expires
    keys.check(now=expires - 1, ttl=0)
    with pytest.raises(KeyExpiredError, match="keyring v1 expired.*rotate-key") as info:
        keys.check(now=expires, ttl=0)
    assert isinstance(info.value, ConfigError) and not isinstance(info.value, BundleError)
    rotated = CoordinatorKeys.load(keys.home).rotate(now=expires + 1)  # loads, then rotates
    rotated.check(now=expires + 1, ttl=0)


def test_expired_own_release_key_is_the_operators_error(keys: CoordinatorKeys) -> None:
    root_key = SigningKey.from_raw(b64d(json.loads(
        (keys.home / "keys" / "root.json").read_bytes())["seed"], what="root"))
    keyring = Keyring(version=2, expires=T0 + 1000, root_keyid=root_key.keyid, keys=(
        KeyEntry(keyid=keys.release.keyid, public=keys.release.public_raw, expires=T0 + 10),))
    raw, sig = sign_keyring(root_key, keyring)
    short = CoordinatorKeys(keys.home, keys.release, raw, sig)
    short.check(now=T0 + 9, ttl=0)
    with pytest.raises(KeyExpiredError, match=f"release key {keys.release.keyid} expired"):
        short.check(now=T0 + 10, ttl=0)


def test_a_release_key_the_keyring_does_not_name_is_a_config_error(
    keys: CoordinatorKeys,
) -> None:
    stray = CoordinatorKeys(keys.home, SigningKey.generate(), keys.keyring_raw, keys.keyring_sig)
    with pytest.raises(ConfigError, match="not in keyring v1") as info:
        stray.check(now=T0, ttl=0)
    assert type(info.value) is ConfigError


def test_unreadable_coordinator_config_is_a_store_error(tmp_path: Path) -> None:
    assert CoordinatorConfig.load(tmp_path) == CoordinatorConfig(home=tmp_path)  # none: defaults
    (tmp_path / "coordinator.toml").mkdir()
    with pytest.raises(StoreError, match="coordinator.toml: cannot read the config: Is a dir"):
        CoordinatorConfig.load(tmp_path)
