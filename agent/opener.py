"""Opening a release's segments into the staged model file: verify, decrypt, write by offset.

Each encrypted segment is read from a ``SegmentSource``, checked once against the SHA-256 the
manifest signs (skipped when the source says every segment was verified as it arrived, as a
finished ``Download`` does: its bytes were hashed against the same signed hashes on arrival),
opened with AES-GCM and written at its plaintext offset with ``os.pwrite``, so completion
order does not matter. Every few MiB written, the kernel is asked to start writing them to
disk (``start_writeback``), so the disk works while the CPU decrypts and the one fsync at the
end waits for little more than the tail.

With more than one worker, segments are opened by a bounded thread pool (``AESGCM`` and
``hashlib`` release the GIL on large buffers, so two threads come close to two cores). At most
``in_flight`` segments are read ahead (bounded memory: each holds its ciphertext and
plaintext). Results are taken in index order, so the error raised is that of the lowest
failing segment, the same one a sequential open raises, and every worker has stopped before
it leaves: nothing writes into the staged file afterwards. A device with one core opens
sequentially, with no thread at all.

Why one hash per segment is enough: the manifest signs each segment's ciphertext hash, so a
segment that passes is the one the release key signed; its AES-GCM tag then proves the key is
right too, and the key comes from the envelope whose digest the manifest also signs. The
plaintext is thus fixed by signed bytes. The signed plaintext digest is still checked (it
catches a bug in our own offsets, and a manifest whose signed fields disagree), where it
costs least: with workers, by this thread as the segments come back (it would otherwise
only wait for them); on one core, by reading the staged file back while it is fsynced
(``plaintext_check``), where the device would otherwise only wait for the disk.
"""

from __future__ import annotations

import collections
import hashlib
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from edgefleet.infra.fsutil import start_writeback
from edgefleet.protocol.errors import IntegrityError
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.segments import SegmentCipher

__all__ = ["MAX_WORKERS", "SegmentOpener", "SegmentSource", "default_workers", "plaintext_check"]

MAX_WORKERS = 4  # threads; more buy nothing on the devices we target, memory grows with them
IN_FLIGHT_BYTES = 16 * 1024 * 1024  # read-ahead cap (ciphertext + plaintext) with a pool
_READ_BACK = 1024 * 1024  # bytes per read when hashing the staged file back
WRITEBACK_BYTES = 4 * 1024 * 1024  # start writing the staged file back every this many bytes


class SegmentSource(Protocol):
    def read(self, offset: int, length: int) -> bytes: ...


def default_workers() -> int:
    """One worker per core this process may run on, at most ``MAX_WORKERS``; 1 (sequential)
    on a single core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


class SegmentOpener:
    """Opens the segments of one verified manifest with its content key."""

    def __init__(self, manifest: Manifest, cipher: SegmentCipher, *, verified: bool) -> None:
        self.manifest, self._cipher, self._verified = manifest, cipher, verified

    def open(self, index: int, ct: bytes) -> bytes:
        """Segment ``index``'s plaintext; ``IntegrityError`` / ``DecryptError`` if it is not
        the signed one."""
        m = self.manifest
        length = m.segment_span(index)[1]
        if len(ct) != length or not (self._verified or _sha256(ct) == m.segment_hashes[index]):
            raise IntegrityError(
                f"segment {index}: expected {length} bytes with SHA-256 "
                f"{m.segment_hashes[index][:16]}…, saw {len(ct)} bytes "
                f"hashing to {_sha256(ct)[:16]}…"
            )
        return self._cipher.open(index, ct, final=index == m.segments - 1)

    def _one(self, source: SegmentSource, fd: int, index: int) -> bytes:
        offset, length = self.manifest.segment_span(index)
        plain = self.open(index, source.read(offset, length))
        _pwrite_all(fd, plain, index * self.manifest.segment_size)
        return plain

    def open_into(
        self,
        source: SegmentSource,
        fd: int,
        *,
        workers: int = 1,
        done: Callable[[int], None] = lambda index: None,
    ) -> tuple[int, str | None]:
        """Open every segment into ``fd`` at its offset; return the plaintext bytes written
        and, with workers, the plaintext's SHA-256 (hex; else None: check the file with
        ``plaintext_check`` while it is fsynced).

        With workers this thread, otherwise only waiting for them, hashes each segment's
        plaintext in order as it comes back: the digest runs beside the workers, not after
        them. ``done(i)`` is called in this thread, in index order, once segment ``i`` is
        written (a checkpoint, progress). OS errors leave as ``OSError``.
        """
        n = self.manifest.segments
        flush = _Writeback(fd, self.manifest.segment_size)

        def finished(i: int) -> None:
            done(i)
            flush.through(i)

        if workers <= 1 or n == 1:
            written = 0
            for i in range(n):
                written += len(self._one(source, fd, i))
                finished(i)
            return written, None
        return self._parallel(source, fd, workers, finished)

    def _parallel(
        self, source: SegmentSource, fd: int, workers: int, done: Callable[[int], None]
    ) -> tuple[int, str]:
        n, size = self.manifest.segments, self.manifest.segment_size
        in_flight = max(workers, min(2 * workers, IN_FLIGHT_BYTES // (2 * size + 32)))
        pending: collections.deque[Future[bytes]] = collections.deque()
        written = submitted = 0
        digest = hashlib.sha256()
        with ThreadPoolExecutor(workers, thread_name_prefix="segment-open") as pool:
            try:
                for i in range(n):
                    while submitted < n and len(pending) < in_flight:
                        pending.append(pool.submit(self._one, source, fd, submitted))
                        submitted += 1
                    plain = pending.popleft().result()
                    digest.update(plain)  # releases the GIL: beside the workers
                    written += len(plain)
                    done(i)
            finally:  # on an error: queued segments never run, running ones finish first
                for f in pending:
                    f.cancel()
        return written, digest.hexdigest()


class _Writeback:
    """Starts the disk on what is written so far (in index order), every ``WRITEBACK_BYTES``:
    the final fsync then waits for the tail only, and the disk overlaps the decryption."""

    def __init__(self, fd: int, segment_size: int) -> None:
        self._fd, self._size, self._start = fd, segment_size, 0

    def through(self, index: int) -> None:
        end = (index + 1) * self._size  # past the end for the final segment: harmless
        if end - self._start >= WRITEBACK_BYTES:
            start_writeback(self._fd, self._start, end - self._start)
            self._start = end


def plaintext_check(manifest: Manifest, fd: int) -> None:
    """Hash the staged file back (page cache) against the signed plaintext digest.

    Meant to run while the file is being fsynced (``ModelStore.commit``'s ``check``): the
    device waits for the disk then anyway. Raises ``IntegrityError``; ``OSError`` on a read
    error.
    """
    digest, offset, size = hashlib.sha256(), 0, manifest.plaintext_size
    while offset < size:
        block = os.pread(fd, min(_READ_BACK, size - offset), offset)
        if not block:
            break
        digest.update(block)
        offset += len(block)
    seen, got = os.fstat(fd).st_size, digest.hexdigest()
    if offset != size or seen != size or got != manifest.plaintext_sha256:
        raise IntegrityError(
            f"plaintext: expected {size} bytes with SHA-256 {manifest.plaintext_sha256[:16]}…, "
            f"saw {seen} bytes hashing to {got[:16]}…"
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
