"""manifest shards: a release's further signed manifests, each naming a bounded set of targets.

One new table, nothing else touched (``coordinator/tables/shards.py``): ``manifest_shards``.
A release made before (one manifest, in its ``releases`` row) is a release of one shard and
is served as it was. Downgrade drops the table: a release of several shards then offers its
first shard to every target, and devices the first does not name refuse it (re-release).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "manifest_shards",
        sa.Column("sequence", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("shard", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("first_target", sa.String(length=64), nullable=False),
        sa.Column("manifest", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("sequence", "shard"),
    )


def downgrade() -> None:
    op.drop_table("manifest_shards")
