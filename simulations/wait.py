"""Waiting for a condition with a deadline: the one ``wait_until`` of tests, bench and demo."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["TIMEOUT", "wait_until"]

T = TypeVar("T")
TIMEOUT = 30.0  # s: upper bound of any single wait; passing runs stay far below it


def wait_until(
    predicate: Callable[[], T], what: str, timeout: float = TIMEOUT, interval: float = 0.02
) -> T:
    """Poll ``predicate`` until it returns something truthy; ``TimeoutError`` naming ``what``
    (and the last value seen) at the deadline. For conditions that live in another process
    or a database; in-process events should be waited on directly."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what} (last: {value!r})")
        time.sleep(interval)
