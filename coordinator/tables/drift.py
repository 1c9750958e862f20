"""Registry tables: drift alerts.

``drift_alerts`` holds one row per alert ``coordinator.drift.check`` raised: which device,
which model version, when, the drift score over the threshold, the features that drifted with
their PSI and KS (``features``: ``[[index, psi, ks], ...]``, highest PSI first), the output
shift, and the samples behind it. ``state`` is ``open`` until a retraining run takes it
(``handled``, with ``run_id``); an open alert for the same device and version is not raised
twice.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Float, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from .base import Base

__all__ = ["DriftAlertRow"]


class DriftAlertRow(Base):
    __tablename__ = "drift_alerts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created: Mapped[int] = mapped_column(BigInteger)  # unix s
    device_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)  # max(max_psi, output_psi)
    threshold: Mapped[float] = mapped_column(Float)
    samples: Mapped[float] = mapped_column(Float)  # n of the window behind it
    output_psi: Mapped[float | None] = mapped_column(Float, nullable=True)
    features: Mapped[list[Any]] = mapped_column()  # [[index, psi, ks], ...]
    state: Mapped[str] = mapped_column(String(16))  # open | handled
    run_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    __table_args__ = (Index("ix_drift_alerts_state_name", "state", "name"),)
