"""Large FL messages: chunked under a signed header, reassembled bit-identically in bounded
memory; a forged, misordered, oversized or unannounced chunk is rejected."""

from __future__ import annotations

import os
from typing import Any

import pytest
from edgefleet.protocol import fl, flchunk
from edgefleet.protocol.errors import (
    DecodeError,
    IntegrityError,
    MalformedError,
    SignatureError,
    TooLargeError,
)

from .test_fl import DEVICE, KEYRING, NOW, RELEASE

BIG = os.urandom(1_300_000)  # > 1 MB: 6 chunks


def frames(payload: bytes = BIG, **kw: Any) -> list[bytes]:
    args: dict[str, Any] = dict(kind="instruction", run_id=7, round=1, message_id="m1",
                                device_id="dev-1", issued_at=NOW, expires=NOW + 60)
    return fl.seal_message(payload, RELEASE, **{**args, **kw})


def begin(r: flchunk.Reassembler, header_frame: bytes, key: str = "dev-1") -> fl.Opened:
    opened = fl.open_instruction(header_frame, device_id="dev-1", keyring=KEYRING, now=NOW)
    r.begin(key, opened, NOW)
    return opened


def reassembler(**kw: int) -> flchunk.Reassembler:
    return flchunk.Reassembler(**{"max_bytes_per_key": 4 << 20, "max_bytes": 8 << 20, **kw})


def test_a_large_message_round_trips_bit_identically() -> None:
    head, *chunks = frames()
    assert len(chunks) == -(-len(BIG) // fl.CHUNK_SIZE)
    assert all(len(f) <= fl.MAX_FRAME for f in [head, *chunks])
    r = reassembler()
    opened = begin(r, head)
    assert opened.header.chunks and opened.payload == b""
    assert r.held("dev-1") == len(BIG)
    got = [r.add("dev-1", c) for c in chunks]
    assert got[:-1] == [None] * (len(chunks) - 1)
    assert got[-1] is not None and got[-1].payload == BIG
    assert got[-1].header == opened.header
    r.release("dev-1", "m1")
    assert r.held() == 0


def test_a_small_message_is_one_unchanged_frame() -> None:
    small = b"x" * 100
    assert frames(small) == [fl.seal(small, RELEASE, kind="instruction", run_id=7, round=1,
                                      message_id="m1", device_id="dev-1", issued_at=NOW,
                                      expires=NOW + 60)]  # fmt: skip
    with pytest.raises(ValueError, match="limit"):
        frames(b"\0" * (fl.MAX_MESSAGE + 1))


def _flip(frame: bytes) -> bytes:
    return frame[:-1] + bytes([frame[-1] ^ 1])


@pytest.mark.parametrize(("case", "mutate", "error"), [
    ("forged chunk", lambda cs: [cs[0], _flip(cs[1]), *cs[2:]], IntegrityError),
    ("misordered", lambda cs: [cs[0], cs[2], cs[1], *cs[3:]], IntegrityError),
    ("repeated", lambda cs: [cs[0], cs[0], *cs[1:]], IntegrityError),
    ("oversized chunk", lambda cs: [cs[0] + b"x", *cs[1:]], IntegrityError),
    ("longer last chunk", lambda cs: [*cs[:-1], cs[-1] + b"x"], IntegrityError),
])  # fmt: skip
def test_a_bad_chunk_is_rejected_and_drops_its_message(case: str, mutate: Any,
                                                       error: type[Exception]) -> None:
    head, *chunks = frames()
    r = reassembler()
    begin(r, head)
    with pytest.raises(error):
        for c in mutate(chunks):
            r.add("dev-1", c)
    assert r.held() == 0  # dropped: nothing more is buffered for it
    with pytest.raises(MalformedError, match="no verified header"):
        r.add("dev-1", chunks[0])


@pytest.mark.parametrize(("case", "frame", "error"), [
    ("oversized frame", lambda c: c + b"x" * 200, TooLargeError),
    ("truncated", lambda c: c[:7], MalformedError),
    ("not a chunk", lambda c: b"EFL1" + c[4:], MalformedError),
    ("another message id", lambda c: flchunk.chunk_frame("m2", 0, c[9:]), MalformedError),
])  # fmt: skip
def test_a_frame_naming_no_waiting_message_is_rejected_alone(case: str, frame: Any,
                                                             error: type[Exception]) -> None:
    head, *chunks = frames()
    r = reassembler()
    begin(r, head)
    with pytest.raises(error):
        r.add("dev-1", frame(chunks[0]))
    out = [r.add("dev-1", c) for c in chunks][-1]  # the real message still completes
    assert out is not None and out.payload == BIG


def test_no_chunk_is_buffered_without_a_verified_header() -> None:
    head, *chunks = frames()
    r = reassembler()
    with pytest.raises(MalformedError, match="no verified header"):
        r.add("dev-1", chunks[0])
    with pytest.raises(MalformedError):  # another device's message id
        begin(r, head, key="dev-2")
        r.add("dev-1", chunks[0])
    forged = head[:20] + bytes([head[20] ^ 1]) + head[21:]
    with pytest.raises((SignatureError, DecodeError)):
        begin(reassembler(), forged)


def test_a_chunked_header_with_an_inline_payload_is_rejected() -> None:
    head, *_ = frames()
    with pytest.raises(IntegrityError, match="no payload"):
        fl.open_instruction(head + b"x", device_id="dev-1", keyring=KEYRING, now=NOW)


def test_memory_is_bounded_per_device_and_in_all() -> None:
    r = reassembler(max_bytes_per_key=2 << 20, max_bytes=3 << 20)
    begin(r, frames(message_id="a")[0])
    with pytest.raises(TooLargeError, match="held for dev-1"):
        begin(r, frames(message_id="b")[0])  # 2 x 1.3 MB > 2 MiB for one device
    begin(r, frames(message_id="c")[0], key="dev-2")
    with pytest.raises(TooLargeError, match="in all"):
        begin(r, frames(message_id="d")[0], key="dev-3")  # 3 x 1.3 MB > 3 MiB
    assert r.held() <= 3 << 20
    r.release("dev-1", "a")
    begin(r, frames(message_id="d")[0], key="dev-3")


def test_stale_messages_are_dropped() -> None:
    r = reassembler(max_messages_per_key=2)
    for mid in ("a", "b", "c"):
        begin(r, frames(message_id=mid)[0])
    assert r.held("dev-1") == 2 * len(BIG)  # the oldest made room
    r.begin("dev-2", fl.open_instruction(frames(message_id="e")[0], device_id="dev-1",
                                         keyring=KEYRING, now=NOW), NOW + 61)  # fmt: skip
    assert r.held("dev-1") == 0  # expired ones went on the next begin


def test_a_chunked_reply_verifies_with_the_device_key() -> None:
    head, *chunks = fl.seal_message(BIG, DEVICE, kind="reply", run_id=7, round=1,
                                    message_id="r1", reply_to="m1", device_id="dev-1",
                                    issued_at=NOW, expires=NOW + 60)  # fmt: skip
    opened = fl.open_reply(head, device_id="dev-1", device_key=DEVICE.public_raw, now=NOW)
    r = reassembler()
    r.begin("dev-1", opened, NOW)
    out = [r.add("dev-1", c) for c in chunks][-1]
    assert out is not None and out.payload == BIG


def test_header_digest_count_must_match_the_size() -> None:
    head = frames()[0]
    h = fl.parse(head).header
    with pytest.raises(DecodeError, match="chunk digests"):
        fl.FlHeader(**{**h.to_dict(), "chunks": h.chunks[:-1]})
