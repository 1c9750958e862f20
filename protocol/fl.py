"""Signed envelopes for Flower messages on the fleet link. Pure: bytes and an injected clock.

Every federated-learning message travels in one frame:

    b"EFL1" | header length (u32, big-endian) | header (canonical JSON) |
    Ed25519 signature (64 bytes) over everything before it, as received | payload

The payload is one Flower ``Message`` in Flower's own serde (opaque here); the signed header
binds it by size and SHA-256 and says who sent it to whom, for which run, round and message.
A payload larger than ``MAX_PAYLOAD`` travels like a bundle (``seal_message``): a signed header
frame with an empty payload whose ``chunks`` lists the SHA-256 of each ``CHUNK_SIZE`` piece,
then one unsigned ``EFL2`` chunk frame per piece, in order (``protocol.flchunk``: reassembled
into a bounded buffer, each chunk hashed against the verified header on arrival):

- an **instruction** (coordinator -> device, topic ``ef/v1/dev/<id>/fl``) is signed by one of
  the coordinator's release keys; the device verifies it with the keyring it already trusts;
- a **reply** (device -> coordinator, ``ef/v1/dev/<id>/up/fl``) is signed by the device's own
  Ed25519 identity key; the coordinator verifies it with the device's enrolled public key.

``round`` is the coordinator's step counter within a run (one per ``send_and_receive``: a
Flower round of train + evaluate is two steps); it only ever grows within a run.
``ReplayGuard`` rejects a message id seen before and a round below the highest seen for the
run. Check order (TUF's): size cap -> framing -> header shape -> signer -> signature over the
bytes as received -> payload size and digest (of a chunked message: after reassembly) ->
addressing -> expiry -> replay.

Flower node ids are derived from device ids (``node_id_for``): both sides compute the same
stable 63-bit id with no table to keep in sync.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from typing import Any, Literal

from ._fields import check_header, check_keys, field
from ._fields import name as check_name
from .canonical import canonical_json, decode_json_object, hexbytes
from .errors import (
    DecodeError,
    ExpiredError,
    IntegrityError,
    KeyringError,
    MalformedError,
    NotForMeError,
    RollbackError,
    TooLargeError,
    UntrustedSignerError,
)
from .keyring import Keyring
from .keys import SigningKey, key_id, verify_signature

__all__ = [
    "CHUNK_SIZE",
    "COORDINATOR",
    "MAX_FRAME",
    "MAX_MESSAGE",
    "MAX_PAYLOAD",
    "FlHeader",
    "Opened",
    "ReplayGuard",
    "check_payload",
    "node_id_for",
    "open_instruction",
    "open_reply",
    "parse",
    "seal",
    "seal_message",
]

MAGIC = b"EFL1"
MAX_HEADER = 24 * 1024  # bytes: room for the chunk digests of a MAX_MESSAGE payload
MAX_PAYLOAD = 240 * 1024  # bytes in one frame (a digits train message is ~39 KB)
CHUNK_SIZE = MAX_PAYLOAD  # bytes per chunk of a larger message (the last may be shorter)
MAX_MESSAGE = 64 * 1024 * 1024  # bytes: the largest chunked message (273 chunks)
MAX_FRAME = len(MAGIC) + 4 + MAX_HEADER + 64 + MAX_PAYLOAD
MAX_SKEW = 300  # s a header's issued_at may lie in the receiver's future
#: the sender (and recipient) name of the coordinator side
COORDINATOR = "coordinator"
MESSAGE_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
Kind = Literal["instruction", "reply"]
_FIELDS = {
    "type", "schema_version", "kind", "run_id", "round", "message_id", "reply_to", "sender",
    "recipient", "keyid", "issued_at", "expires", "payload_sha256", "payload_size", "chunks",
}
_U63 = (1 << 63) - 1


def node_id_for(device_id: str) -> int:
    """The Flower node id of a device: 63 bits of SHA-256, never 0 or 1 (Flower's own)."""
    check_name(device_id, "device id")
    n = int.from_bytes(hashlib.sha256(b"edgefleet-fl-node\0" + device_id.encode()).digest()[:8])
    n &= _U63
    return n if n > 1 else n + 2


@dataclass(frozen=True, kw_only=True)
class FlHeader:
    """The signed header of one FL frame."""

    kind: Kind
    run_id: int
    round: int
    message_id: str
    reply_to: str  # "" for an instruction; the instruction's message id for a reply
    sender: str  # COORDINATOR or a device id
    recipient: str  # a device id or COORDINATOR
    keyid: str  # the signing key's id
    issued_at: int  # unix seconds
    expires: int  # unix seconds
    payload_sha256: str
    payload_size: int  # bytes (of the whole message when chunked)
    chunks: tuple[str, ...] = ()  # SHA-256 hex of each CHUNK_SIZE piece; () = payload inline
    type: str = "fl-envelope"
    schema_version: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("instruction", "reply"):
            raise DecodeError(f"fl header.kind: expected instruction|reply, saw {self.kind!r:.40}")
        for what, number in (("run_id", self.run_id), ("round", self.round)):
            if not 0 <= number <= _U63:
                raise DecodeError(f"fl header.{what}: expected 0..2**63-1, saw {number}")
        for what, text in (("message_id", self.message_id), ("reply_to", self.reply_to)):
            if text and not MESSAGE_ID_RE.fullmatch(text):
                raise DecodeError(f"fl header.{what}: expected {MESSAGE_ID_RE.pattern}")
        if not self.message_id or (self.kind == "reply") != bool(self.reply_to):
            raise DecodeError("fl header: a message id is required; reply_to only on replies")
        device = self.recipient if self.kind == "instruction" else self.sender
        coord = self.sender if self.kind == "instruction" else self.recipient
        check_name(device, "fl header device")
        if coord != COORDINATOR:
            raise DecodeError(f"fl header: the coordinator side must be {COORDINATOR!r}")
        hexbytes(self.payload_sha256, what="fl header.payload_sha256", length=32)
        if self.expires < self.issued_at:
            raise DecodeError("fl header: expires < issued_at")
        if not self.chunks:
            if not 0 <= self.payload_size <= MAX_PAYLOAD:
                raise DecodeError(f"fl header: payload_size {self.payload_size} out of range")
            return
        if not MAX_PAYLOAD < self.payload_size <= MAX_MESSAGE:
            raise DecodeError(f"fl header: chunked payload_size {self.payload_size} out of "
                              f"range ({MAX_PAYLOAD}, {MAX_MESSAGE}]")  # fmt: skip
        if len(self.chunks) != -(-self.payload_size // CHUNK_SIZE):
            raise DecodeError(f"fl header: {len(self.chunks)} chunk digests for "
                              f"{self.payload_size} bytes")  # fmt: skip
        for digest in self.chunks:
            hexbytes(digest, what="fl header.chunks[]", length=32)

    @property
    def device_id(self) -> str:
        """The device end of this message (recipient of an instruction, sender of a reply)."""
        return self.recipient if self.kind == "instruction" else self.sender

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of chunk ``index`` in the payload."""
        start = index * CHUNK_SIZE
        return start, min(start + CHUNK_SIZE, self.payload_size)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in sorted(_FIELDS - {"chunks"})}
        if self.chunks:  # absent from single frames: their bytes are as before chunking
            d["chunks"] = list(self.chunks)
        return d

    def encode(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def decode(cls, data: bytes) -> FlHeader:
        d = decode_json_object(data, max_size=MAX_HEADER, what="fl header")
        check_header(d, "fl-envelope", 1, "fl header")
        check_keys(d, _FIELDS, "fl header")
        ints = {k: field(d, k, int, "fl header") for k in
                ("run_id", "round", "issued_at", "expires", "payload_size")}
        strs = {k: field(d, k, str, "fl header") for k in
                ("kind", "message_id", "reply_to", "sender", "recipient", "keyid",
                 "payload_sha256")}
        chunks: tuple[str, ...] = ()
        if "chunks" in d:
            listed = field(d, "chunks", list, "fl header")
            if not listed or not all(isinstance(c, str) for c in listed):
                raise DecodeError("fl header.chunks: expected a non-empty list of digests")
            chunks = tuple(listed)
        return cls(**ints, **strs, chunks=chunks)  # type: ignore[arg-type]  # kind: __post_init__


@dataclass(frozen=True, kw_only=True)
class Opened:
    """A frame split into its parts; ``header`` is trusted only after ``open_*`` returned it."""

    header: FlHeader
    signed: bytes  # magic + length + header, as received
    signature: bytes
    payload: bytes


def seal(
    payload: bytes,
    signer: SigningKey,
    *,
    kind: Kind,
    run_id: int,
    round: int,
    message_id: str,
    reply_to: str = "",
    device_id: str,
    issued_at: int,
    expires: int,
) -> bytes:
    """The signed frame carrying ``payload`` (``ValueError`` if it is too large for one:
    ``seal_message`` chunks those)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(
            f"FL payload is {len(payload)} bytes; at most {MAX_PAYLOAD} fit in one frame "
            "(seal_message chunks larger ones)"
        )
    ends = (COORDINATOR, device_id) if kind == "instruction" else (device_id, COORDINATOR)
    header = FlHeader(
        kind=kind, run_id=run_id, round=round, message_id=message_id, reply_to=reply_to,
        sender=ends[0], recipient=ends[1], keyid=signer.keyid, issued_at=issued_at,
        expires=expires, payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_size=len(payload),
    )
    return _signed(header, signer) + payload


def seal_message(
    payload: bytes,
    signer: SigningKey,
    *,
    kind: Kind,
    run_id: int,
    round: int,
    message_id: str,
    reply_to: str = "",
    device_id: str,
    issued_at: int,
    expires: int,
) -> list[bytes]:
    """The frames carrying ``payload``, to publish in order: one ``seal`` frame if it fits,
    else a signed header naming every chunk's SHA-256, then the ``EFL2`` chunk frames.
    ``ValueError`` above ``MAX_MESSAGE``."""
    from . import flchunk

    if len(payload) <= MAX_PAYLOAD:
        return [seal(payload, signer, kind=kind, run_id=run_id, round=round,
                     message_id=message_id, reply_to=reply_to, device_id=device_id,
                     issued_at=issued_at, expires=expires)]  # fmt: skip
    if len(payload) > MAX_MESSAGE:
        raise ValueError(f"FL payload is {len(payload)} bytes; the limit is {MAX_MESSAGE}")
    view = memoryview(payload)
    pieces = [view[i : i + CHUNK_SIZE] for i in range(0, len(payload), CHUNK_SIZE)]
    ends = (COORDINATOR, device_id) if kind == "instruction" else (device_id, COORDINATOR)
    header = FlHeader(
        kind=kind, run_id=run_id, round=round, message_id=message_id, reply_to=reply_to,
        sender=ends[0], recipient=ends[1], keyid=signer.keyid, issued_at=issued_at,
        expires=expires, payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_size=len(payload), chunks=tuple(hashlib.sha256(p).hexdigest() for p in pieces),
    )
    return [_signed(header, signer),
            *(flchunk.chunk_frame(message_id, i, p) for i, p in enumerate(pieces))]


def _signed(header: FlHeader, signer: SigningKey) -> bytes:
    body = header.encode()
    signed = MAGIC + struct.pack(">I", len(body)) + body
    return signed + signer.sign(signed)


def parse(frame: bytes) -> Opened:
    """Split a frame (size cap, magic, header shape); nothing is trusted yet."""
    if len(frame) > MAX_FRAME:
        raise TooLargeError(f"fl frame: expected at most {MAX_FRAME} bytes, saw {len(frame)}")
    if len(frame) < len(MAGIC) + 4 + 64 or frame[: len(MAGIC)] != MAGIC:
        raise MalformedError(f"fl frame: expected {MAGIC!r} and a header, saw {frame[:8]!r}")
    (n,) = struct.unpack(">I", frame[4:8])
    if n > MAX_HEADER or len(frame) < 8 + n + 64:
        raise MalformedError(f"fl frame: header length {n} does not fit {len(frame)} bytes")
    header = FlHeader.decode(frame[8 : 8 + n])
    return Opened(header=header, signed=frame[: 8 + n], signature=frame[8 + n : 72 + n],
                  payload=frame[72 + n :])


def _check(opened: Opened, public: bytes, now: int) -> None:
    h = opened.header
    verify_signature(public, opened.signature, opened.signed, what=f"fl {h.kind} {h.message_id}")
    if h.chunks:  # each chunk and the whole are checked by flchunk.Reassembler
        if opened.payload:
            raise IntegrityError(f"fl {h.message_id}: a chunked header carries no payload")
    else:
        check_payload(h, opened.payload)
    if now >= h.expires:
        raise ExpiredError(f"fl {h.kind} {h.message_id}: expired at {h.expires}, now {now}")
    if h.issued_at > now + MAX_SKEW:
        raise ExpiredError(f"fl {h.kind} {h.message_id}: issued at {h.issued_at}, in the future")


def check_payload(h: FlHeader, payload: bytes) -> None:
    """``payload`` is the one ``h`` signed: its size and SHA-256."""
    if len(payload) != h.payload_size:
        raise IntegrityError(f"fl payload: expected {h.payload_size} bytes, saw {len(payload)}")
    if hashlib.sha256(payload).hexdigest() != h.payload_sha256:
        raise IntegrityError(f"fl payload of {h.message_id}: SHA-256 does not match the header")


def open_instruction(frame: bytes, *, device_id: str, keyring: Keyring | None,
                     now: int) -> Opened:
    """Verify an instruction for ``device_id`` signed by a release key in ``keyring``."""
    opened = parse(frame)
    h = opened.header
    if h.kind != "instruction":
        raise MalformedError(f"fl: expected an instruction, saw a {h.kind}")
    if keyring is None:
        raise UntrustedSignerError("fl instruction: no trusted keyring yet (only the root)")
    if now >= keyring.expires:
        raise KeyringError(f"keyring v{keyring.version}: expired at {keyring.expires}")
    _check(opened, keyring.release_key(h.keyid, now).public, now)
    if h.recipient != device_id:
        raise NotForMeError(f"fl instruction for {h.recipient!r}, this is {device_id!r}")
    return opened


def open_reply(frame: bytes, *, device_id: str, device_key: bytes | None, now: int) -> Opened:
    """Verify a reply that arrived on ``device_id``'s topic, signed by that device's key."""
    opened = parse(frame)
    h = opened.header
    if h.kind != "reply":
        raise MalformedError(f"fl: expected a reply, saw an {h.kind}")
    if h.sender != device_id:
        raise UntrustedSignerError(f"fl reply on {device_id!r}'s topic claims sender {h.sender!r}")
    if device_key is None:
        raise UntrustedSignerError(f"fl reply from {device_id!r}: no enrolled key")
    if h.keyid != key_id(device_key):
        raise UntrustedSignerError(f"fl reply from {device_id!r}: signed by key {h.keyid!r:.40}, "
                                   f"enrolled {key_id(device_key)}")
    _check(opened, device_key, now)
    return opened


class ReplayGuard:
    """Rejects a message id seen before, or a round below the highest seen in its run.

    Pure and bounded: remembers the last ``capacity`` message ids (each until its header's
    expiry: an expired message is refused by ``open_*`` anyway) and the rounds of the last
    ``capacity`` runs. ``check`` raises; ``accept`` records (after every other check passed).
    ``to_dict`` / ``from_dict`` carry the state across a restart (the caller stores it).
    """

    def __init__(self, capacity: int = 1024) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._ids: dict[str, int] = {}  # message id -> its expiry (unix s), oldest first
        self._rounds: dict[int, int] = {}
        self._capacity = capacity

    def check(self, header: FlHeader) -> None:
        if header.message_id in self._ids:
            raise RollbackError(f"fl message {header.message_id}: replayed")
        highest = self._rounds.get(header.run_id, -1)
        if header.round < highest:
            raise RollbackError(
                f"fl run {header.run_id}: round {header.round} is below round {highest} seen"
            )

    def accept(self, header: FlHeader, *, now: int | None = None) -> None:
        """Record ``header`` (after ``check``). Full, it forgets the ids expired by ``now``
        first, and only then the oldest ids (which the round check still covers within a
        run)."""
        self.check(header)
        self._ids[header.message_id] = header.expires
        if len(self._ids) > self._capacity and now is not None:
            self._ids = {k: v for k, v in self._ids.items() if v > now}
        while len(self._ids) > self._capacity:
            del self._ids[next(iter(self._ids))]
        self._rounds.pop(header.run_id, None)  # re-inserted last: the most recent run
        self._rounds[header.run_id] = max(header.round, self._rounds.get(header.run_id, -1))
        while len(self._rounds) > self._capacity:
            del self._rounds[next(iter(self._rounds))]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "fl-replay-guard", "schema_version": 1,
                "ids": [[k, v] for k, v in self._ids.items()],
                "rounds": [[k, v] for k, v in self._rounds.items()]}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, now: int, capacity: int = 1024) -> ReplayGuard:
        """The state ``to_dict`` wrote, without the ids expired by ``now``."""
        check_header(d, "fl-replay-guard", 1, "fl replay guard")
        guard = cls(capacity)
        try:
            for mid, expires in d["ids"][-capacity:]:
                if isinstance(mid, str) and isinstance(expires, int) and expires > now:
                    guard._ids[mid] = expires
            for run_id, rnd in d["rounds"][-capacity:]:
                guard._rounds[int(run_id)] = int(rnd)
        except (KeyError, TypeError, ValueError) as exc:
            raise DecodeError(f"fl replay guard: {type(exc).__name__}: {exc}"[:200]) from exc
        return guard
