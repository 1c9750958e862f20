"""Encryption at rest: content keys and model blobs sealed under the operator's storage key.

Real AES-GCM, real files, a real (digits) model: the vault's seal/open and its errors; what is
on disk after a build (no plaintext model, no plaintext content key); a wrong or missing key
(one ConfigError line); rotation, interrupted half-way and re-run; homes from before sealing
(migrated on first open); and a key held in an environment variable (read by the CLI only).
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
from edgefleet.coordinator.home import Coordinator
from edgefleet.coordinator.registry import Release
from edgefleet.coordinator.vault import (
    HEADER_SIZE,
    StorageKey,
    Vault,
    blob_aad,
    content_key_aad,
)
from edgefleet.protocol.device import DevicePublic
from edgefleet.protocol.errors import ConfigError, CorruptStateError
from edgefleet.protocol.keys import SigningKey, generate_kem_key
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.segments import SegmentCipher

from edgefleet.cli import main

from ..conftest import Digits

T0 = 1_700_000_000
AAD = blob_aad("ab" * 32)


# -- the vault ------------------------------------------------------------------------------
def test_seal_open_round_trip_and_fresh_nonces() -> None:
    vault = Vault(StorageKey.generate())
    one, two = vault.seal(b"secret", aad=AAD), vault.seal(b"secret", aad=AAD)
    assert one != two and b"secret" not in one  # random nonce per seal
    assert vault.open(one, aad=AAD, what="x") == vault.open(two, aad=AAD, what="x") == b"secret"
    assert vault.is_current(one) and not Vault(StorageKey.generate()).is_current(one)


def test_an_old_key_still_opens_what_it_sealed_while_the_new_one_seals() -> None:
    old, new = StorageKey.generate(), StorageKey.generate()
    sealed = Vault(old).seal(b"k", aad=AAD)
    both = Vault(new, also=[old])
    assert both.open(sealed, aad=AAD, what="x") == b"k" and not both.is_current(sealed)
    assert both.is_current(both.seal(b"k", aad=AAD))


def _flip(at: int) -> bytes:
    sealed = bytearray(SEALED)
    sealed[at] ^= 0x01
    return bytes(sealed)


KEY = StorageKey.generate()
SEALED = Vault(KEY).seal(b"a content key, 32 bytes long....", aad=AAD)


@pytest.mark.parametrize(("data", "aad", "error", "match"), [
    (_flip(0), AAD, CorruptStateError, "not in sealed form"),  # magic
    (_flip(3), AAD, CorruptStateError, "not in sealed form"),  # format version
    (SEALED[:HEADER_SIZE + 15], AAD, CorruptStateError, "not in sealed form"),  # truncated
    (_flip(5), AAD, ConfigError, "does not open blob"),  # key id: a key we do not hold
    (_flip(HEADER_SIZE - 1), AAD, CorruptStateError, "fails authentication"),  # nonce
    (_flip(HEADER_SIZE), AAD, CorruptStateError, "fails authentication"),  # ciphertext
    (_flip(len(SEALED) - 1), AAD, CorruptStateError, "fails authentication"),  # tag
    (SEALED, blob_aad("cd" * 32), CorruptStateError, "fails authentication"),  # moved
    (SEALED, content_key_aad("ab" * 16, 1), CorruptStateError, "fails authentication"),
], ids=["magic", "version", "truncated", "keyid", "nonce", "ciphertext", "tag", "other-blob",
        "other-kind"])
def test_tampered_sealed_data_is_our_error(data: bytes, aad: bytes, error: type[Exception],
                                           match: str) -> None:
    with pytest.raises(error, match=match) as info:
        Vault(KEY).open(data, aad=aad, what="blob abab…")
    assert type(info.value) is error  # never cryptography's InvalidTag


def test_a_wrong_or_missing_key_is_a_config_error_naming_both_keys() -> None:
    other = StorageKey.generate()
    with pytest.raises(ConfigError, match=rf"storage key {other.keyid} does not open blob abab… "
                                          rf"\(sealed under storage key {KEY.keyid}\)"):
        Vault(other).open(SEALED, aad=AAD, what="blob abab…")
    with pytest.raises(ConfigError, match=r"storage key \(none\) does not open .*: \$K is not set"):
        Vault.unavailable("$K is not set").open(SEALED, aad=AAD, what="blob abab…")
    with pytest.raises(ConfigError, match=r"\$K is not set"):
        Vault.unavailable("$K is not set").seal(b"x", aad=AAD)


@pytest.mark.parametrize(("text", "match"), [
    ("", "not a storage key"),
    ("zz" * 32, "not a storage key"),
    ("ab" * 31, "not a storage key"),  # 31 bytes
    ("ab" * 33, "not a storage key"),  # 33 bytes
], ids=["empty", "not-hex", "short", "long"])
def test_bad_storage_keys_are_refused(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        StorageKey.decode(text, source="$K")


def test_a_key_file_round_trips_and_its_repr_hides_the_key() -> None:
    key = StorageKey.generate()
    assert StorageKey.decode(key.encode(), source="f") == key
    assert key.raw.hex() not in repr(key) and len(key.keyid) == 16


# -- a coordinator home -----------------------------------------------------------------------
def enroll(c: Coordinator, device_id: str = "dev-a") -> None:
    c.enroll(DevicePublic(device_id=device_id, sign_public=SigningKey.generate().public_raw,
                          kem=generate_kem_key("x25519").public()))


@pytest.fixture
def coord(tmp_path: Path, digits_v1: Digits) -> Coordinator:
    c = Coordinator.init(tmp_path / "coordinator", now=int(time.time()))  # the CLI signs "now"
    c.update_config(segment_size=4096)
    c.register_model("digits", digits_v1.onnx, version="1")
    enroll(c)
    return c


def stored_content_key(c: Coordinator, sequence: int) -> bytes:
    with sqlite3.connect(c.home / "registry.db") as db:
        (raw,) = db.execute("SELECT content_key FROM releases WHERE sequence = ?",
                            (sequence,)).fetchone()
    return bytes(raw)


def check_servable(c: Coordinator, release: Release) -> None:
    """What the chunk server sends (the payload blob read by path at each segment's span)
    opens with the release's content key as the registry gives it back."""
    r = c.registry.release(sequence=release.sequence)
    assert r is not None
    m = Manifest.decode(r.manifest)
    cipher = SegmentCipher(r.content_key, bytes.fromhex(m.bundle_id), m.segment_size)
    data = c.blobs.path(r.payload_blob).read_bytes()
    plain = b"".join(
        cipher.open(i, data[off:off + n], final=i == m.segments - 1)
        for i in range(m.segments) for off, n in [m.segment_span(i)]
    )
    assert plain == c.blobs.get(r.model.blob)


def test_nothing_secret_is_plaintext_on_disk(coord: Coordinator, digits_v1: Digits) -> None:
    model = digits_v1.onnx.read_bytes()
    release, built = coord.build("digits", "1", "all", now=T0)
    mv = coord.registry.model("digits", "1")
    on_disk = coord.blobs.path(mv.blob).read_bytes()
    assert model[:4096] not in on_disk and coord.blobs.get(mv.blob) == model
    stored = stored_content_key(coord, release.sequence)
    assert built.content_key not in stored and len(stored) > 32
    assert coord.registry.release(sequence=release.sequence).content_key == built.content_key  # type: ignore[union-attr]
    check_servable(coord, release)


def test_a_content_key_cannot_be_moved_to_another_release(coord: Coordinator) -> None:
    first, _ = coord.build("digits", "1", "all", now=T0)
    second, _ = coord.build("digits", "1", "all", now=T0)
    with sqlite3.connect(coord.home / "registry.db") as db:
        db.execute("UPDATE releases SET content_key = ? WHERE sequence = ?",
                   (stored_content_key(coord, first.sequence), second.sequence))
    r = Coordinator.open(coord.home).registry.release(sequence=second.sequence)
    with pytest.raises(CorruptStateError, match="content key of release 2: fails authentication"):
        _ = r.content_key  # type: ignore[union-attr]


def test_a_wrong_key_is_one_config_error_line(coord: Coordinator, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    mv = coord.registry.model("digits", "1")
    right = StorageKey.decode(coord.config.storage_key_path.read_bytes(), source="f")
    wrong = StorageKey.generate()
    coord.config.storage_key_path.write_bytes(wrong.encode())
    code = main(["bundle", "build", "--home", str(coord.home), "--name", "digits",
                 "--version", "1", "--to", "all", "--out", str(tmp_path / "b.efb")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert (f"storage key {wrong.keyid} does not open blob {mv.blob[:16]}… (sealed under "
            f"storage key {right.keyid})") in err
    assert right.raw.hex() not in err and wrong.raw.hex() not in err


def test_a_missing_key_file_with_sealed_data_is_refused_not_replaced(coord: Coordinator) -> None:
    coord.config.storage_key_path.unlink()
    c = Coordinator.open(coord.home)  # commands that need no secret still work
    assert [m.name for m in c.registry.models()] == ["digits"]
    assert not coord.config.storage_key_path.exists()  # no new key was made over sealed data
    with pytest.raises(ConfigError, match=r"storage key \(none\) does not open blob .* "
                                          r"storage key file .* is missing: restore it"):
        c.build("digits", "1", "all", now=T0)


# -- rotation ---------------------------------------------------------------------------------
def sealed_under(c: Coordinator, keyid: str) -> bool:
    """Every content key and model blob is sealed under ``keyid``."""
    keys = [stored for _, _, stored in c.registry.stored_content_keys()]
    blobs = [c.blobs.path(m.blob).read_bytes() for m in c.registry.models()]
    return all(item[4:12].hex() == keyid for item in keys + blobs)


def test_rotation_reseals_everything_and_keeps_every_release_buildable_and_servable(
    coord: Coordinator, digits_v1: Digits, capsys: pytest.CaptureFixture[str]
) -> None:
    old = StorageKey.decode(coord.config.storage_key_path.read_bytes(), source="f")
    coord.register_model("digits", digits_v1.tflite, version="2")
    r1, built1 = coord.build("digits", "1", "all", now=T0)
    payload = coord.blobs.path(r1.payload_blob).read_bytes()
    assert main(["coordinator", "rotate-storage-key", "--home", str(coord.home)]) == 0
    new = StorageKey.decode(coord.config.storage_key_path.read_bytes(), source="f")
    assert new != old and new.keyid in capsys.readouterr().out
    c = Coordinator.open(coord.home)
    assert sealed_under(c, new.keyid)
    assert c.registry.release(sequence=r1.sequence).content_key == built1.content_key  # type: ignore[union-attr]
    assert c.blobs.path(r1.payload_blob).read_bytes() == payload  # served bytes untouched
    check_servable(c, r1)  # an old release is still served after rotation
    r2, _ = c.build("digits", "2", "all", now=T0)  # and every model still builds
    check_servable(c, r2)
    blob = c.registry.model("digits", "2").blob
    with pytest.raises(ConfigError, match="does not open"):  # the old key opens nothing now
        Vault(old).open(c.blobs.path(blob).read_bytes(), aad=blob_aad(blob), what="blob")
    assert not list(c.config.storage_key_path.parent.glob("*.next"))


def test_an_interrupted_rotation_loses_nothing_and_a_rerun_completes(
    coord: Coordinator, digits_v1: Digits
) -> None:
    coord.register_model("digits", digits_v1.tflite, version="2")
    releases = [coord.build("digits", v, "all", now=T0) for v in ("1", "2", "1")]
    old = StorageKey.decode(coord.config.storage_key_path.read_bytes(), source="f")
    seen: list[str] = []

    def crash(label: str) -> None:
        seen.append(label)
        if len(seen) == 3:  # two content keys re-sealed, then the process dies
            raise KeyboardInterrupt(label)

    with pytest.raises(KeyboardInterrupt):
        coord.rotate_storage_key(checkpoint=crash)
    half = Coordinator.open(coord.home)  # a fresh process: both keys open, mixed state
    assert not sealed_under(half, old.keyid)
    for r, built in releases:
        got = half.registry.release(sequence=r.sequence)
        assert got is not None and got.content_key == built.content_key
        check_servable(half, r)
    assert half.blobs.get(half.registry.model("digits", "2").blob) == digits_v1.tflite.read_bytes()
    new_id = half.rotate_storage_key()  # the re-run completes with the pending key
    assert new_id != old.keyid and sealed_under(Coordinator.open(coord.home), new_id)
    for r, built in releases:
        assert Coordinator.open(coord.home).registry.release(  # type: ignore[union-attr]
            sequence=r.sequence).content_key == built.content_key
    assert seen[:2] == [f"content key {r.sequence}" for r, _ in releases[:2]]


# -- homes from before sealing, and keys in the environment ---------------------------------
def test_a_home_from_before_sealing_is_sealed_on_first_open(coord: Coordinator,
                                                            digits_v1: Digits) -> None:
    coord.registry.vault = coord.blobs.vault = None  # write as the code before sealing did
    coord.register_model("digits", digits_v1.tflite, version="2")
    old, built = coord.build("digits", "2", "all", now=T0)
    coord.config.storage_key_path.unlink()
    mv1 = coord.registry.model("digits", "1")
    coord.blobs.path(mv1.blob).write_bytes(digits_v1.onnx.read_bytes())  # plain, like v2
    assert stored_content_key(coord, old.sequence) == built.content_key
    c = Coordinator.open(coord.home)
    key = StorageKey.decode(c.config.storage_key_path.read_bytes(), source="f")
    assert sealed_under(c, key.keyid)
    assert c.registry.release(sequence=old.sequence).content_key == built.content_key  # type: ignore[union-attr]
    check_servable(c, old)
    c.build("digits", "1", "all", now=T0)


def test_a_key_from_the_environment_is_read_by_the_cli_only(
    coord: Coordinator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    key = StorageKey.decode(coord.config.storage_key_path.read_bytes(), source="f")
    coord.update_config(storage_key_env="EF_TEST_STORAGE_KEY")
    coord.config.storage_key_path.unlink()  # the operator moved it into the environment
    build = ["bundle", "build", "--home", str(coord.home), "--name", "digits", "--version", "1",
             "--to", "all", "--out", str(tmp_path / "b.efb")]
    monkeypatch.delenv("EF_TEST_STORAGE_KEY", raising=False)
    assert main(build) == 2
    assert "$EF_TEST_STORAGE_KEY is not set" in capsys.readouterr().err
    assert main(["fleet", "status", "--home", str(coord.home), "--json"]) == 0  # needs no key
    monkeypatch.setenv("EF_TEST_STORAGE_KEY", key.raw.hex())
    assert main(build) == 0
    new = StorageKey.generate()
    monkeypatch.setenv("EF_NEW_KEY", new.raw.hex())
    assert main(["coordinator", "rotate-storage-key", "--home", str(coord.home),
                 "--new-key-env", "EF_NEW_KEY"]) == 0
    assert "now set $EF_TEST_STORAGE_KEY" in capsys.readouterr().out
    c = Coordinator.open(coord.home, storage_key=new)
    assert sealed_under(c, new.keyid)
    c.build("digits", "1", "all", now=T0)
    assert not os.path.exists(coord.config.storage_key_path)
