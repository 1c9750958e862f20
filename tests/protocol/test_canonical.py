"""protocol.canonical: canonical JSON out, strict and bounded JSON in, strict base64 and hex."""

from __future__ import annotations

import math
from typing import Any

import pytest
from edgefleet.protocol.canonical import b64d, b64e, canonical_json, decode_json_object, hexbytes
from edgefleet.protocol.errors import DecodeError, TooLargeError
from hypothesis import given
from hypothesis import strategies as st

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=20)
json_objects = st.dictionaries(text, json_values, max_size=6)


def test_canonical_form() -> None:
    assert canonical_json({"b": [1, 2.5], "a": "é", "c": None}) == \
        '{"a":"é","b":[1,2.5],"c":null}'.encode()


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_canonical_json_refuses_non_finite_numbers(value: float) -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": value})


@given(json_objects)
def test_decode_inverts_canonical_encoding(obj: dict[str, Any]) -> None:
    raw = canonical_json(obj)
    decoded = decode_json_object(raw, max_size=len(raw), what="t")
    assert decoded == obj
    assert canonical_json(decoded) == raw


@pytest.mark.parametrize(("data", "error", "match"), [
    (b'{"a":1,"a":2}', DecodeError, "duplicate JSON key 'a'"),
    (b'{"a":{"b":1,"b":1}}', DecodeError, "duplicate JSON key 'b'"),
    (b'{"a":NaN}', DecodeError, "NaN"),
    (b'{"a":Infinity}', DecodeError, "Infinity"),
    (b'{"a":-Infinity}', DecodeError, "-Infinity"),
    (b"[1,2]", DecodeError, "expected a JSON object, saw list"),
    (b'"s"', DecodeError, "saw str"),
    (b"3", DecodeError, "saw int"),
    (b"null", DecodeError, "saw NoneType"),
    (b"", DecodeError, "invalid JSON"),
    (b"{", DecodeError, "invalid JSON"),
    (b'{"a":1} x', DecodeError, "invalid JSON"),
    (b'{"a":"\xff"}', DecodeError, "UTF-8"),
    (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", DecodeError, "invalid JSON"),
    (b"\xff" * 300_001, TooLargeError, "at most 300000 bytes, saw 300001"),
    (b'{"a":"' + b"x" * 300_000 + b'"}', TooLargeError, "at most 300000"),
])
def test_decode_rejects(data: bytes, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        decode_json_object(data, max_size=300_000, what="t")
    assert type(info.value) is error


def test_size_cap_is_checked_before_parsing() -> None:
    """Over the cap, even a duplicate key or invalid UTF-8 is reported as too large."""
    for data in (b'{"a":1,"a":2}', b"\xff\xfe"):
        with pytest.raises(TooLargeError):
            decode_json_object(data, max_size=1, what="t")
    assert decode_json_object(b'{"a":1}', max_size=7, what="t") == {"a": 1}  # exactly at the cap


@given(st.binary(max_size=200))
def test_base64_round_trip(data: bytes) -> None:
    assert b64d(b64e(data), what="t") == data


@pytest.mark.parametrize(("text", "match"), [
    (b"AAAA", "expected a base64 string"),
    (None, "expected a base64 string"),
    ("AA==\n", "invalid base64"),
    ("A A=", "invalid base64"),
    ("AA", "invalid base64"),  # missing padding
    ("AAA*", "invalid base64"),
    ("ÀAAA", "invalid base64"),
    ("AB==", "non-canonical"),  # the low 4 bits of the last digit must be zero
    ("AAB=", "non-canonical"),
    ("A" * 12, "at most 4 bytes"),
])
def test_base64_rejects(text: object, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        b64d(text, what="t", max_len=4)


@pytest.mark.parametrize(("text", "match"), [
    ("AB" * 4, "lower-case"),
    ("ab" * 3, "expected 8"),
    ("zz" * 4, "invalid hex"),
    (12345678, "expected 8"),
])
def test_hex_rejects(text: object, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        hexbytes(text, what="t", length=4)


def test_hex_accepts() -> None:
    assert hexbytes("00ff10ab", what="t", length=4) == bytes.fromhex("00ff10ab")
