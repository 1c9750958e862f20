"""The windowed download state machine against a real part file, without a broker.

Segments here are random bytes standing in for ciphertext: ``Download`` checks them against the
manifest's hashes and writes them at their offsets; it never decrypts.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from pathlib import Path

import pytest
from edgefleet.agent.download import Download
from edgefleet.protocol.errors import StoreError
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import ChunkReply
from edgefleet.protocol.segments import TAG_SIZE

BUNDLE = "ab" * 16
REPLY_TO = "ef/v1/dev/dev-a/chunk"


def manifest_of(segments: list[bytes], segment_size: int) -> Manifest:
    """A manifest whose segment hashes and sizes describe ``segments``."""
    total = sum(map(len, segments))
    return Manifest(
        bundle_id=BUNDLE,
        name="m",
        format="onnx",
        sequence=1,
        model_version="1",
        created=1,
        expires=2,
        targets={"dev-a": "00" * 32},
        inputs=(),
        outputs=(),
        plaintext_size=total - TAG_SIZE * len(segments),
        plaintext_sha256="00" * 32,
        segment_size=segment_size,
        payload_size=total,
        segment_hashes=tuple(hashlib.sha256(s).hexdigest() for s in segments),
    )


def random_segments(n: int, segment_size: int = 1024, last: int = 100) -> list[bytes]:
    full = segment_size + TAG_SIZE
    return [secrets.token_bytes(full) for _ in range(n - 1)] + [secrets.token_bytes(last)]


def reply(i: int, data: bytes, corr: str = "c") -> ChunkReply:
    return ChunkReply(bundle_id=BUNDLE, index=i, corr=corr, data=data)


def indexes(requests: list) -> list[int]:  # type: ignore[type-arg]
    return [i for r in requests for i in r.indexes]


@pytest.fixture
def segs() -> list[bytes]:
    return random_segments(20)


@pytest.fixture
def dl(tmp_path: Path, segs: list[bytes]) -> Download:
    d = Download(manifest_of(segs, 1024), tmp_path / "b.part", REPLY_TO, window=4, timeout=10.0)
    yield d  # type: ignore[misc]
    d.close()


def test_window_is_filled_in_order_and_never_exceeded(dl: Download, segs: list[bytes]) -> None:
    assert indexes(dl.pump(0.0)) == [0, 1, 2, 3]
    assert dl.pump(1.0) == []  # window full, nothing timed out
    assert dl.accept(reply(1, segs[1]))
    assert indexes(dl.pump(2.0)) == [4]
    # Everything outstanding times out: re-sent, and the window does not grow with it.
    for now in (20.0, 40.0, 60.0):
        assert sorted(indexes(dl.pump(now))) == [0, 2, 3, 4]
        assert len(dl.outstanding) == 4
    assert dl.stats.requests == 5 + 3 * 4


def test_resend_all_re_requests_every_outstanding_chunk(dl: Download) -> None:
    first = indexes(dl.pump(0.0))
    assert dl.pump(0.5) == []
    dl.resend_all()
    assert indexes(dl.pump(1.0)) == first
    assert dl.pump(1.5) == []


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: b"\0" * len(data),  # right length, wrong bytes
        lambda data: data[:-1],  # short
        lambda data: data + b"\0",  # long
    ],
    ids=["hash", "short", "long"],
)
def test_bad_chunk_is_rejected_and_asked_for_again_first(
    dl: Download, segs: list[bytes], corrupt: object
) -> None:
    dl.pump(0.0)
    assert not dl.accept(reply(2, corrupt(segs[2])))  # type: ignore[operator]
    assert dl.stats.rejected == 1 and 2 in dl.missing and 2 not in dl.outstanding
    assert indexes(dl.pump(0.1)) == [2]  # at once, not after the timeout
    assert dl.pump(0.2) == []


def test_duplicates_and_foreign_replies_are_rejected(dl: Download, segs: list[bytes]) -> None:
    dl.pump(0.0)
    assert dl.accept(reply(0, segs[0]))
    assert not dl.accept(reply(0, segs[0]))  # a re-send crossed the reply
    assert not dl.accept(ChunkReply(bundle_id="cd" * 16, index=1, corr="c", data=segs[1]))
    assert dl.stats.rejected == 2 and dl.stats.fetched == 1


def refused(i: int) -> ChunkReply:
    return ChunkReply(bundle_id=BUNDLE, index=i, corr="forged", status="refused", reason="no")


def test_refusals_never_end_the_download_they_back_off(dl: Download, segs: list[bytes]) -> None:
    """Chunk frames are unsigned: a refusal (forged or not) only delays that request."""
    assert indexes(dl.pump(0.0)) == [0, 1, 2, 3]
    for _ in range(5):  # repeats of one refusal count once: they cannot stretch the back-off
        assert not dl.accept(refused(0))
    assert dl.refusals == 1 and dl.backoff == 10.0
    assert not dl.accept(refused(7))  # never asked for: not counted
    assert dl.refusals == 1
    assert indexes(dl.pump(0.0)) == []
    assert sorted(indexes(dl.pump(10.0))) == [0, 1, 2, 3]  # the back-off (= timeout) is over
    assert not dl.accept(refused(0)) and not dl.accept(refused(1))
    assert dl.refusals == 3 and dl.backoff == 40.0
    assert indexes(dl.pump(10.0)) == []  # the next turn: 0 and 1 wait 40 s from now
    assert sorted(indexes(dl.pump(20.0))) == [2, 3]  # timed out; 0 and 1 wait for the back-off
    assert {0, 1}.isdisjoint(indexes(dl.pump(49.0)))
    assert {0, 1} <= set(indexes(dl.pump(50.0)))
    assert dl.accept(reply(0, segs[0]))  # a genuine chunk is taken, refused or not
    assert dl.refusals == 0 and dl.backoff == 0.0
    for i in range(1, len(segs)):
        assert dl.accept(reply(i, segs[i]))
    assert dl.done


def test_the_back_off_is_bounded(dl: Download) -> None:
    now = 0.0
    for _ in range(40):
        assert len(indexes(dl.pump(now))) == 4  # still asking, every time
        for i in list(dl.outstanding):
            dl.accept(refused(i))
        assert dl.pump(now) == []
        now += dl.backoff
    assert dl.refusals == 160 and dl.backoff == dl.max_backoff == 300.0


def test_completes_in_any_order_and_resumes_from_disk(tmp_path: Path) -> None:
    segs = random_segments(9)
    m = manifest_of(segs, 1024)
    part = tmp_path / "b.part"
    d = Download(m, part, REPLY_TO, window=3)
    for i in (8, 0, 4):  # unsolicited but valid: written all the same
        assert d.accept(reply(i, segs[i]))
    assert d.bytes_done == len(segs[8]) + len(segs[0]) + len(segs[4])
    d.close()

    again = Download(m, part, REPLY_TO, window=3)
    assert again.stats.reused == 3 and again.missing == {1, 2, 3, 5, 6, 7}
    assert again.bytes_done == len(segs[8]) + len(segs[0]) + len(segs[4])
    while not again.done:
        for i in indexes(again.pump(0.0)):
            assert again.accept(reply(i, segs[i]))
    assert again.bytes_done == m.payload_size
    assert part.read_bytes() == b"".join(segs)
    assert again.read(0, 10) == segs[0][:10]
    again.close()


@pytest.mark.timeout(60)
def test_half_a_million_kib_of_small_segments_is_linear(tmp_path: Path) -> None:
    """512 MiB in 1 KiB segments is ~500k chunks: each pump/accept must be O(window).
    100k segments here (the old code sorted the missing set on every pump: minutes)."""
    n, seg = 100_000, b"\x5a" * (1024 + TAG_SIZE)  # one segment repeated: one hash to compute
    m = manifest_of([seg] * (n - 1) + [seg[:50]], 1024)
    d = Download(m, tmp_path / "big.part", REPLY_TO, window=16)
    data = {0: seg, n - 1: seg[:50]}
    sent = 0
    while not d.done:
        requests = d.pump(0.0)
        assert requests and len(d.outstanding) <= 16
        for i in indexes(requests):
            sent += 1
            assert d.accept(reply(i, data.get(i, seg)))
            assert d.bytes_done == m.segment_span(i)[0] + m.segment_span(i)[1]  # in order
    d.close()
    assert sent == n and d.stats.fetched == n and d.stats.requests == n
    assert d.bytes_done == m.payload_size == (tmp_path / "big.part").stat().st_size


# -- OS errors on the part file ----------------------------------------------------------------


def test_disk_full_while_writing_raises_store_error(
    dl: Download, segs: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*_: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    dl.pump(0.0)
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(StoreError, match="No space left on device") as info:
        dl.accept(reply(0, segs[0]))
    assert info.value.code == "store"
    assert 0 in dl.missing and dl.bytes_done == 0


def test_disk_full_when_preallocating_raises_store_error(
    tmp_path: Path, segs: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "ftruncate", full)
    with pytest.raises(StoreError, match="No space left"):
        Download(manifest_of(segs, 1024), tmp_path / "b.part", REPLY_TO)


def test_unwritable_part_path_raises_store_error(tmp_path: Path, segs: list[bytes]) -> None:
    with pytest.raises(StoreError, match="open failed"):
        Download(manifest_of(segs, 1024), tmp_path / "no-such-dir" / "b.part", REPLY_TO)


def test_read_error_raises_store_error(dl: Download, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "pread", broken)
    with pytest.raises(StoreError, match="Input/output error"):
        dl.read(0, 10)
