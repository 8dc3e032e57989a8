"""replicas on several hosts: sealed keys in the database, one prepared root at a time

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ONE_PREPARED_ROOT = "kind = 'root' AND state = 'prepared'"


def upgrade() -> None:
    op.create_table(
        "sealed_key",
        sa.Column("ref", sa.String(), nullable=False),
        sa.Column("kek_id", sa.String(), nullable=False),
        sa.Column("nonce", sa.LargeBinary(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("public_key_der", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("ref"),
    )
    with op.batch_alter_table("authority_journal", schema=None) as batch_op:
        batch_op.create_index(
            "ux_authority_journal_one_prepared_root",
            ["kind"],
            unique=True,
            sqlite_where=sa.text(_ONE_PREPARED_ROOT),
            postgresql_where=sa.text(_ONE_PREPARED_ROOT),
        )


def downgrade() -> None:
    with op.batch_alter_table("authority_journal", schema=None) as batch_op:
        batch_op.drop_index("ux_authority_journal_one_prepared_root")
    op.drop_table("sealed_key")
