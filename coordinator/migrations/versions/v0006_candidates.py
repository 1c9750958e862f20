"""candidates: signed shadow / A/B candidate releases, apart from the releases table.

One new table, nothing else touched (``coordinator/tables/candidates.py``):
``candidate_releases``. Downgrade drops it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "candidate_releases",
        sa.Column("sequence", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("bundle_id", sa.String(length=32), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("selector", sa.String(length=200), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("share", sa.Float(), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("manifest", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("keyring", sa.LargeBinary(), nullable=False),
        sa.Column("keyring_sig", sa.LargeBinary(), nullable=False),
        sa.Column("payload_blob", sa.String(length=64), nullable=False),
        sa.Column("targets", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["model_versions.id"]),
        sa.PrimaryKeyConstraint("sequence"),
        sa.UniqueConstraint("bundle_id"),
    )


def downgrade() -> None:
    op.drop_table("candidate_releases")
