"""The tamper-evident audit log: search columns and the hash chain on audit_event, its head, and
signed checkpoints (gateway/auditlog.py).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

New records keep their AuditEvent zlib-compressed in ``zbody`` (``body`` empty).  Records written
before this revision keep their JSON text in ``body``; they are indexed and chained here, in their ``seq`` order, from
their stored JSON (their ``at`` is their ``recorded`` time): the chain then covers them too, from the
moment of the upgrade.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import orjson
import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = (
    ("at", 32),
    ("patient", 300),
    ("recipient", 300),
    ("outcome", 2),
    ("kind", 64),
    ("prev_hash", 64),
    ("hash", 64),
)
_INDEXES = (
    ("ix_audit_event_at", "at"),
    ("ix_audit_event_patient", "patient"),
    ("ix_audit_event_recipient", "recipient"),
)


def upgrade() -> None:
    from gateway.auditlog import GENESIS, digest, index_of

    present = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("audit_event")}
    for name, length in _COLUMNS:
        if name not in present:  # a database made by create_all may have them already
            op.add_column("audit_event", sa.Column(name, sa.String(length), nullable=True))
    if "zbody" not in present:
        op.add_column("audit_event", sa.Column("zbody", sa.LargeBinary(), nullable=True))
    for name, column in _INDEXES:
        op.create_index(name, "audit_event", [column], unique=False, if_not_exists=True)
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        if_not_exists=True,
    )
    op.create_table(
        "audit_checkpoint",
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("at", sa.String(32), nullable=False),
        sa.Column("kid", sa.String(128), nullable=False),
        sa.Column("jws", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        if_not_exists=True,
    )
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT count(*) FROM audit_head")).scalar():
        return  # already chained
    rows = bind.execute(
        sa.text("SELECT seq, id, recorded, letter_id, body FROM audit_event WHERE hash IS NULL ORDER BY seq")
    ).all()
    prev, last = GENESIS, 0
    patients: dict[str, str] = {}
    for row in rows:
        event = orjson.loads(row.body)
        patient, recipient, outcome, kind = index_of(event)
        if patient and row.letter_id:
            patients.setdefault(row.letter_id, patient)
        patient = patient or patients.get(row.letter_id or "")
        recorded = row.recorded if isinstance(row.recorded, datetime) else datetime.fromisoformat(str(row.recorded))
        at = (recorded if recorded.tzinfo else recorded.replace(tzinfo=UTC)).astimezone(UTC)
        stamp = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        current = digest(prev, row.id, stamp, row.letter_id, patient, recipient, outcome, kind, row.body.encode())
        bind.execute(
            sa.text(
                "UPDATE audit_event SET at=:at, patient=:patient, recipient=:recipient, outcome=:outcome, "
                "kind=:kind, prev_hash=:prev, hash=:hash WHERE seq=:seq"
            ),
            {
                "at": stamp,
                "patient": patient,
                "recipient": recipient,
                "outcome": outcome,
                "kind": kind,
                "prev": prev,
                "hash": current,
                "seq": row.seq,
            },
        )
        prev, last = current, row.seq
    bind.execute(sa.text("INSERT INTO audit_head (id, seq, hash) VALUES (1, :seq, :hash)"), {"seq": last, "hash": prev})


def downgrade() -> None:
    op.drop_table("audit_checkpoint")
    op.drop_table("audit_head")
    for name, _ in reversed(_INDEXES):
        op.drop_index(name, table_name="audit_event")
    for name in ("zbody", *(c for c, _ in reversed(_COLUMNS))):
        op.drop_column("audit_event", name)
