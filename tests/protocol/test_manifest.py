"""protocol.manifest: encode/decode round trip (property) and validation errors (table)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from edgefleet.protocol.canonical import canonical_json
from edgefleet.protocol.errors import DecodeError, TooLargeError
from edgefleet.protocol.manifest import (
    DTYPES,
    FORMATS,
    MAX_MANIFEST,
    MAX_SMOKE,
    Manifest,
    SmokeVector,
    TensorSpec,
)
from edgefleet.protocol.segments import MAX_SEGMENT, MIN_SEGMENT, ciphertext_size, segment_count
from hypothesis import given
from hypothesis import strategies as st

NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,15}", fullmatch=True)
HEX32 = st.binary(min_size=32, max_size=32).map(bytes.hex)
FLOATS = st.floats(allow_nan=False, allow_infinity=False, width=64)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | FLOATS | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                  max_size=3),
    max_leaves=10)
SPECS = st.builds(TensorSpec, name=st.text(max_size=10), dtype=st.sampled_from(DTYPES),
                  shape=st.lists(st.none() | st.integers(0, 4096), max_size=4).map(tuple))
ROWS = st.integers(1, 4).flatmap(  # a matrix: rows of one width
    lambda width: st.lists(st.lists(FLOATS, min_size=width, max_size=width).map(tuple),
                           min_size=1, max_size=3).map(tuple))
SMOKE = st.builds(SmokeVector, input=ROWS, expected=ROWS,
                  atol=st.floats(0, 1, allow_nan=False))


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    segment_size = draw(st.integers(MIN_SEGMENT, MAX_SEGMENT))
    plaintext_size = draw(st.integers(1, 20 * segment_size))
    created = draw(st.integers(0, 2**40))
    n = segment_count(plaintext_size, segment_size)
    return Manifest(
        bundle_id=draw(st.binary(min_size=16, max_size=16)).hex(), name=draw(NAMES),
        format=draw(st.sampled_from(FORMATS)), sequence=draw(st.integers(1, 2**53)),
        model_version=draw(NAMES), created=created,
        expires=created + draw(st.integers(1, 2**32)),
        targets=draw(st.dictionaries(NAMES, HEX32, min_size=1, max_size=4)),
        inputs=tuple(draw(st.lists(SPECS, min_size=1, max_size=3))),
        outputs=tuple(draw(st.lists(SPECS, min_size=1, max_size=3))),
        plaintext_size=plaintext_size, plaintext_sha256=draw(HEX32), segment_size=segment_size,
        payload_size=ciphertext_size(plaintext_size, segment_size),
        segment_hashes=tuple(draw(st.lists(HEX32, min_size=n, max_size=n))),
        smoke=tuple(draw(st.lists(SMOKE, max_size=3))),
        reference_stats=draw(st.dictionaries(st.text(max_size=5), JSONISH, max_size=3)),
        lineage=draw(st.dictionaries(st.text(max_size=5), JSONISH, max_size=3)),
    )


@given(manifests())
def test_decode_encode_round_trip(m: Manifest) -> None:
    raw = m.encode()
    assert Manifest.decode(raw) == m
    assert Manifest.decode(raw).encode() == raw  # canonical: one content, one byte string


def valid() -> dict[str, Any]:
    return {
        "type": "manifest", "schema_version": 1, "bundle_id": "ab" * 16, "name": "digits",
        "format": "onnx", "sequence": 3, "model_version": "2", "created": 100, "expires": 200,
        "targets": {"dev-a": "00" * 32},
        "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 64]}],
        "outputs": [{"name": "probabilities", "dtype": "float32", "shape": [None, 10]}],
        "plaintext_size": 2048, "plaintext_sha256": "11" * 32, "segment_size": 1024,
        "payload_size": 2048 + 32, "segment_hashes": ["22" * 32, "33" * 32],
        "smoke": [{"input": [[0.0] * 64], "expected": [[0.1] * 10], "atol": 1e-4}],
        "reference_stats": {}, "lineage": {},
    }


def test_valid_fixture_decodes() -> None:
    m = Manifest.decode(canonical_json(valid()))
    assert m.segments == 2 and m.segment_span(0) == (0, 1040) and m.segment_span(1) == (1040, 1040)
    with pytest.raises(ValueError):
        m.segment_span(2)


def _set(**kv: Any) -> Any:
    return lambda d: d.update(kv)


def _drop(key: str) -> Any:
    return lambda d: d.pop(key)


def _smoke(**kv: Any) -> Any:
    return lambda d: d["smoke"][0].update(kv)


BAD = [
    ("wrong-type", _set(type="keyring"), "expected type 'manifest'"),
    ("schema-version", _set(schema_version=2), "schema_version"),
    ("unknown-field", _set(extra=1), "unexpected fields"),
    ("missing-field", _drop("plaintext_sha256"), "missing field 'plaintext_sha256'"),
    ("sequence-as-string", _set(sequence="3"), "expected int, saw str"),
    ("sequence-as-bool", _set(sequence=True), "expected int, saw bool"),
    ("sequence-zero", _set(sequence=0), "sequence >= 1"),
    ("expires-before-created", _set(expires=100), "expires > created"),
    ("bundle-id-short", _set(bundle_id="ab" * 15), "bundle_id"),
    ("bundle-id-upper", _set(bundle_id="AB" * 16), "bundle_id"),
    ("name-with-slash", _set(name="../etc"), "manifest.name"),
    ("version-empty", _set(model_version=""), "model_version"),
    ("format", _set(format="pickle"), "manifest.format"),
    ("no-targets", _set(targets={}), "targets"),
    ("target-bad-id", _set(targets={"a/b": "00" * 32}), "targets device id"),
    ("target-bad-digest", _set(targets={"dev-a": "00"}), r"targets\[dev-a\]"),
    ("no-inputs", _set(inputs=[]), "tensor specs"),
    ("input-dtype", lambda d: d["inputs"][0].update(dtype="float64"), "dtype"),
    ("input-shape", lambda d: d["inputs"][0].update(shape=[-1, 64]), "bad shape"),
    ("input-not-object", _set(inputs=["x"]), "tensor spec"),
    ("segment-size-small", _set(segment_size=1023), "segment_size"),
    ("plaintext-empty", _set(plaintext_size=0), "plaintext_size"),
    ("hash-count", lambda d: d["segment_hashes"].pop(), "expected 2 hashes"),
    ("hash-not-hex", lambda d: d["segment_hashes"].__setitem__(0, "zz" * 32), "segment_hashes"),
    ("payload-size", _set(payload_size=2048), "payload_size"),
    ("plaintext-hash", _set(plaintext_sha256="11"), "plaintext_sha256"),
    ("too-many-smoke", lambda d: d.update(smoke=d["smoke"] * (MAX_SMOKE + 1)), "at most 16"),
    ("smoke-atol-range", _smoke(atol=2.0), "atol"),
    ("smoke-atol-int", _smoke(atol=0), "expected float"),
    ("smoke-empty", _smoke(input=[]), "non-empty"),
    ("smoke-ragged-input", _smoke(input=[[0.0] * 64, [0.0] * 63]), "rows of equal length"),
    ("smoke-ragged-expected", _smoke(expected=[[0.1] * 10, [0.1]]), "rows of equal length"),
    ("smoke-bool", _smoke(expected=[[True]]), "finite numbers"),
    ("smoke-string", _smoke(expected=[["0.1"]]), "finite numbers"),
    ("smoke-unknown", _smoke(note="x"), "unexpected fields"),
    ("stats-not-object", _set(reference_stats=[]), "reference_stats"),
]


@pytest.mark.parametrize(("edit", "match"), [(e, m) for _, e, m in BAD], ids=[i for i, _, _ in BAD])
def test_validation_errors(edit: Any, match: str) -> None:
    d = valid()
    edit(d)
    with pytest.raises(DecodeError, match=match):
        Manifest.decode(canonical_json(d))


@pytest.mark.parametrize(("raw", "error"), [
    (b"\x00", DecodeError),
    (b"[]", DecodeError),
    (b'{"sequence":1,"sequence":2}', DecodeError),
    (b'{"smoke":[{"input":[[NaN]]}]}', DecodeError),
    (b" " * (MAX_MANIFEST + 1), TooLargeError),
])
def test_bytes_that_are_not_a_manifest(raw: bytes, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        Manifest.decode(raw)
    assert type(info.value) is error


def test_manifest_is_compact() -> None:
    """Canonical bytes: sorted keys, no whitespace (what gets signed)."""
    raw = Manifest.decode(canonical_json(valid())).encode()
    assert b" " not in raw and list(json.loads(raw)) == sorted(valid())
