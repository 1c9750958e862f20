"""Canonical JSON bytes and bounded, strict decoding.

Signatures are always checked over the bytes as received; canonical encoding only matters
when *producing* bytes to sign, so that the same content always gives the same bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any

from .errors import DecodeError, TooLargeError

__all__ = ["b64d", "b64e", "canonical_json", "decode_json_object", "hexbytes"]


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, no NaN/Infinity."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DecodeError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise DecodeError(f"JSON constant {name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: Python's json would make it inf
        raise DecodeError(f"JSON number {text:.40} is out of the float64 range")
    return value


# A \uD800-\uDFFF escape: json.loads turns a lone one into a str that cannot be encoded again.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def decode_json_object(data: bytes, *, max_size: int, what: str) -> dict[str, Any]:
    """Decode ``data`` as one JSON object, refusing anything over ``max_size`` bytes first.

    Refused as ``DecodeError`` besides invalid JSON: duplicate keys, NaN/Infinity, numbers
    beyond float64, and lone UTF-16 surrogate escapes (what decodes here encodes again).
    """
    if len(data) > max_size:
        raise TooLargeError(f"{what}: expected at most {max_size} bytes, saw {len(data)}")
    try:
        text = bytes(data).decode("utf-8")
        obj = json.loads(
            text,
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except DecodeError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError(
            f"{what}: expected a UTF-8 JSON object, got invalid JSON ({exc})"
        ) from exc
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except (UnicodeEncodeError, RecursionError) as exc:
            raise DecodeError(
                f"{what}: expected Unicode text, saw a lone surrogate escape"
            ) from exc
    if not isinstance(obj, dict):
        raise DecodeError(f"{what}: expected a JSON object, saw {type(obj).__name__}")
    return obj


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: object, *, what: str, max_len: int | None = None) -> bytes:
    """Strict standard base64 to bytes; any problem is a ``DecodeError``."""
    if not isinstance(text, str):
        raise DecodeError(f"{what}: expected a base64 string, saw {type(text).__name__}")
    if max_len is not None and len(text) > (max_len * 4) // 3 + 4:
        raise DecodeError(f"{what}: expected at most {max_len} bytes of base64")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError(f"{what}: invalid base64 ({exc})") from exc
    if base64.b64encode(raw).decode("ascii") != text:  # e.g. non-zero padding bits
        raise DecodeError(f"{what}: expected canonical base64, saw a non-canonical encoding")
    return raw


def hexbytes(text: object, *, what: str, length: int) -> bytes:
    """Lower-case hex of exactly ``length`` bytes."""
    if not isinstance(text, str) or len(text) != 2 * length or text != text.lower():
        raise DecodeError(f"{what}: expected {2 * length} lower-case hex digits, saw {text!r:.80}")
    try:
        return bytes.fromhex(text)
    except ValueError as exc:
        raise DecodeError(f"{what}: invalid hex") from exc
