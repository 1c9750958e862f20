"""Registry tables: staged rollouts and every decision the controller made, with its evidence.

``rollouts`` holds one row per rollout: its spec and the controller's state (JSON, the
``coordinator.rollout`` dataclasses' dict form), the phase as a column for listing, and a
``revision`` the service bumps on every state change (compare-and-set: two processes ticking
the same rollout never both act on one state). ``rollout_decisions`` is append-only.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from .base import Base

__all__ = ["RolloutDecisionRow", "RolloutRow"]


class RolloutRow(Base):
    __tablename__ = "rollouts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    phase: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column()
    state: Mapped[dict[str, Any]] = mapped_column()
    revision: Mapped[int] = mapped_column(Integer)
    created: Mapped[int] = mapped_column(BigInteger)  # unix s
    updated: Mapped[int] = mapped_column(BigInteger)


class RolloutDecisionRow(Base):
    __tablename__ = "rollout_decisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[int] = mapped_column(BigInteger)  # unix s
    action: Mapped[str] = mapped_column(String(16))
    wave: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(500))
    devices: Mapped[list[Any]] = mapped_column()
    evidence: Mapped[dict[str, Any]] = mapped_column()
    sequences: Mapped[list[Any]] = mapped_column()  # releases the service published for it
