"""Small typed accessors for decoding untrusted JSON objects into dataclasses."""

from __future__ import annotations

import re
from collections.abc import Set as AbstractSet
from typing import Any, TypeVar

from .errors import DecodeError

T = TypeVar("T")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def field(d: dict[str, Any], key: str, kind: type[T], what: str) -> T:
    """``d[key]`` if present and of type ``kind`` (bool is never an int here)."""
    if key not in d:
        raise DecodeError(f"{what}: missing field {key!r}")
    value = d[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise DecodeError(f"{what}.{key}: expected {kind.__name__}, saw {type(value).__name__}")
    return value


def name(value: object, what: str) -> str:
    """A name or device id: 1-64 of ``[A-Za-z0-9_.-]``, starting alphanumeric."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise DecodeError(f"{what}: expected a name matching {NAME_RE.pattern}, saw {value!r:.80}")
    return value


def check_keys(d: dict[str, Any], allowed: AbstractSet[str], what: str) -> None:
    unknown = set(d) - allowed
    if unknown:
        raise DecodeError(f"{what}: unexpected fields {sorted(unknown)}")


def check_header(d: dict[str, Any], type_: str, schema_version: int, what: str) -> None:
    if d.get("type") != type_:
        raise DecodeError(f"{what}: expected type {type_!r}, saw {d.get('type')!r:.40}")
    if d.get("schema_version") != schema_version:
        raise DecodeError(
            f"{what}: expected schema_version {schema_version}, saw {d.get('schema_version')!r:.20}"
        )
