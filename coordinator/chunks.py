"""The chunk server's decisions, free of MQTT: who may have which chunk of which release.

A request is answered only for a device that is a target of the release, only on that
device's own chunk topic, and only for indexes that exist. Release facts are cached in
memory (they never change once signed), so a request costs one dictionary lookup and one
positioned read from the content-addressed payload blob.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgefleet.protocol import topics
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import ChunkReply, ChunkRequest

__all__ = ["ChunkServer", "ReleaseFacts"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReleaseFacts:
    sequence: int
    targets: frozenset[str]
    manifest: Manifest
    payload_path: Path


class ChunkServer:
    """Answers chunk requests; ``lookup(bundle_id)`` loads release facts on a cache miss."""

    def __init__(self, lookup: Callable[[str], ReleaseFacts | None]) -> None:
        self._lookup = lookup
        self._cache: dict[str, ReleaseFacts] = {}  # only real releases: ids come from devices
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.sent_chunks = 0
        self.sent_bytes = 0
        self.refused = 0

    def facts(self, bundle_id: str) -> ReleaseFacts | None:
        with self._lock:
            facts = self._cache.get(bundle_id)
            if facts is None and len(bundle_id) == 32:
                facts = self._lookup(bundle_id)
                if facts is not None:
                    self._cache[bundle_id] = facts
            return facts

    def answer(self, device_id: str, req: ChunkRequest) -> list[ChunkReply]:
        """Replies for one request (refusals included); the caller publishes them to
        ``req.reply_to``, which this has checked is the device's own chunk topic."""

        def refuse(reason: str) -> list[ChunkReply]:
            self.refused += 1
            log.warning("refused chunk request from %s: %s", device_id, reason)
            return [
                ChunkReply(
                    bundle_id=req.bundle_id, index=i, corr=req.corr, status="refused", reason=reason
                )
                for i in req.indexes
            ]

        if req.reply_to != topics.chunk(device_id):
            return []  # never publish where the requester points us; drop silently
        facts = self.facts(req.bundle_id)
        if facts is None:
            return [
                ChunkReply(
                    bundle_id=req.bundle_id,
                    index=i,
                    corr=req.corr,
                    status="unknown",
                    reason="no such release",
                )
                for i in req.indexes
            ]
        if device_id not in facts.targets:
            return refuse(f"{device_id} is not a target of release {facts.sequence}")
        replies = []
        for i in req.indexes:
            if not 0 <= i < facts.manifest.segments:
                self.refused += 1
                replies.append(
                    ChunkReply(
                        bundle_id=req.bundle_id,
                        index=i,
                        corr=req.corr,
                        status="refused",
                        reason=f"index {i} out of range",
                    )
                )
                continue
            off, length = facts.manifest.segment_span(i)
            data = os.pread(self._fd(facts.payload_path), length, off)
            self.sent_chunks += 1
            self.sent_bytes += len(data)
            replies.append(ChunkReply(bundle_id=req.bundle_id, index=i, corr=req.corr, data=data))
        return replies

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
