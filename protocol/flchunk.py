"""Chunks of a large FL message and their reassembly in bounded memory. Pure.

A Flower message larger than ``fl.MAX_PAYLOAD`` travels as a signed header frame (``fl``:
``chunks`` lists each piece's SHA-256, ``payload_size``/``payload_sha256`` the whole) followed
by one unsigned chunk frame per piece, in order, on the same topic:

    b"EFL2" | message id length (u8) | message id (ASCII) | index (u32, big-endian) | bytes

``Reassembler`` holds messages whose header already verified (the caller opened it with
``fl.open_instruction`` / ``fl.open_reply``, and checked addressing and replay) — nothing is
buffered for a chunk without one. Each chunk must be the next index, at most ``CHUNK_SIZE``
bytes, and hash to the digest the header signed; the first bad chunk (forged, misordered,
oversized, unknown) drops its whole message. A complete message's size and SHA-256 are checked
against the header before it is handed out.

Memory is bounded at ``begin``, by the signed size: at most ``max_bytes_per_key`` per key
(a device) and ``max_bytes`` in all, counting messages being reassembled and complete ones
the caller has not ``release``d yet; at most ``max_messages_per_key`` per key (the oldest is
dropped for a newer one), and an expired message is dropped on the next ``begin``. Not
thread-safe: callers that share one lock it.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from .errors import IntegrityError, MalformedError, TooLargeError
from .fl import CHUNK_SIZE, MESSAGE_ID_RE, FlHeader, Opened, check_payload

__all__ = ["MAGIC", "MAX_CHUNK_FRAME", "Chunk", "Reassembler", "chunk_frame", "is_chunk",
           "parse_chunk"]  # fmt: skip

MAGIC = b"EFL2"
MAX_CHUNK_FRAME = len(MAGIC) + 1 + 128 + 4 + CHUNK_SIZE


@dataclass(frozen=True)
class Chunk:
    message_id: str
    index: int
    data: bytes


def chunk_frame(message_id: str, index: int, data: bytes | memoryview) -> bytes:
    mid = message_id.encode("ascii")
    return MAGIC + bytes([len(mid)]) + mid + struct.pack(">I", index) + bytes(data)


def is_chunk(frame: bytes) -> bool:
    return frame[: len(MAGIC)] == MAGIC


def parse_chunk(frame: bytes) -> Chunk:
    """Split a chunk frame (size cap, magic, id); its bytes are checked by ``Reassembler``."""
    if len(frame) > MAX_CHUNK_FRAME:
        raise TooLargeError(f"fl chunk: expected at most {MAX_CHUNK_FRAME} bytes, saw "
                            f"{len(frame)}")  # fmt: skip
    if len(frame) < len(MAGIC) + 1 or not is_chunk(frame):
        raise MalformedError(f"fl chunk: expected {MAGIC!r}, saw {frame[:8]!r}")
    n = frame[4]
    if len(frame) < 5 + n + 4:
        raise MalformedError("fl chunk: truncated before its index")
    try:
        mid = frame[5 : 5 + n].decode("ascii")
    except UnicodeDecodeError:
        raise MalformedError("fl chunk: message id is not ASCII") from None
    if not MESSAGE_ID_RE.fullmatch(mid):
        raise MalformedError(f"fl chunk: bad message id {mid!r:.40}")
    (index,) = struct.unpack(">I", frame[5 + n : 9 + n])
    return Chunk(message_id=mid, index=index, data=frame[9 + n :])


@dataclass
class _Partial:
    opened: Opened  # the verified header frame
    buf: bytearray = field(default_factory=bytearray)
    next: int = 0
    done: bool = False


class Reassembler:
    def __init__(self, *, max_bytes_per_key: int, max_bytes: int,
                 max_messages_per_key: int = 4) -> None:  # fmt: skip
        if min(max_bytes_per_key, max_bytes, max_messages_per_key) < 1:
            raise ValueError("Reassembler bounds must be >= 1")
        self.max_bytes_per_key, self.max_bytes = max_bytes_per_key, max_bytes
        self.max_messages_per_key = max_messages_per_key
        self._parts: dict[tuple[str, str], _Partial] = {}  # (key, message id), insertion order

    def held(self, key: str | None = None) -> int:
        """Bytes reserved (by signed size) for ``key``, or in all."""
        return sum(p.opened.header.payload_size for (k, _), p in self._parts.items()
                   if key is None or k == key)  # fmt: skip

    def begin(self, key: str, opened: Opened, now: int) -> None:
        """Expect the chunks of ``opened`` (a verified chunked header) from ``key``."""
        h = opened.header
        if not h.chunks:
            raise ValueError("begin: the header names no chunks")
        for k in [k for k, p in self._parts.items() if p.opened.header.expires <= now]:
            del self._parts[k]
        if (key, h.message_id) in self._parts:
            raise IntegrityError(f"fl {h.message_id}: header seen twice")
        mine = [k for k in self._parts if k[0] == key and not self._parts[k].done]
        if len(mine) >= self.max_messages_per_key:
            del self._parts[mine[0]]
        if self.held(key) + h.payload_size > self.max_bytes_per_key:
            raise TooLargeError(f"fl {h.message_id}: {h.payload_size} bytes would exceed "
                                f"{self.max_bytes_per_key} held for {key}")  # fmt: skip
        if self.held() + h.payload_size > self.max_bytes:
            raise TooLargeError(f"fl {h.message_id}: {h.payload_size} bytes would exceed "
                                f"{self.max_bytes} held in all")  # fmt: skip
        self._parts[(key, h.message_id)] = _Partial(opened)

    def add(self, key: str, frame: bytes) -> Opened | None:
        """One chunk frame from ``key``; the whole message (``Opened`` with the full payload)
        once its last chunk arrived and it verified, else ``None``. A bad chunk raises and
        drops its message."""
        chunk = parse_chunk(frame)
        part = self._parts.get((key, chunk.message_id))
        if part is None or part.done:
            raise MalformedError(f"fl chunk {chunk.index} of {chunk.message_id}: no verified "
                                 "header is waiting for it")  # fmt: skip
        try:
            return self._add(part, chunk)
        except Exception:
            del self._parts[(key, chunk.message_id)]
            raise

    def _add(self, part: _Partial, chunk: Chunk) -> Opened | None:
        h = part.opened.header
        if chunk.index != part.next:
            raise IntegrityError(f"fl {h.message_id}: expected chunk {part.next}, saw "
                                 f"{chunk.index}")  # fmt: skip
        start, end = h.chunk_bounds(chunk.index)
        if len(chunk.data) != end - start:
            raise IntegrityError(f"fl {h.message_id} chunk {chunk.index}: expected "
                                 f"{end - start} bytes, saw {len(chunk.data)}")  # fmt: skip
        if hashlib.sha256(chunk.data).hexdigest() != h.chunks[chunk.index]:
            raise IntegrityError(f"fl {h.message_id} chunk {chunk.index}: SHA-256 does not "
                                 "match the signed header")  # fmt: skip
        part.buf += chunk.data
        part.next += 1
        if part.next < len(h.chunks):
            return None
        payload = bytes(part.buf)
        part.buf = bytearray()
        check_payload(h, payload)
        part.done = True
        return Opened(header=h, signed=part.opened.signed, signature=part.opened.signature,
                      payload=payload)  # fmt: skip

    def release(self, key: str, message_id: str) -> None:
        """Forget a message (complete or not): its bytes no longer count."""
        self._parts.pop((key, message_id), None)

    def expecting(self, header: FlHeader, key: str) -> bool:
        return (key, header.message_id) in self._parts
