"""Fuzz-case generation for ``simulations.fuzz``: mutations of valid encodings. Pure.

``generate(rng, seeds, pool, inner)`` makes one input from a target's valid encodings: byte
mutations (bit flips, byte sets, truncation, deletion, insertion of random bytes or of
``TOKENS``, splices with another encoding from ``pool``), JSON mutations (a node replaced by
an odd value, removed, added, duplicated as a repeated key; raw ``NaN``/``1e400`` literals and
deep nesting), mutations of the JSON parts of a framed format re-framed by ``inner``, or
random bytes. Every choice comes from ``rng``: the same seed gives the same inputs.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["TOKENS", "Inner", "generate"]

#: a framed format's JSON parts, and a function that frames replacements of them again
Inner = Callable[[bytes], tuple[list[bytes], Callable[[list[bytes]], bytes]]]

# fmt: off
#: spliced into encodings: non-JSON numbers, huge numbers, bad UTF-8, surrogates, nesting
TOKENS = (
    b"NaN", b"-Infinity", b"Infinity", b"1e400", b"-1e400", b"1e39", b"-0", b"-0.0", b"0e0",
    b"1" * 4400, b"9" * 400, b"18446744073709551616", b"-9223372036854775809", b"1.0e-400",
    b'"\\ud800"', b'"\\udfff\\ud800"', b'"\\u0000"', b"\xc0\x80", b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80", b"\xef\xbb\xbf", b"\xff", b"\x00", b"true", b"false", b"null",
    b'""', b"[]", b"{}", b"[" * 3000, b"]" * 50, b'{"a":' * 3000, b",", b":", b'"', b"\\",
    b"{", b"}", b'"type":"x",', b'"schema_version":1,',
)
#: what a JSON node may be replaced with
_VALUES: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30,
    10**400, 1.5, -0.0, 1e308, 1e-320, "", "x" * 5000, "é", "\ud800", "\x00", "a/b/#/+",
    "0" * 32, "f" * 64, [], {}, [0] * 300, [[]], {"": None},
)
_BYTES = (0, 0xFF, 0x7F, 0x80, 0x22, 0x5C, 0x7B, 0x5B)
# fmt: on


@dataclass(frozen=True)
class _Raw:
    """JSON text to emit as is (NaN, 1e400, deep nesting) in ``_dump``."""

    text: str


@dataclass(frozen=True)
class _Dup:
    """An object with a repeated key."""

    pairs: tuple[tuple[str, Any], ...]


def _dump(v: Any) -> str:
    if isinstance(v, _Raw):
        return v.text
    if isinstance(v, _Dup):
        return "{" + ",".join(json.dumps(k) + ":" + _dump(x) for k, x in v.pairs) + "}"
    if isinstance(v, dict):
        return "{" + ",".join(json.dumps(k) + ":" + _dump(x) for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(_dump(x) for x in v) + "]"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 10**300:
        return str(v)  # below Python's 4300-digit str limit
    return json.dumps(v)


def _as_float(x: int | float) -> int | float:
    return float(x) if abs(x) < 1e308 else x


def _odd_value(rng: random.Random, original: Any) -> Any:
    r = rng.random()
    if r < 0.5:
        return rng.choice(_VALUES)
    if r < 0.65:
        return _Raw(rng.choice(("NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1E39")))
    if r < 0.75:
        depth = rng.choice((40, 900, 5000))
        return _Raw("[" * depth + "]" * depth)
    if r < 0.85 and isinstance(original, str):
        return original + rng.choice(("\ud800", "\u202e", "\U0001f600", "\x7f", "é" * 300))
    if r < 0.92 and isinstance(original, int | float) and not isinstance(original, bool):
        return rng.choice(
            (original + 1, original - 1, -original, original * 2**40, _as_float(original))
        )
    if isinstance(original, str) and original:
        if rng.random() < 0.5:  # base64 or hex: valid alphabet, other content
            return base64.b64encode(rng.randbytes(rng.randrange(0, 100))).decode()
        return original[: rng.randrange(len(original))]
    return rng.choice(_VALUES)


def _json_mutate(rng: random.Random, doc: Any) -> Any:
    """``doc`` with one node replaced, removed, added or duplicated (a new tree)."""
    if isinstance(doc, dict) and doc and rng.random() < 0.6:
        key = rng.choice(list(doc))
        r = rng.random()
        if r < 0.15:
            return {k: v for k, v in doc.items() if k != key}
        if r < 0.25:
            return {**doc, rng.choice(("extra", key + "_", "", "\ud800")): rng.choice(_VALUES)}
        if r < 0.35:
            return _Dup(tuple(doc.items()) + ((key, _odd_value(rng, doc[key])),))
        if r < 0.45:
            return {**doc, key: _odd_value(rng, doc[key])}
        return {**doc, key: _json_mutate(rng, doc[key])}
    if isinstance(doc, list) and doc and rng.random() < 0.6:
        i = rng.randrange(len(doc))
        r = rng.random()
        if r < 0.15:
            return doc[:i] + doc[i + 1 :]
        if r < 0.25:
            return doc + [doc[i]] * rng.choice((1, 2, 100))
        if r < 0.4:
            return doc[:i] + [_odd_value(rng, doc[i])] + doc[i + 1 :]
        return doc[:i] + [_json_mutate(rng, doc[i])] + doc[i + 1 :]
    return _odd_value(rng, doc)


def _mutate_json_bytes(rng: random.Random, data: bytes) -> bytes | None:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        doc = _json_mutate(rng, doc)
    try:
        return _dump(doc).encode("utf-8", "surrogatepass")
    except (ValueError, RecursionError):  # a _Dup nested in a _Dup: give up on this one
        return None


def _mutate_bytes(rng: random.Random, data: bytes, other: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4))):
        op = rng.randrange(7)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            j = min(i, len(b) - 1)
            b[j] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[min(i, len(b) - 1)] = rng.choice((*_BYTES, rng.randrange(256)))
        elif op == 2:
            del b[i:]
        elif op == 3:
            del b[i : i + rng.randrange(1, 64)]
        elif op == 4:
            b[i:i] = rng.choice(TOKENS)
        elif op == 5:
            b[i:i] = rng.randbytes(rng.randrange(1, 32))
        else:
            j = rng.randrange(len(other) + 1)
            b = b[:i] + bytearray(other[j:])
    return bytes(b)


def generate(
    rng: random.Random, seeds: Sequence[bytes], pool: Sequence[bytes], inner: Inner | None
) -> bytes:
    """One input: a mutation of one of ``seeds`` (or random bytes)."""
    seed = rng.choice(seeds)
    r = rng.random()
    if r < 0.05:
        return rng.randbytes(rng.choice((0, 1, 5, 36, 100, 2000)))
    if inner is not None and r < 0.45:
        parts, frame = inner(seed)
        i = rng.randrange(len(parts))
        new = _mutate_json_bytes(rng, parts[i]) if rng.random() < 0.7 else None
        parts[i] = new if new is not None else _mutate_bytes(rng, parts[i], rng.choice(pool))
        return frame(parts)
    if r < 0.65:
        new = _mutate_json_bytes(rng, seed)
        if new is not None:
            return new
    return _mutate_bytes(rng, seed, rng.choice(pool))
