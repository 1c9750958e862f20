"""protocol.segments: the segmented AES-256-GCM payload cipher."""

from __future__ import annotations

import secrets

import pytest
from edgefleet.protocol.errors import DecryptError
from edgefleet.protocol.segments import (
    MIN_SEGMENT,
    TAG_SIZE,
    SegmentCipher,
    ciphertext_size,
    segment_count,
)
from hypothesis import given, settings
from hypothesis import strategies as st

SEG = MIN_SEGMENT
KEY = bytes(range(32))
BUNDLE = bytes(range(16))
PLAIN = bytes(i % 251 for i in range(3 * SEG + 100))  # 4 segments, the last one short


def cipher(key: bytes = KEY, bundle: bytes = BUNDLE) -> SegmentCipher:
    return SegmentCipher(key, bundle, SEG)


def sealed() -> list[bytes]:
    return list(cipher().seal_all(PLAIN))


def open_all(segments: list[bytes], c: SegmentCipher | None = None) -> bytes:
    c = c or cipher()
    return b"".join(c.open(i, s, final=i == len(segments) - 1) for i, s in enumerate(segments))


@settings(max_examples=50)
@given(st.binary(min_size=0, max_size=4 * SEG + 3))
def test_round_trip(plain: bytes) -> None:
    key, bundle = secrets.token_bytes(32), secrets.token_bytes(16)
    segments = list(SegmentCipher(key, bundle, SEG).seal_all(plain))
    assert len(segments) == segment_count(len(plain), SEG)
    assert sum(map(len, segments)) == ciphertext_size(len(plain), SEG)
    assert open_all(segments, SegmentCipher(key, bundle, SEG)) == plain


def test_sizes() -> None:
    assert segment_count(0, SEG) == 1 and segment_count(SEG, SEG) == 1
    assert segment_count(SEG + 1, SEG) == 2
    assert ciphertext_size(len(PLAIN), SEG) == len(PLAIN) + 4 * TAG_SIZE


def _reordered() -> None:
    s = sealed()
    open_all([s[1], s[0], *s[2:]])


def _final_segment_dropped() -> None:
    open_all(sealed()[:-1])  # segment 2 is not sealed as final


def _final_segment_cut_short() -> None:
    s = sealed()
    open_all([*s[:-1], s[-1][:-1]])


def _non_final_opened_as_final() -> None:
    cipher().open(0, sealed()[0], final=True)


def _moved_to_another_bundle() -> None:
    other = SegmentCipher(KEY, bytes(16), SEG)  # same key, other bundle id
    other.open(0, sealed()[0], final=False)


def _wrong_key() -> None:
    open_all(sealed(), cipher(key=bytes(32)))


def _flipped_bit() -> None:
    s = sealed()
    s[2] = bytes([s[2][0] ^ 1]) + s[2][1:]
    open_all(s)


def _duplicated_segment() -> None:
    s = sealed()
    open_all([s[0], s[0], *s[2:]])


@pytest.mark.parametrize("attack", [_reordered, _final_segment_dropped, _final_segment_cut_short,
                                    _non_final_opened_as_final, _moved_to_another_bundle,
                                    _wrong_key, _flipped_bit, _duplicated_segment],
                         ids=lambda f: f.__name__.strip("_"))
def test_tampering_fails_to_decrypt(attack: object) -> None:
    with pytest.raises(DecryptError):
        attack()  # type: ignore[operator]


@pytest.mark.parametrize(("key", "bundle", "size", "match"), [
    (bytes(31), BUNDLE, SEG, "content key"),
    (KEY, bytes(15), SEG, "bundle id"),
    (KEY, BUNDLE, SEG - 1, "segment size"),
    (KEY, BUNDLE, 4 * 1024 * 1024 + 1, "segment size"),
])
def test_bad_parameters(key: bytes, bundle: bytes, size: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SegmentCipher(key, bundle, size)


@pytest.mark.parametrize(("plain", "final"), [(bytes(SEG - 1), False), (bytes(SEG + 1), True)])
def test_only_the_final_segment_may_be_short(plain: bytes, final: bool) -> None:
    with pytest.raises(ValueError, match="final segment"):
        cipher().seal(0, plain, final=final)
