"""telemetry: every accepted telemetry message (per namespace) and per-device inference totals.

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "inference_totals",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=130), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("lat", sa.JSON(), nullable=False),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("first_time", sa.BigInteger(), nullable=False),
        sa.Column("last_time", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "model"),
    )
    op.create_table(
        "telemetry",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("namespace", sa.String(length=32), nullable=False),
        sa.Column("time", sa.BigInteger(), nullable=False),
        sa.Column("received", sa.BigInteger(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_telemetry_device_namespace_time", "telemetry", ["device_id", "namespace", "time"]
    )
    op.create_index("ix_telemetry_namespace_time", "telemetry", ["namespace", "time"])
    op.create_index("ix_telemetry_received", "telemetry", ["received"])


def downgrade() -> None:
    op.drop_index("ix_telemetry_received", table_name="telemetry")
    op.drop_index("ix_telemetry_namespace_time", table_name="telemetry")
    op.drop_index("ix_telemetry_device_namespace_time", table_name="telemetry")
    op.drop_table("telemetry")
    op.drop_table("inference_totals")
