"""The chunk server's bounds without a broker: per-device windows served round-robin, bounded
caches of release facts and of unknown bundle ids, the per-device lookup budget."""

from __future__ import annotations

import itertools

import pytest
from edgefleet.coordinator.chunks import ChunkQueues, ChunkServer, LookupBudget, ReleaseFacts
from edgefleet.protocol import topics
from edgefleet.protocol.messages import ChunkRequest

BID = "ab" * 16


def req(device: str, *indexes: int, bundle_id: str = BID, corr: str = "c") -> ChunkRequest:
    return ChunkRequest(bundle_id=bundle_id, indexes=indexes, reply_to=topics.chunk(device),
                        corr=corr)


def test_a_device_holds_at_most_its_window_and_its_oldest_requests_go_first() -> None:
    q = ChunkQueues(window=16)
    for n in range(300):  # the amplification attack: 300 requests of 16 indexes
        q.put("rogue", req("rogue", *range(16), corr=str(n)))
        assert q.pending("rogue") <= 16
    assert q.dropped["rogue"] == 299 and q.peak["rogue"] == 16
    device, got = q.take(timeout=0) or ("", req("x", 0))
    assert (device, got.corr) == ("rogue", "299")  # the newest one was kept
    q.done(device, got)
    assert q.pending("rogue") == 0 and q.take(timeout=0) is None


def test_requests_that_do_not_fit_are_dropped_and_counted() -> None:
    q = ChunkQueues(window=4)
    q.put("a", req("a", 0, 1, 2))
    taken = q.take(timeout=0)
    assert taken is not None
    assert q.put("a", req("a", 3, 4)) == 1  # 3 being answered + 2 > 4: nothing to push out
    assert q.dropped["a"] == 1 and q.pending("a") == 3
    assert q.put("a", req("a", 5)) == 0 and q.pending("a") == 4


def test_devices_are_served_round_robin_and_each_in_order() -> None:
    q = ChunkQueues(window=16)
    for i in range(10):
        q.put("flood", req("flood", i, corr=f"f{i}"))
    q.put("a", req("a", 0, corr="a0"))
    q.put("a", req("a", 1, corr="a1"))
    q.put("b", req("b", 0, corr="b0"))
    order = []
    while (item := q.take(timeout=0)) is not None:
        order.append(item[1].corr)
        q.done(*item)
    assert order[:5] == ["f0", "a0", "b0", "f1", "a1"]  # the flood waits its turn
    assert [c for c in order if c.startswith("f")] == [f"f{i}" for i in range(10)]


def test_a_device_gets_one_request_at_a_time() -> None:
    q = ChunkQueues(window=16)
    q.put("a", req("a", 0, corr="a0"))
    q.put("a", req("a", 1, corr="a1"))
    first = q.take(timeout=0)
    assert first is not None and q.take(timeout=0) is None  # a0 still being answered
    q.done(*first)
    second = q.take(timeout=0)
    assert second is not None and second[1].corr == "a1"


def test_a_resent_request_replaces_its_queued_copy_and_keeps_its_turn() -> None:
    q = ChunkQueues(window=4)
    q.put("a", req("a", 0, corr="0.1"))  # taken: being answered
    first = q.take(timeout=0)
    assert first is not None
    for i in (1, 2, 3):
        q.put("a", req("a", i, corr=f"{i}.1"))
    assert q.put("a", req("a", 1, corr="1.2")) == 0  # the device's timeout fired: a re-send
    assert q.pending("a") == 4 and q.dropped["a"] == 1 and q.superseded["a"] == 1
    q.done(*first)
    order = []
    while (item := q.take(timeout=0)) is not None:
        order.append(item[1].corr)
        q.done(*item)
    assert order == ["1.2", "2.1", "3.1"]  # nothing pushed out, each index answered once


def test_stop_wakes_a_waiting_taker() -> None:
    q = ChunkQueues()
    q.stop()
    assert q.take(timeout=None) is None


@pytest.mark.parametrize("window", [0, -1])
def test_a_window_must_hold_a_segment(window: int) -> None:
    with pytest.raises(ValueError, match="window must be >= 1"):
        ChunkQueues(window=window)


class CountingLookup:
    """A fake registry: which bundle ids exist, and how often it was asked."""

    def __init__(self, known: dict[str, ReleaseFacts]) -> None:
        self.known = known
        self.calls = 0

    def __call__(self, bundle_id: str) -> ReleaseFacts | None:
        self.calls += 1
        return self.known.get(bundle_id)


def never_open(blob: str) -> object:
    raise AssertionError("no payload should be read")


def test_unknown_bundle_ids_cost_one_lookup_each_and_the_cache_is_bounded() -> None:
    lookup = CountingLookup({})
    server = ChunkServer(lookup, never_open, max_unknown=8)  # type: ignore[arg-type]
    ids = [f"{n:032x}" for n in range(20)]
    for bundle_id in ids[:8]:
        for _ in range(5):  # repeats are answered from the negative cache
            [reply] = server.answer("dev-a", req("dev-a", 0, bundle_id=bundle_id))
            assert reply.status == "unknown"
    assert lookup.calls == 8 and server.lookups == 8
    assert all(server.cached(b) for b in ids[:8])
    for bundle_id in ids[8:]:
        server.answer("dev-a", req("dev-a", 0, bundle_id=bundle_id))
    assert not server.cached(ids[0]) and server.cached(ids[-1])  # bounded: oldest forgotten
    assert lookup.calls == 20


def test_lookup_errors_are_not_cached() -> None:
    calls = itertools.count()

    def failing(bundle_id: str) -> ReleaseFacts | None:
        next(calls)
        raise OSError("locked")

    server = ChunkServer(failing, never_open)  # type: ignore[arg-type]
    for _ in range(2):
        with pytest.raises(OSError):
            server.facts(BID)
    assert next(calls) == 2 and not server.cached(BID)


def test_the_lookup_budget_refills_on_the_injected_clock() -> None:
    now = [100.0]
    budget = LookupBudget(rate=2.0, burst=3, clock=lambda: now[0])
    assert [budget.allow("rogue") for _ in range(5)] == [True, True, True, False, False]
    assert budget.allow("dev-b")  # a budget per device
    now[0] += 1.0  # two more tokens
    assert [budget.allow("rogue") for _ in range(3)] == [True, True, False]


class _Manifest:
    segments = 4

    @staticmethod
    def segment_span(i: int) -> tuple[int, int]:
        return i * 8, 8


class _Payload:
    def read_at(self, offset: int, length: int) -> bytes:
        return bytes([offset // 8]) * length

    def close(self) -> None:
        pass


def test_a_segment_is_not_sent_to_the_same_device_again_within_resend_after() -> None:
    """Amplification: asking for the same segments over and over without reading them gets
    one copy per ``resend_after``; an agent's re-request (after its timeout) is answered."""
    now = [100.0]
    facts = ReleaseFacts(sequence=1, targets=frozenset({"dev-a", "dev-b"}),
                         manifest=_Manifest(), payload_blob="p")  # type: ignore[arg-type]
    server = ChunkServer(lambda _b: facts, lambda _blob: _Payload(), resend_after=0.5,
                         clock=lambda: now[0])
    assert [r.index for r in server.answer("dev-a", req("dev-a", 0, 1))] == [0, 1]
    assert server.answer("dev-a", req("dev-a", 0, 1)) == []  # the same again at once: held
    assert [r.index for r in server.answer("dev-a", req("dev-a", 1, 2))] == [2]
    assert [r.index for r in server.answer("dev-b", req("dev-b", 0, 1))] == [0, 1]  # per device
    assert server.held_back == 3
    now[0] += 0.5
    assert [r.index for r in server.answer("dev-a", req("dev-a", 0, 1))] == [0, 1]  # later
    assert server.answer("dev-a", req("dev-a", 0, 1, bundle_id="cd" * 16))[0].data == b"\0" * 8
