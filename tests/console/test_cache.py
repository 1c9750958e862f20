"""``console.cache._FreshRead``: concurrent requests share generation reads, and none is
answered by a read that started before it arrived."""

from __future__ import annotations

import threading

import pytest
from edgefleet.console.cache import _FreshRead

WAIT = 30.0


def _until(cond: object) -> None:
    """Poll ``cond()`` until it holds (a test rig step, not a timing assertion)."""
    import time

    for _ in range(int(WAIT / 0.001)):
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.001)
    raise AssertionError("the callers never all waited")


def test_a_caller_arriving_during_a_read_waits_for_a_newer_one() -> None:
    value = [0]
    entered, release = threading.Event(), threading.Event()
    reads: list[int] = []

    def read() -> int:
        seen = value[0]  # what the database holds when the read starts
        reads.append(seen)
        if len(reads) == 1:  # hold the first read open
            entered.set()
            assert release.wait(WAIT)
        return seen

    fresh = _FreshRead(read)
    got: dict[str, int] = {}
    first = threading.Thread(target=lambda: got.__setitem__("first", int(fresh())))  # type: ignore[call-overload]
    first.start()
    assert entered.wait(WAIT)
    value[0] = 1  # committed after the first read began: the next caller must see it
    late = threading.Thread(target=lambda: got.__setitem__("late", int(fresh())))  # type: ignore[call-overload]
    late.start()
    release.set()
    first.join(WAIT)
    late.join(WAIT)
    assert got == {"first": 0, "late": 1} and reads == [0, 1]


def test_callers_waiting_together_share_one_read() -> None:
    gate = threading.Event()
    entered = threading.Event()
    calls = [0]

    def read() -> int:
        calls[0] += 1
        entered.set()
        assert gate.wait(WAIT)
        return calls[0]

    fresh = _FreshRead(read)
    results: list[int] = []
    lock = threading.Lock()

    def call() -> None:
        v = int(fresh())  # type: ignore[call-overload]
        with lock:
            results.append(v)

    holder = threading.Thread(target=call)
    holder.start()
    assert entered.wait(WAIT)  # read 1 running; these 8 arrive during it
    waiting = [threading.Thread(target=call) for _ in range(8)]
    for t in waiting:
        t.start()
    _until(lambda: len(fresh._cv._waiters) == 8)  # type: ignore[attr-defined]  # all blocked
    gate.set()  # read 1 ends; one read 2 serves all eight (they arrived before it started)
    for t in [holder, *waiting]:
        t.join(WAIT)
    assert sorted(results) == [1] + [2] * 8 and calls[0] == 2


def test_a_failed_read_raises_in_its_caller_and_the_next_caller_reads_again() -> None:
    outcomes = iter([RuntimeError("database is locked"), 7])

    def read() -> int:
        out = next(outcomes)
        if isinstance(out, Exception):
            raise out
        return out

    fresh = _FreshRead(read)
    with pytest.raises(RuntimeError, match="locked"):
        fresh()
    assert fresh() == 7
