"""The chunk server's decisions, free of MQTT: who may have which chunk of which release, and
how much chunk work each device may have outstanding.

A request is answered only for a device that is a target of the release, only on that
device's own chunk topic, and only for indexes that exist. Everything a device can make the
coordinator hold is bounded:

- ``ChunkServer``: release facts in an LRU of ``max_releases`` (they never change once
  signed), bundle ids the registry does not know in an LRU of ``max_unknown`` (so a repeated
  random id costs no registry query), payload blobs open in an LRU of ``max_files`` readers
  (closed on eviction: one descriptor per served release, forever, ran out at 1,024).
- ``ChunkQueues``: one queue per device, served round-robin (one device's flood cannot starve
  the others), holding at most ``window`` segments per device queued or being answered; a
  re-send of a request still queued takes its place (and turn), a request that does not fit
  pushes out that device's oldest ones (an agent re-sends what timed out, so its newest
  requests matter), and every discarded request is counted per device.
- ``LookupBudget``: registry lookups of unknown bundle ids per device, a token bucket on an
  injected clock, so random ids cannot turn into one query each.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from edgefleet.protocol import topics
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import ChunkReply, ChunkRequest

__all__ = [
    "ChunkQueues",
    "ChunkServer",
    "LookupBudget",
    "PayloadReader",
    "ReleaseFacts",
]

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, kw_only=True)
class ReleaseFacts:
    sequence: int
    targets: frozenset[str]
    manifest: Manifest
    payload_blob: str  # SHA-256 hex of the encrypted payload in the coordinator's blobs


class PayloadReader(Protocol):
    """An open payload blob: positioned reads, then ``close``."""

    def read_at(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class _Lru(Generic[K, V]):
    """A bounded mapping, least recently used first out; ``evicted`` sees what falls out."""

    def __init__(self, size: int, evicted: Callable[[V], None] | None = None) -> None:
        if size < 1:
            raise ValueError(f"an LRU needs a size >= 1, got {size}")
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._evicted = evicted

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            _, old = self._items.popitem(last=False)
            if self._evicted is not None:
                self._evicted(old)

    def clear(self) -> None:
        while self._items:
            _, old = self._items.popitem(last=False)
            if self._evicted is not None:
                self._evicted(old)

    def __len__(self) -> int:
        return len(self._items)


def _close(reader: PayloadReader) -> None:
    reader.close()


class ChunkServer:
    """Answers chunk requests; ``lookup(bundle_id)`` loads release facts on a cache miss and
    ``open_payload(blob)`` opens a payload for positioned reads."""

    def __init__(
        self,
        lookup: Callable[[str], ReleaseFacts | None],
        open_payload: Callable[[str], PayloadReader],
        *,
        max_releases: int = 64,
        max_unknown: int = 4096,
        max_files: int = 8,
        resend_after: float = 0.5,  # s before the same segment is sent to a device again
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self._open = open_payload
        self._facts: _Lru[str, ReleaseFacts] = _Lru(max_releases)
        self._unknown: _Lru[str, bool] = _Lru(max_unknown)  # ids come from devices: bounded
        self._files: _Lru[str, PayloadReader] = _Lru(max_files, _close)
        self._lock = threading.Lock()
        self._file_lock = threading.Lock()
        self.sent_chunks = 0
        self.sent_bytes = 0
        self.refused = 0
        self.lookups = 0  # registry lookups (cache misses)
        # Amplification: a device that asks for the same segments again and again without
        # reading them makes the broker hold every copy. An agent re-asks only after its
        # request timeout (seconds), so one copy per segment per ``resend_after`` is enough:
        # device -> (bundle id, {index: when sent}); one bundle per device, so bounded.
        self._resend_after, self._clock = resend_after, clock
        self._sent: dict[str, tuple[str, dict[int, float]]] = {}
        self.held_back = 0  # segments not sent again within resend_after

    def cached(self, bundle_id: str) -> bool:
        """True if answering ``bundle_id`` needs no registry lookup."""
        with self._lock:
            return (
                len(bundle_id) != 32
                or self._facts.get(bundle_id) is not None
                or self._unknown.get(bundle_id) is not None
            )

    def facts(self, bundle_id: str) -> ReleaseFacts | None:
        """The release's facts, from the caches or (on a miss) the lookup; lookup errors pass
        through and cache nothing."""
        with self._lock:
            facts = self._facts.get(bundle_id)
            if facts is not None or len(bundle_id) != 32 or self._unknown.get(bundle_id):
                return facts
        self.lookups += 1
        facts = self._lookup(bundle_id)  # outside the lock: the registry may be slow
        with self._lock:
            if facts is None:
                self._unknown.put(bundle_id, True)
            else:
                self._facts.put(bundle_id, facts)
        return facts

    def answer(self, device_id: str, req: ChunkRequest) -> list[ChunkReply]:
        """Replies for one request (refusals included); the caller publishes them to
        ``req.reply_to``, which this has checked is the device's own chunk topic."""
        if req.reply_to != topics.chunk(device_id):
            return []  # never publish where the requester points us; drop silently
        facts = self.facts(req.bundle_id)
        if facts is None:
            return self._replies(req, "unknown", "no such release")
        if device_id not in facts.targets:
            self.refused += 1
            reason = f"{device_id} is not a target of release {facts.sequence}"
            log.warning("refused chunk request from %s: %s", device_id, reason)
            return self._replies(req, "refused", reason)
        return [self._chunk(facts, req, i) for i in self._fresh(device_id, req)]

    def _fresh(self, device_id: str, req: ChunkRequest) -> list[int]:
        """The requested indexes not sent to this device within ``resend_after``."""
        now = self._clock()
        with self._lock:
            bundle, sent = self._sent.get(device_id, ("", {}))
            if bundle != req.bundle_id:
                sent = {}
                self._sent[device_id] = (req.bundle_id, sent)
            fresh = [i for i in req.indexes if now - sent.get(i, -1e18) >= self._resend_after]
            for i in fresh:
                sent[i] = now
            self.held_back += len(req.indexes) - len(fresh)
        return fresh

    @staticmethod
    def _replies(req: ChunkRequest, status: str, reason: str) -> list[ChunkReply]:
        return [
            ChunkReply(bundle_id=req.bundle_id, index=i, corr=req.corr, status=status,
                       reason=reason)
            for i in req.indexes
        ]  # fmt: skip

    def _chunk(self, facts: ReleaseFacts, req: ChunkRequest, i: int) -> ChunkReply:
        if not 0 <= i < facts.manifest.segments:
            self.refused += 1
            return ChunkReply(bundle_id=req.bundle_id, index=i, corr=req.corr,
                              status="refused", reason=f"index {i} out of range")  # fmt: skip
        off, length = facts.manifest.segment_span(i)
        data = self._read(facts.payload_blob, off, length)
        self.sent_chunks += 1
        self.sent_bytes += len(data)
        return ChunkReply(bundle_id=req.bundle_id, index=i, corr=req.corr, data=data)

    def _read(self, blob: str, offset: int, length: int) -> bytes:
        # One lock for open, read and evict: an evicted reader is never read after its close.
        with self._file_lock:
            reader = self._files.get(blob)
            if reader is None:
                reader = self._open(blob)
                self._files.put(blob, reader)
            return reader.read_at(offset, length)

    @property
    def open_files(self) -> int:
        return len(self._files)

    def close(self) -> None:
        with self._file_lock:
            self._files.clear()


class LookupBudget:
    """Registry lookups per device: a bucket of ``burst`` tokens refilled at ``rate`` per
    second of ``clock`` (monotonic seconds)."""

    def __init__(self, *, rate: float, burst: int, clock: Callable[[], float],
                 max_devices: int = 10_000) -> None:  # fmt: skip
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: _Lru[str, tuple[float, float]] = _Lru(max_devices)  # tokens, at

    def allow(self, device_id: str) -> bool:
        now = self._clock()
        tokens, at = self._buckets.get(device_id) or (float(self.burst), now)
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        ok = tokens >= 1.0
        self._buckets.put(device_id, (tokens - 1.0 if ok else tokens, now))
        return ok


@dataclass
class _DeviceQueue:
    requests: collections.deque[ChunkRequest]
    queued: int = 0  # segments waiting
    busy: int = 0  # segments being answered now


class ChunkQueues:
    """Per-device bounded queues of chunk requests, served round-robin.

    ``put`` admits a request (pushing out that device's oldest ones if the window is full);
    ``take`` blocks for the next request in round-robin order; ``done`` frees its segments.
    A device has one request taken at a time (answered in order, even when one waits for a
    registry lookup on another thread), and goes to the back of the ring after it.
    A device holds at most ``window`` segments, queued or being answered; at most
    ``max_devices`` devices have work at once.
    """

    def __init__(self, *, window: int = 16, max_devices: int = 10_000) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1 segment, got {window}")
        self.window = window
        self.max_devices = max_devices
        self._devices: dict[str, _DeviceQueue] = {}
        self._ready: collections.deque[str] = collections.deque()  # devices with queued work
        self._queued_devices: set[str] = set()  # the ids in _ready
        self._cond = threading.Condition()
        self._stopped = False
        self.dropped: collections.Counter[str] = collections.Counter()  # requests, per device
        self.superseded: collections.Counter[str] = collections.Counter()  # of those, re-sends
        self.peak: collections.Counter[str] = collections.Counter()  # segments, per device

    def put(self, device_id: str, req: ChunkRequest) -> int:
        """Queue ``req``; return how many requests of this device were discarded for it."""
        n = len(req.indexes)
        with self._cond:
            q = self._devices.get(device_id)
            if q is None:
                if len(self._devices) >= self.max_devices or n > self.window:
                    self.dropped[device_id] += 1
                    return 1
                q = self._devices[device_id] = _DeviceQueue(collections.deque())
            if self._supersede(device_id, q, req):
                return 0
            discarded = 0
            while q.requests and q.busy + q.queued + n > self.window:
                q.queued -= len(q.requests.popleft().indexes)
                discarded += 1
            if q.busy + q.queued + n > self.window:  # the request alone does not fit
                self.dropped[device_id] += discarded + 1
                self._forget(device_id, q)
                return discarded + 1
            q.requests.append(req)
            q.queued += n
            self.peak[device_id] = max(self.peak[device_id], q.busy + q.queued)
            if not q.busy:  # else ``done`` puts it back in the ring
                self._mark_ready(device_id)
            self.dropped[device_id] += discarded
            return discarded

    def _supersede(self, device_id: str, q: _DeviceQueue, req: ChunkRequest) -> bool:
        """A re-send of a request still queued (same release, same indexes: the device's
        timeout fired while it waited here) takes its place, keeping its turn, instead of
        pushing out older work to be answered twice; the old one counts as discarded."""
        for k, old in enumerate(q.requests):
            if old.indexes == req.indexes and old.bundle_id == req.bundle_id:
                q.requests[k] = req
                self.dropped[device_id] += 1
                self.superseded[device_id] += 1
                return True
        return False

    def take(self, timeout: float | None = None) -> tuple[str, ChunkRequest] | None:
        """The next request, round-robin over devices; None when stopped or at the timeout."""
        with self._cond:
            while True:
                if not self._cond.wait_for(lambda: self._ready or self._stopped, timeout):
                    return None
                if self._stopped:
                    return None
                device_id = self._ready.popleft()
                self._queued_devices.discard(device_id)
                q = self._devices.get(device_id)
                if q is not None and q.requests:  # else its requests were all discarded
                    break
            req = q.requests.popleft()
            n = len(req.indexes)
            q.queued -= n
            q.busy += n  # one request per device at a time: its requests stay in order
            return device_id, req

    def _mark_ready(self, device_id: str) -> None:
        if device_id not in self._queued_devices:
            self._queued_devices.add(device_id)
            self._ready.append(device_id)
            self._cond.notify()

    def done(self, device_id: str, req: ChunkRequest) -> None:
        """The request taken for ``device_id`` was answered (or given up)."""
        with self._cond:
            q = self._devices.get(device_id)
            if q is not None:
                q.busy -= len(req.indexes)
                if q.requests:
                    self._mark_ready(device_id)  # to the back: the others go first
                self._forget(device_id, q)

    def _forget(self, device_id: str, q: _DeviceQueue) -> None:
        if not q.requests and not q.busy:
            del self._devices[device_id]

    def pending(self, device_id: str) -> int:
        """Segments of ``device_id`` queued or being answered."""
        with self._cond:
            q = self._devices.get(device_id)
            return 0 if q is None else q.busy + q.queued

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
