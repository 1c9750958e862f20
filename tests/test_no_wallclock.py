"""No test asserts on wall-clock time or speed (issue 7): a loaded machine is not a bug.

An AST scan of every test module: an ``assert`` that compares (``<``, ``<=``, ``>``, ``>=``) an
expression mentioning a clock (``perf_counter``, ``monotonic``, ``time.time``) or a name like
``elapsed``/``duration``/``took`` fails here. Timings belong in ``bench/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
CLOCKS = {"perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "process_time"}
TIMING_NAMES = {"elapsed", "duration", "took", "seconds_taken"}


def _mentions_clock(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and sub.attr in CLOCKS:
            return True
        if isinstance(sub, ast.Attribute) and sub.attr == "time" and isinstance(
                sub.value, ast.Name) and sub.value.id == "time":
            return True
        if isinstance(sub, ast.Name) and (sub.id in CLOCKS or sub.id in TIMING_NAMES):
            return True
    return False


def wallclock_asserts(source: str) -> list[int]:
    """Lines of asserts that order-compare something timed."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assert):
            continue
        for cmp in (n for n in ast.walk(node.test) if isinstance(n, ast.Compare)):
            ordered = any(isinstance(op, (ast.Lt, ast.LtE, ast.Gt, ast.GtE)) for op in cmp.ops)
            if ordered and _mentions_clock(cmp):
                found.append(node.lineno)
    return found


#: (source, lines the scan must flag): kept out of assert statements of this file's own
A = "assert"  # spelled apart: text scanners of this file must not take samples for asserts
SAMPLES = [
    (f"{A} elapsed < 10.0\n", [1]),
    (f"t = 1\n{A} time.perf_counter() - t <= 2\n", [2]),
    (f"{A} time.time() - t0 > 0\n", [1]),
    (f"{A} n < 10\n{A} deadline == time.monotonic()\n", []),
]


@pytest.mark.parametrize(("source", "flagged"), SAMPLES)
def test_the_scan_finds_what_it_should(source: str, flagged: list[int]) -> None:
    assert wallclock_asserts(source) == flagged


def test_no_test_asserts_on_wall_clock_time() -> None:
    hits = [f"{p.relative_to(TESTS)}:{line}" for p in sorted(TESTS.rglob("*.py"))
            if p.name != Path(__file__).name
            for line in wallclock_asserts(p.read_text())]
    assert hits == [], f"timing assertions (move them to bench/): {hits}"
