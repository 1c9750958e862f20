"""Registry tables: device telemetry as received, and per-device, per-version inference totals.

``telemetry`` holds one row per (accepted message, namespace): ``time`` is the device's clock
clamped to the coordinator's receive time (a device clock ahead of ours cannot make a row look
newer than it is), ``received`` the coordinator's. ``ingest.Ingest`` bounds it per device (rows)
and by age (``TelemetryRetention``). ``inference_totals`` keeps, per device and model key
(``name@version``), everything its ``inference`` telemetry ever counted: the long-run
aggregate beside the windowed rows (Prometheus and ``telemetry.version_totals`` read it).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from .base import Base

__all__ = ["ID", "InferenceTotalRow", "TelemetryRow"]

ID = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER only


class TelemetryRow(Base):
    __tablename__ = "telemetry"
    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64))
    namespace: Mapped[str] = mapped_column(String(32))
    time: Mapped[int] = mapped_column(BigInteger)  # unix s: the device's, at most ``received``
    received: Mapped[int] = mapped_column(BigInteger)  # unix s, the coordinator's clock
    payload: Mapped[dict[str, Any]] = mapped_column()
    __table_args__ = (
        Index("ix_telemetry_namespace_time", "namespace", "time"),
        Index("ix_telemetry_device_namespace_time", "device_id", "namespace", "time"),
        Index("ix_telemetry_received", "received"),
    )


class InferenceTotalRow(Base):
    __tablename__ = "inference_totals"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(130), primary_key=True)  # name@version
    count: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    rows: Mapped[int] = mapped_column(BigInteger)
    lat: Mapped[list[Any]] = mapped_column()  # counts per LATENCY_BOUNDS_MS bucket
    classes: Mapped[dict[str, Any]] = mapped_column()  # class -> rows
    first_time: Mapped[int] = mapped_column(BigInteger)  # unix s
    last_time: Mapped[int] = mapped_column(BigInteger)
