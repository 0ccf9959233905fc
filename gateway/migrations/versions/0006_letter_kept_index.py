"""Index the letters whose content is still kept, by reception time: the retention
(``GATEWAY_LETTER_RETENTION_DAYS``, ``Outbox.erase_letters``) finds the oldest of them without reading
the letters already erased, nor any other.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEPT = sa.text("length(body) > 0")


def upgrade() -> None:
    op.create_index(
        "ix_letter_kept",
        "letter",
        ["received_at"],
        unique=False,
        if_not_exists=True,
        sqlite_where=_KEPT,
        postgresql_where=_KEPT,
    )


def downgrade() -> None:
    op.drop_index("ix_letter_kept", table_name="letter")
