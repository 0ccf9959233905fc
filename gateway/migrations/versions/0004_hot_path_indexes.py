"""Indexes for the statements every letter runs, so that none reads rows it does not want (each such
read costs more with every letter stored; ``tests/e2e/test_query_plans.py`` checks the plans):

- letters by (set_key, version): accepting a letter looks up the earlier and later versions of its set
  (``Outbox.accept``), which scanned the whole letter table — at 900 stored letters, ~420 page reads per
  accepted letter on SQLite;
- deliveries by (letter_id, status), instead of letter_id alone: claiming a held letter's queued
  deliveries went through the status index, every queued delivery of every letter;
- deliveries by (status, due_at), instead of status alone: claiming what is due reads only what is due,
  not every queued delivery (held ones included).

Replacing an index locks the delivery table while the new one is built (on a large PostgreSQL outbox,
migrate at a quiet time).

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

_NEW = (
    ("ix_letter_set_key_version", "letter", ["set_key", "version"]),
    ("ix_delivery_letter_status", "delivery", ["letter_id", "status"]),
    ("ix_delivery_status_due", "delivery", ["status", "due_at"]),
)
_REPLACED = (("ix_delivery_letter_id", "delivery", ["letter_id"]), ("ix_delivery_status", "delivery", ["status"]))


def upgrade() -> None:
    for name, table, columns in _NEW:
        op.create_index(name, table, columns, unique=False, if_not_exists=True)
    for name, table, _ in _REPLACED:
        op.drop_index(name, table_name=table, if_exists=True)


def downgrade() -> None:
    for name, table, columns in _REPLACED:
        op.create_index(name, table, columns, unique=False, if_not_exists=True)
    for name, table, _ in reversed(_NEW):
        op.drop_index(name, table_name=table, if_exists=True)
