"""What a delivery carries: the letter (``letter``) or a withdrawal notice (``withdrawal``) telling a
recipient of an earlier version that the new version is no longer addressed to it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    present = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("delivery")}
    if "kind" not in present:  # a database made by create_all may have it already
        op.add_column("delivery", sa.Column("kind", sa.String(16), nullable=False, server_default="letter"))


def downgrade() -> None:
    op.drop_column("delivery", "kind")
