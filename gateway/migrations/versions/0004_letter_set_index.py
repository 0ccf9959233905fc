"""Index the letters of a set by version: accepting a letter looks up the earlier and later versions of its
set (``Outbox.accept``), which without it scanned the whole letter table — a cost that grew with every
letter ever stored (at 900 stored letters, ~420 page reads per accepted letter on SQLite).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_letter_set_key_version", "letter", ["set_key", "version"], unique=False, if_not_exists=True)


def downgrade() -> None:
    op.drop_index("ix_letter_set_key_version", table_name="letter")
