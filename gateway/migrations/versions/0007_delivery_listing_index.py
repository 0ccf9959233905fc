"""Index deliveries by (status, updated_at, message_id): ``GET /deliveries?status=`` pages through one
state in the order its deliveries last changed, each page read straight from the index (keyset paging)
instead of sorting every delivery in that state for every page.

The single-column index on ``due_at`` goes: every statement that looks deliveries up by due time also
names their status, and ``ix_delivery_status_due`` (migration 0004) serves it; the old index was only
one more B-tree to update at every claim and every outcome.

Building the index locks the delivery table while it runs (on a large PostgreSQL outbox, migrate at a
quiet time).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NEW = ("ix_delivery_status_updated", "delivery", ["status", "updated_at", "message_id"])
_REPLACED = ("ix_delivery_due_at", "delivery", ["due_at"])


def upgrade() -> None:
    name, table, columns = _NEW
    op.create_index(name, table, columns, unique=False, if_not_exists=True)
    op.drop_index(_REPLACED[0], table_name=_REPLACED[1], if_exists=True)


def downgrade() -> None:
    name, table, columns = _REPLACED
    op.create_index(name, table, columns, unique=False, if_not_exists=True)
    op.drop_index(_NEW[0], table_name=_NEW[1], if_exists=True)
