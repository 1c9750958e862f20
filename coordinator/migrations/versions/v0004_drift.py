"""drift: the drift alerts table.

One new table, nothing else touched (``coordinator/tables/drift.py``): ``drift_alerts``, one
row per alert (device, model version, score and threshold, the drifted features with PSI and
KS, output shift, samples, open/handled state and the retraining run that took it), indexed
by (state, name) for the retraining trigger's lookups. Downgrade drops it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "drift_alerts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("samples", sa.Float(), nullable=False),
        sa.Column("output_psi", sa.Float(), nullable=True),
        sa.Column("features", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("run_id", sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_drift_alerts_state_name", "drift_alerts", ["state", "name"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_drift_alerts_state_name", table_name="drift_alerts")
    op.drop_table("drift_alerts")
