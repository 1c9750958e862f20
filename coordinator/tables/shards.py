"""Registry table: the further signed manifests of a release or candidate (manifest shards).

A release's manifest is signed per shard of its targets (``protocol.build``): each shard names
at most ``shard_size`` devices, in device id order. The first shard is the one the release's
own row holds (``releases.manifest``/``signature``, or ``candidate_releases``'), as every
release before sharding had it; shards 1.. are rows here, each with the first device id it
names, so a device's shard is the last whose ``first_target`` is not above its id. A release
of one shard (every release made before this table) has no rows here.

Rows are keyed by sequence, which releases and candidates take from one counter, so the table
serves both (no foreign key: a candidate's sequence is not in ``releases``).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

from edgefleet.protocol.build import BuiltRelease
from sqlalchemy import BigInteger, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from .base import Base

__all__ = ["ManifestShard", "ShardMap", "shard_rows"]


class ManifestShard(Base):
    __tablename__ = "manifest_shards"
    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)  # >= 1
    first_target: Mapped[str] = mapped_column(String(64))  # the lowest device id it names
    manifest: Mapped[bytes] = mapped_column(LargeBinary)  # bytes as signed
    signature: Mapped[bytes] = mapped_column(LargeBinary)


def shard_rows(sequence: int, built: BuiltRelease) -> list[ManifestShard]:
    """The rows of ``built``'s shards after the first (which the release row holds)."""
    return [
        ManifestShard(sequence=sequence, shard=i, first_target=s.first_target,
                      manifest=s.raw, signature=s.signature)
        for i, s in enumerate(built.shards) if i
    ]  # fmt: skip


@dataclass(frozen=True)
class ShardMap:
    """Which signed manifest (bytes, signature) names which device of one release."""

    firsts: tuple[str, ...]  # "" for the first shard: it covers every id below the second's
    signed: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def of(cls, manifest: bytes, signature: bytes, rows: Iterable[ManifestShard]) -> ShardMap:
        ordered = sorted(rows, key=lambda r: r.shard)
        firsts = ("", *(r.first_target for r in ordered))
        return cls(firsts, ((manifest, signature), *((r.manifest, r.signature) for r in ordered)))

    def __call__(self, device_id: str) -> tuple[bytes, bytes]:
        return self.signed[bisect_right(self.firsts, device_id) - 1]
