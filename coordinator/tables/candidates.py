"""Registry tables: candidate releases (shadow / A/B), kept apart from ``releases``.

A candidate is signed and encrypted like any release (``coordinator.candidates``), but it is
not a row of ``releases``/``release_targets``: those say what each device *should run*
(``fleet status``'s desired release, ``release.keep_newest``), which a candidate never is.
``candidate_releases`` holds the signed parts, the payload blob and each target's key envelope
(``targets``: device id -> envelope JSON), so the chunk server can serve it to its targets.
The sequence comes from the same counter as releases (one anti-rollback order). The content
key is not kept: a candidate is built again for devices enrolled later.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Float, ForeignKey, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from .base import Base

__all__ = ["CandidateRow"]


class CandidateRow(Base):
    __tablename__ = "candidate_releases"
    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    bundle_id: Mapped[str] = mapped_column(String(32), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    selector: Mapped[str] = mapped_column(String(200))
    mode: Mapped[str] = mapped_column(String(16))  # "shadow" | "ab"
    share: Mapped[float] = mapped_column(Float)  # ab: share of requests; 0 for a shadow
    created: Mapped[int] = mapped_column(BigInteger)  # unix s
    manifest: Mapped[bytes] = mapped_column(LargeBinary)  # bytes as signed
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    keyring: Mapped[bytes] = mapped_column(LargeBinary)
    keyring_sig: Mapped[bytes] = mapped_column(LargeBinary)
    payload_blob: Mapped[str] = mapped_column(String(64))
    targets: Mapped[dict[str, Any]] = mapped_column()  # device id -> envelope (JSON text)
