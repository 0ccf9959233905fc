"""Initial schema: the versioned resource store (store.py) and the outbox (outbox.py).

Revision ID: 0001
Revises:
Create Date: 2026-11-20

Every table and index is created IF NOT EXISTS so that a database made by ``metadata.create_all``
before migrations existed is adopted as it is; such a database may predate the delivery timestamps
(queued_at, sent_at, acknowledged_at), which are added when missing.  On an empty database this is
exactly the models' schema (tests/unit/test_migrate.py compares them).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEXES = (
    ("ix_delivery_letter_id", "delivery", "letter_id"),
    ("ix_delivery_status", "delivery", "status"),
    ("ix_delivery_due_at", "delivery", "due_at"),
    ("ix_audit_event_letter_id", "audit_event", "letter_id"),
)
_LATER_DELIVERY_COLUMNS = ("queued_at", "sent_at", "acknowledged_at")


def _instant() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "resource_version",
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("last_updated", _instant(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("resource_type", "id", "version"),
        if_not_exists=True,
    )
    op.create_table(
        "letter",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("document_key", sa.String(512), nullable=False),
        sa.Column("set_key", sa.String(512), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("received_at", _instant(), nullable=False),
        sa.Column("client", sa.String(128), nullable=False),
        sa.Column("media_type", sa.String(64), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("replaces", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("document_key"),
        if_not_exists=True,
    )
    op.create_table(
        "delivery",
        sa.Column("message_id", sa.String(64), nullable=False),
        sa.Column("letter_id", sa.String(64), nullable=False),
        sa.Column("recipient_id", sa.String(256), nullable=False),
        sa.Column("recipient_ref", sa.String(512), nullable=False),
        sa.Column("endpoint", sa.String(1024), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("due_at", _instant(), nullable=False),
        sa.Column("claimed_by", sa.String(64), nullable=True),
        sa.Column("claimed_at", _instant(), nullable=True),
        sa.Column("updated_at", _instant(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("replaces", sa.String(64), nullable=True),
        sa.Column("queued_at", _instant(), nullable=True),
        sa.Column("sent_at", _instant(), nullable=True),
        sa.Column("acknowledged_at", _instant(), nullable=True),
        sa.ForeignKeyConstraint(["letter_id"], ["letter.id"]),
        sa.PrimaryKeyConstraint("message_id"),
        if_not_exists=True,
    )
    op.create_table(
        "audit_event",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("recorded", _instant(), nullable=False),
        sa.Column("letter_id", sa.String(64), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        if_not_exists=True,
    )
    for name, table, column in _INDEXES:
        op.create_index(name, table, [column], unique=False, if_not_exists=True)
    present = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("delivery")}
    for column in _LATER_DELIVERY_COLUMNS:
        if column not in present:  # an outbox created before these columns existed
            op.add_column("delivery", sa.Column(column, _instant(), nullable=True))


def downgrade() -> None:
    for name, table, _ in reversed(_INDEXES):
        op.drop_index(name, table_name=table)
    for table in ("audit_event", "delivery", "letter", "resource_version"):
        op.drop_table(table)
