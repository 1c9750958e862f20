"""The ``.efb`` bundle file: keyring, manifest, signatures, envelopes and payload in one file.

Layout (big-endian)::

    magic  8 bytes  b"EFB1\\r\\n\\x1a\\n"
    header 28 bytes keyring_len u32, keyring_sig_len u32, manifest_len u32,
                    signature_len u32, envelopes_len u32, payload_len u64
    keyring | keyring_sig | manifest | signature | envelopes | payload

Every length is checked against its cap, and the file size against the sum, before any
section is read. The same sections travel separately over MQTT.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from .canonical import canonical_json, decode_json_object
from .envelope import Envelope
from .errors import DecodeError, MalformedError, TooLargeError
from .keyring import MAX_KEYRING, MAX_SIGNATURE
from .manifest import MAX_MANIFEST

__all__ = [
    "HEADER_SIZE",
    "BundleReader",
    "MAGIC",
    "Layout",
    "decode_envelopes",
    "encode_envelopes",
    "encode_header",
    "parse_header",
]

MAGIC = b"EFB1\r\n\x1a\n"
_HEADER = struct.Struct(">IIIIIQ")
HEADER_SIZE = len(MAGIC) + _HEADER.size
MAX_ENVELOPES = 32 * 1024 * 1024
_SECTIONS = ("keyring", "keyring_sig", "manifest", "signature", "envelopes", "payload")


@dataclass(frozen=True)
class Layout:
    """Where each section lies in a bundle file: name -> (offset, length)."""

    spans: dict[str, tuple[int, int]]

    def __getitem__(self, name: str) -> tuple[int, int]:
        return self.spans[name]

    @property
    def total(self) -> int:
        off, length = self.spans["payload"]
        return off + length


def encode_header(
    *, keyring: int, keyring_sig: int, manifest: int, signature: int, envelopes: int, payload: int
) -> bytes:
    return MAGIC + _HEADER.pack(keyring, keyring_sig, manifest, signature, envelopes, payload)


def parse_header(head: bytes, *, file_size: int, max_payload: int) -> Layout:
    """Check magic, caps and the file size; return the section layout."""
    if len(head) < HEADER_SIZE or head[: len(MAGIC)] != MAGIC:
        raise MalformedError(f"bundle: expected magic {MAGIC!r}, saw {bytes(head[:8])!r}")
    lengths = _HEADER.unpack(head[len(MAGIC) : HEADER_SIZE])
    caps = (MAX_KEYRING, MAX_SIGNATURE, MAX_MANIFEST, MAX_SIGNATURE, MAX_ENVELOPES, max_payload)
    spans: dict[str, tuple[int, int]] = {}
    offset = HEADER_SIZE
    for name, length, cap in zip(_SECTIONS, lengths, caps, strict=True):
        if length > cap:
            raise TooLargeError(
                f"bundle {name}: expected at most {cap} bytes, header says {length}"
            )
        spans[name] = (offset, length)
        offset += length
    if offset != file_size:
        kind = "truncated" if file_size < offset else "has trailing bytes"
        raise MalformedError(f"bundle {kind}: header says {offset} bytes, file has {file_size}")
    return Layout(spans)


ReadAt = Callable[[int, int], bytes]  # (offset, length) -> bytes, e.g. a pread on the file


class BundleReader:
    """Sections of a bundle file read on demand, after the header and caps were checked.

    Pure: the caller supplies ``read_at``; callers read the small signed sections first and
    verify them before asking for anything big.
    """

    def __init__(self, read_at: ReadAt, *, file_size: int, max_payload: int) -> None:
        self._read_at = read_at
        self.layout = parse_header(
            read_at(0, HEADER_SIZE), file_size=file_size, max_payload=max_payload
        )

    def section(self, name: str) -> bytes:
        off, length = self.layout[name]
        data = self._read_at(off, length)
        if len(data) != length:
            raise MalformedError(f"bundle {name}: expected {length} bytes, read {len(data)}")
        return data


def encode_envelopes(envelopes: list[Envelope]) -> bytes:
    return canonical_json({"envelopes": [e.to_dict() for e in envelopes]})


def decode_envelopes(data: bytes) -> list[Envelope]:
    d = decode_json_object(data, max_size=MAX_ENVELOPES, what="envelopes")
    items = d.get("envelopes")
    if set(d) != {"envelopes"} or not isinstance(items, list):
        raise DecodeError('envelopes: expected {"envelopes": [...]}')
    return [Envelope.from_dict(e) for e in items]
