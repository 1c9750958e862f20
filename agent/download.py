"""Resumable, windowed chunk download of one release into a ``.part`` file.

The state machine is driven by the daemon: ``pump(now)`` returns the chunk requests to send
(at most ``window`` outstanding, timed-out ones re-sent), ``accept(reply)`` checks a reply
against the signed segment hash and writes it at its offset. On (re)start the part file is
re-hashed, so only missing chunks are fetched after a crash or restart.

Every call costs O(window), not O(segments): a 512 MiB release in 1 KiB segments is half a
million chunks. OS errors on the part file (disk full, I/O error) raise ``StoreError``.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.protocol.errors import StoreError, TransportError
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import ChunkReply, ChunkRequest
from edgefleet.protocol.segments import sha256_hex

__all__ = ["Download", "DownloadStats"]

log = logging.getLogger(__name__)


@dataclass
class DownloadStats:
    reused: int = 0  # segments found intact on disk at start
    fetched: int = 0  # segments received and written
    requests: int = 0  # chunk requests sent (re-sends included)
    rejected: int = 0  # replies dropped (bad hash, unexpected, duplicate)


@dataclass
class Download:
    manifest: Manifest
    path: Path
    reply_to: str
    window: int = 8
    timeout: float = 10.0  # seconds before an outstanding request is sent again
    max_refusals: int = 3
    stats: DownloadStats = field(default_factory=DownloadStats)

    def __post_init__(self) -> None:
        self.missing: set[int] = set()
        self.outstanding: dict[int, float] = {}  # index -> time sent
        self._queue: collections.deque[int] = collections.deque()  # missing, not yet requested
        self._done_bytes = 0
        self._attempt = 0
        self._refusals = 0
        self._fd = -1
        with self._io("open"):
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with self._io("prepare"):
                if os.fstat(self._fd).st_size == self.manifest.payload_size:
                    self._rehash()  # a download interrupted earlier: keep what verifies
                else:  # new (or not ours): nothing on it can verify, so skip hashing zeros
                    os.ftruncate(self._fd, self.manifest.payload_size)
                    self._queue.extend(range(self.manifest.segments))
        except StoreError:
            self.close()
            raise
        self.missing.update(self._queue)

    @contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """Map OS errors on the part file (ENOSPC, EIO, EACCES...) to ``StoreError``."""
        try:
            yield
        except OSError as exc:
            raise StoreError(f"{self.path}: {what} failed: {exc.strerror or exc}") from exc

    def _rehash(self) -> None:
        for i in range(self.manifest.segments):
            off, length = self.manifest.segment_span(i)
            if sha256_hex(os.pread(self._fd, length, off)) == self.manifest.segment_hashes[i]:
                self.stats.reused += 1
                self._done_bytes += length
            else:
                self._queue.append(i)
        if self.stats.reused:
            log.info(
                "resuming %s: %d of %d chunks already on disk",
                self.manifest.bundle_id,
                self.stats.reused,
                self.manifest.segments,
            )

    @property
    def done(self) -> bool:
        return not self.missing

    @property
    def bytes_done(self) -> int:
        return self._done_bytes

    def pump(self, now: float) -> list[ChunkRequest]:
        """Requests to send now: re-send those that timed out, fill the window."""
        due = [i for i, t in self.outstanding.items() if now - t >= self.timeout]
        fresh: list[int] = []
        while self._queue and len(self.outstanding) + len(fresh) < self.window:
            i = self._queue.popleft()
            if i in self.missing and i not in self.outstanding:  # else answered meanwhile
                fresh.append(i)
        out = []
        for i in due + fresh:
            self._attempt += 1
            self.outstanding[i] = now
            self.stats.requests += 1
            out.append(
                ChunkRequest(
                    bundle_id=self.manifest.bundle_id,
                    indexes=(i,),
                    reply_to=self.reply_to,
                    corr=f"{i}.{self._attempt}",
                )
            )
        return out

    def resend_all(self) -> None:
        """After a reconnect: treat every outstanding request as timed out."""
        for i in self.outstanding:
            self.outstanding[i] = float("-inf")

    def accept(self, reply: ChunkReply) -> bool:
        """Write a verified chunk; return True if it was new. Refusals raise after a few."""
        if reply.bundle_id != self.manifest.bundle_id:
            self.stats.rejected += 1
            return False
        if reply.status != "ok":
            self._refusals += 1
            if self._refusals >= self.max_refusals:
                raise TransportError(
                    f"coordinator {reply.status} chunk {reply.index}: {reply.reason}"
                )
            return False
        i = reply.index
        if i not in self.missing:
            self.stats.rejected += 1  # duplicate (a re-send crossed the reply) or unknown index
            return False
        off, length = self.manifest.segment_span(i)
        if len(reply.data) != length or sha256_hex(reply.data) != self.manifest.segment_hashes[i]:
            self.stats.rejected += 1
            log.warning(
                "chunk %d of %s: expected %d bytes matching its signed hash, saw %d bytes "
                "that do not; will re-request",
                i,
                self.manifest.bundle_id,
                length,
                len(reply.data),
            )
            if self.outstanding.pop(i, None) is not None:
                self._queue.appendleft(i)  # ask again at once, not after its timeout
            return False
        with self._io(f"writing chunk {i}"):
            os.pwrite(self._fd, reply.data, off)
        self.missing.discard(i)
        self.outstanding.pop(i, None)
        self._done_bytes += length
        self.stats.fetched += 1
        if self.done:
            with self._io("fsync"):
                os.fsync(self._fd)
        return True

    def read(self, offset: int, length: int) -> bytes:
        """The part file as the installer's ``SegmentSource``."""
        with self._io(f"reading {length} bytes at {offset}"):
            return os.pread(self._fd, length, offset)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError as exc:  # nothing to do about it: the part file is re-hashed anyway
                log.warning("closing %s failed: %s", self.path, exc.strerror or exc)
