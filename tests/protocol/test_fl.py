"""FL envelopes: sealed frames verify; each tampered or misaddressed one fails with its error."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import Any

import pytest
from edgefleet.protocol import fl
from edgefleet.protocol.errors import (
    BundleError,
    DecodeError,
    ExpiredError,
    IntegrityError,
    KeyringError,
    MalformedError,
    NotForMeError,
    RollbackError,
    SignatureError,
    TooLargeError,
    UntrustedSignerError,
)
from edgefleet.protocol.keyring import KeyEntry, Keyring
from edgefleet.protocol.keys import SigningKey
from hypothesis import given, settings
from hypothesis import strategies as st

NOW = 1_800_000_000
RELEASE = SigningKey.generate()
OTHER = SigningKey.generate()
DEVICE = SigningKey.generate()
KEYRING = Keyring(version=1, expires=NOW + 3600, root_keyid="r" * 32, keys=(
    KeyEntry(keyid=RELEASE.keyid, public=RELEASE.public_raw, expires=NOW + 3600),))
PAYLOAD = b"flower message bytes" * 10


def instruction(signer: SigningKey = RELEASE, payload: bytes = PAYLOAD, **kw: Any) -> bytes:
    args: dict[str, Any] = dict(kind="instruction", run_id=7, round=1, message_id="m1",
                                device_id="dev-1", issued_at=NOW, expires=NOW + 60)
    return fl.seal(payload, signer, **{**args, **kw})


def reply(signer: SigningKey = DEVICE, **kw: Any) -> bytes:
    args: dict[str, Any] = dict(kind="reply", run_id=7, round=1, message_id="r1",
                                reply_to="m1", device_id="dev-1", issued_at=NOW, expires=NOW + 60)
    return fl.seal(PAYLOAD, signer, **{**args, **kw})


def open_ins(frame: bytes, **kw: Any) -> fl.Opened:
    args: dict[str, Any] = dict(device_id="dev-1", keyring=KEYRING, now=NOW)
    return fl.open_instruction(frame, **{**args, **kw})


def open_rep(frame: bytes, **kw: Any) -> fl.Opened:
    args: dict[str, Any] = dict(device_id="dev-1", device_key=DEVICE.public_raw, now=NOW)
    return fl.open_reply(frame, **{**args, **kw})


def test_a_sealed_instruction_and_reply_verify() -> None:
    got = open_ins(instruction())
    assert got.payload == PAYLOAD
    assert (got.header.sender, got.header.recipient, got.header.device_id) == (
        fl.COORDINATOR, "dev-1", "dev-1")
    rep = open_rep(reply())
    assert rep.header.reply_to == "m1" and rep.header.sender == "dev-1"


def flip(frame: bytes, at: int) -> bytes:
    return frame[:at] + bytes([frame[at] ^ 1]) + frame[at + 1 :]


def header_len(frame: bytes) -> int:
    return int(struct.unpack(">I", frame[4:8])[0])


BAD_INSTRUCTIONS: list[tuple[str, Callable[[], bytes], dict[str, Any], type[BundleError]]] = [
    ("wrong signer", lambda: instruction(OTHER), {}, UntrustedSignerError),
    ("device key", lambda: instruction(DEVICE), {}, UntrustedSignerError),
    ("no keyring", instruction, {"keyring": None}, UntrustedSignerError),
    ("expired keyring", instruction, {"now": NOW + 3600}, KeyringError),
    ("flipped signature", lambda: flip(instruction(), 8 + header_len(instruction()) + 3), {},
     SignatureError),
    ("flipped payload", lambda: flip(instruction(), len(instruction()) - 1), {}, IntegrityError),
    ("truncated payload", lambda: instruction()[:-1], {}, IntegrityError),
    ("another device", lambda: instruction(device_id="dev-2"), {}, NotForMeError),
    ("expired", instruction, {"now": NOW + 60}, ExpiredError),
    ("from the future", lambda: instruction(issued_at=NOW + 1000, expires=NOW + 2000), {},
     ExpiredError),
    ("a reply", reply, {}, MalformedError),
    ("bad magic", lambda: b"XXXX" + instruction()[4:], {}, MalformedError),
    ("short", lambda: b"EFL1", {}, MalformedError),
    ("header length", lambda: instruction()[:4] + b"\xff\xff\xff\xff" + instruction()[8:], {},
     MalformedError),
    ("header json", lambda: flip(instruction(), 9), {}, DecodeError),
    ("too large", lambda: b"EFL1" + b"\0" * fl.MAX_FRAME, {}, TooLargeError),
]


@pytest.mark.parametrize(("frame", "kw", "error"), [c[1:] for c in BAD_INSTRUCTIONS],
                         ids=[c[0] for c in BAD_INSTRUCTIONS])
def test_bad_instructions_are_rejected(
    frame: Callable[[], bytes], kw: dict[str, Any], error: type[BundleError]
) -> None:
    with pytest.raises(error):
        open_ins(frame(), **kw)


BAD_REPLIES: list[tuple[str, Callable[[], bytes], dict[str, Any], type[BundleError]]] = [
    ("another device's key", lambda: reply(OTHER), {}, UntrustedSignerError),
    ("another device's sender id", lambda: reply(device_id="dev-2"), {}, UntrustedSignerError),
    ("not enrolled", reply, {"device_key": None}, UntrustedSignerError),
    ("right keyid, bad signature",
     lambda: flip(reply(), 8 + header_len(reply()) + 1), {}, SignatureError),
    ("flipped payload", lambda: flip(reply(), len(reply()) - 2), {}, IntegrityError),
    ("expired", reply, {"now": NOW + 61}, ExpiredError),
    ("an instruction", lambda: instruction(), {}, MalformedError),
]


@pytest.mark.parametrize(("frame", "kw", "error"), [c[1:] for c in BAD_REPLIES],
                         ids=[c[0] for c in BAD_REPLIES])
def test_bad_replies_are_rejected(
    frame: Callable[[], bytes], kw: dict[str, Any], error: type[BundleError]
) -> None:
    with pytest.raises(error):
        open_rep(frame(), **kw)


def test_the_replay_guard_rejects_seen_ids_and_older_rounds() -> None:
    guard = fl.ReplayGuard(capacity=2)
    h = open_ins(instruction(round=3, message_id="a")).header
    guard.accept(h)
    with pytest.raises(RollbackError, match="replayed"):
        guard.check(h)
    with pytest.raises(RollbackError, match="below"):
        guard.check(open_ins(instruction(round=2, message_id="b")).header)
    guard.accept(open_ins(instruction(round=3, message_id="c")).header)  # same round: fine
    guard.accept(open_ins(instruction(run_id=8, round=1, message_id="d")).header)  # new run
    guard.accept(open_ins(instruction(round=4, message_id="e")).header)
    with pytest.raises(RollbackError):
        guard.check(open_ins(instruction(round=1, message_id="z")).header)


def test_a_full_replay_guard_forgets_expired_ids_before_unexpired_ones() -> None:
    """Full, the guard drops what expired first: an unexpired id is not pushed out by newer
    messages while an expired one is still held (a replay of it would pass otherwise)."""
    from dataclasses import replace

    guard = fl.ReplayGuard(capacity=2)
    base = open_ins(instruction(round=0, message_id="keep")).header
    t = base.issued_at
    keep = replace(base, expires=t + 10_000)
    guard.accept(keep)  # the oldest entry, valid for long
    guard.accept(replace(base, message_id="gone", expires=t + 100))
    guard.accept(replace(base, message_id="new", expires=t + 10_000), now=t + 200)
    with pytest.raises(RollbackError, match="replayed"):
        guard.check(keep)


def test_seal_refuses_an_oversize_payload_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="seal_message"):
        instruction(payload=b"x" * (fl.MAX_PAYLOAD + 1))
    assert open_ins(instruction(payload=b"x" * fl.MAX_PAYLOAD)).payload == b"x" * fl.MAX_PAYLOAD


def test_node_ids_are_stable_distinct_and_not_flowers_own() -> None:
    ids = {fl.node_id_for(f"dev-{i}") for i in range(2000)}
    assert len(ids) == 2000 and min(ids) > 1 and max(ids) < 2**63
    assert fl.node_id_for("dev-1") == int.from_bytes(
        hashlib.sha256(b"edgefleet-fl-node\0dev-1").digest()[:8]) & (2**63 - 1)
    with pytest.raises(DecodeError):
        fl.node_id_for("no/slash")


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=10_000))
def test_any_flipped_byte_is_rejected(at: int) -> None:
    frame = instruction()
    with pytest.raises(BundleError):
        open_ins(flip(frame, at % len(frame)))
