"""Resumable, windowed chunk download of one release into a ``.part`` file.

The state machine is driven by the daemon: ``pump(now)`` returns the chunk requests to send
(at most ``window`` outstanding, timed-out ones re-sent), ``accept(reply)`` checks a reply
against the signed segment hash and writes it at its offset. On (re)start the part file is
re-hashed, so only missing chunks are fetched after a crash or restart.

Every segment in the part file was checked against its signed hash on its way in (in
``accept``, or by the re-hash on start), so a finished download says ``verified`` and the
installer does not hash it again. The part file is never fsynced: it is a cache of verified
ciphertext, re-hashed after a crash, and what must survive one is the installed version.

Chunk reply frames are not signed, so a "refused" reply is only a hint (anyone who can get a
frame onto our chunk topic can forge one, and a rogue device can make the coordinator send
them): it never ends the download. The refused request is sent again after a back-off that
doubles with every refusal in a row (``timeout``, × 2, × 4 … up to ``max_backoff``), and a
genuine chunk still arriving meanwhile is taken as usual; a fresh chunk resets the back-off.

Every call costs O(window), not O(segments): a 512 MiB release in 1 KiB segments is half a
million chunks. OS errors on the part file (disk full, I/O error) raise ``StoreError``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.infra.fsutil import os_errors
from edgefleet.protocol.errors import StoreError
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
    max_backoff: float = 300.0  # seconds: the longest wait before re-sending a refused request
    stats: DownloadStats = field(default_factory=DownloadStats)

    def __post_init__(self) -> None:
        self.missing: set[int] = set()
        self.outstanding: dict[int, float] = {}  # index -> when to send it again (monotonic s)
        self._refused: set[int] = set()  # outstanding, refused since last sent: counted once
        self._back_off: set[int] = set()  # of those, the ones the next pump delays
        self._queue: collections.deque[int] = collections.deque()  # missing, not yet requested
        self._done_bytes = 0
        self._attempt = 0
        self.refusals = 0  # refusals in a row (one per request at most); a fresh chunk resets
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

    def _io(self, what: str) -> contextlib.AbstractContextManager[None]:
        """Map OS errors on the part file (ENOSPC, EIO, EACCES...) to ``StoreError``."""
        return os_errors(f"{self.path}: {what} failed")

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
    def verified(self) -> bool:
        """Every segment of the part file matched its signed hash as it was written: the
        installer need not hash them again (True once the download is done)."""
        return self.done

    @property
    def bytes_done(self) -> int:
        return self._done_bytes

    @property
    def backoff(self) -> float:
        """Seconds before a refused request is sent again (0: nothing refused in a row)."""
        if not self.refusals:
            return 0.0
        return float(min(self.max_backoff, self.timeout * 2 ** min(self.refusals - 1, 30)))

    def pump(self, now: float) -> list[ChunkRequest]:
        """Requests to send now: re-send those that timed out, fill the window."""
        for i in self._back_off:  # refused since sent: not before the back-off
            if i in self.outstanding:
                self.outstanding[i] = max(self.outstanding[i], now + self.backoff)
        self._back_off.clear()
        due = [i for i, t in self.outstanding.items() if now >= t]
        fresh: list[int] = []
        while self._queue and len(self.outstanding) + len(fresh) < self.window:
            i = self._queue.popleft()
            if i in self.missing and i not in self.outstanding:  # else answered meanwhile
                fresh.append(i)
        out = []
        for i in due + fresh:
            self._attempt += 1
            self.outstanding[i] = now + self.timeout
            self._refused.discard(i)
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
        """Write a verified chunk; return True if it was new. A refusal only backs off."""
        if reply.bundle_id != self.manifest.bundle_id:
            self.stats.rejected += 1
            return False
        if reply.status != "ok":
            self._refuse(reply)
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
        self._refused.discard(i)
        self._back_off.discard(i)
        self.refusals = 0
        self._done_bytes += length
        self.stats.fetched += 1
        return True

    def _refuse(self, reply: ChunkReply) -> None:
        """Count a refusal of a request under way once; its re-send waits for the back-off."""
        self.stats.rejected += 1
        i = reply.index
        if i not in self.outstanding or i in self._refused:
            return  # not asked for, or counted already: a repeat cannot stretch the back-off
        self._refused.add(i)
        self._back_off.add(i)
        self.refusals += 1
        log.info(
            "chunk %d of %s %s by the coordinator (%.200s); asking again in %.0f s",
            i,
            self.manifest.bundle_id,
            reply.status,
            reply.reason,
            self.backoff,
        )

    def read(self, offset: int, length: int) -> bytes:
        """The part file as the installer's ``SegmentSource`` (thread-safe: ``pread``)."""
        with self._io(f"reading {length} bytes at {offset}"):
            return os.pread(self._fd, length, offset)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError as exc:  # nothing to do about it: the part file is re-hashed anyway
                log.warning("closing %s failed: %s", self.path, exc.strerror or exc)
