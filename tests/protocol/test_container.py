"""protocol.container: the .efb header (caps and sizes checked before any section is read)."""

from __future__ import annotations

import pytest
from edgefleet.protocol.container import (
    HEADER_SIZE,
    MAGIC,
    MAX_ENVELOPES,
    decode_envelopes,
    encode_envelopes,
    encode_header,
    parse_header,
)
from edgefleet.protocol.envelope import Envelope
from edgefleet.protocol.errors import BundleError, DecodeError, MalformedError, TooLargeError
from edgefleet.protocol.keyring import MAX_KEYRING, MAX_SIGNATURE
from edgefleet.protocol.manifest import MAX_MANIFEST

SIZES = {"keyring": 10, "keyring_sig": 20, "manifest": 30, "signature": 40, "envelopes": 50,
         "payload": 60}
TOTAL = HEADER_SIZE + sum(SIZES.values())


def header(**overrides: int) -> bytes:
    return encode_header(**{**SIZES, **overrides})


def test_layout() -> None:
    layout = parse_header(header(), file_size=TOTAL, max_payload=60)
    offset = HEADER_SIZE
    for name, size in SIZES.items():
        assert layout[name] == (offset, size)
        offset += size
    assert layout.total == TOTAL and HEADER_SIZE == len(MAGIC) + 28


BAD = [
    ("empty", b"", TOTAL, 60, MalformedError),
    ("short-header", header()[:-1], TOTAL, 60, MalformedError),
    ("bad-magic", b"EFB2" + header()[4:], TOTAL, 60, MalformedError),
    ("truncated", header(), TOTAL - 1, 60, MalformedError),
    ("trailing-bytes", header(), TOTAL + 1, 60, MalformedError),
    ("keyring-cap", header(keyring=MAX_KEYRING + 1), TOTAL, 60, TooLargeError),
    ("keyring-sig-cap", header(keyring_sig=MAX_SIGNATURE + 1), TOTAL, 60, TooLargeError),
    ("manifest-cap", header(manifest=MAX_MANIFEST + 1), TOTAL, 60, TooLargeError),
    ("signature-cap", header(signature=MAX_SIGNATURE + 1), TOTAL, 60, TooLargeError),
    ("envelopes-cap", header(envelopes=MAX_ENVELOPES + 1), TOTAL, 60, TooLargeError),
    ("payload-over-device-cap", header(), TOTAL, 59, TooLargeError),
    ("payload-u64-huge", header(payload=2**63), TOTAL, 1 << 40, TooLargeError),
]


@pytest.mark.parametrize(("head", "size", "cap", "error"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_header(head: bytes, size: int, cap: int, error: type[BundleError]) -> None:
    with pytest.raises(BundleError) as info:
        parse_header(head, file_size=size, max_payload=cap)
    assert type(info.value) is error


def test_envelopes_round_trip() -> None:
    envs = [Envelope(device_id=f"d{i}", kem="x25519", sealed=bytes([i]) * 80) for i in range(3)]
    assert decode_envelopes(encode_envelopes(envs)) == envs


@pytest.mark.parametrize("raw", [b"[]", b'{"envelopes":{}}', b'{"envelopes":[],"x":1}',
                                 b'{"envelopes":[{"device_id":"d"}]}', b"\xff"])
def test_bad_envelopes(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_envelopes(raw)
