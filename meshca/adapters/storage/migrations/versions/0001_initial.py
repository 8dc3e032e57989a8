"""initial schema

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "authority_journal",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("parent_id", sa.String(), nullable=True),
        sa.Column("key_ref", sa.String(), nullable=True),
        sa.Column("certificate_pem", sa.Text(), nullable=False),
        sa.Column("chain_pem", sa.Text(), nullable=False),
        sa.Column("fingerprint_sha256", sa.String(), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("prepared_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("authority_journal", schema=None) as batch_op:
        batch_op.create_index("ix_authority_journal_state", ["state"], unique=False)

    op.create_table(
        "decision_record",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("api", sa.String(), nullable=False),
        sa.Column("allowed", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("version", sa.String(), nullable=False),
        sa.Column("policy", sa.String(), nullable=True),
        sa.Column("rule", sa.Integer(), nullable=True),
        sa.Column("source_principal", sa.String(), nullable=True),
        sa.Column("destination_principal", sa.String(), nullable=True),
        sa.Column("method", sa.String(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("host", sa.String(), nullable=False),
        sa.Column("headers", sa.Text(), nullable=False),
        sa.Column("source_ip", sa.String(), nullable=True),
        sa.Column("destination_ip", sa.String(), nullable=True),
        sa.Column("destination_port", sa.Integer(), nullable=True),
        sa.Column("sni", sa.String(), nullable=True),
        sa.Column("request_id", sa.String(), nullable=True),
        sa.Column("audit", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("decision_record", schema=None) as batch_op:
        batch_op.create_index("ix_decision_record_allowed_time", ["allowed", "time"], unique=False)
        batch_op.create_index(
            "ix_decision_record_destination_time", ["destination_principal", "time"], unique=False
        )
        batch_op.create_index("ix_decision_record_policy_time", ["policy", "time"], unique=False)
        batch_op.create_index("ix_decision_record_time", ["time", "id"], unique=False)

    op.create_table(
        "issuance_record",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("leaf_index", sa.BigInteger(), nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("api", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column(
            "spiffe_id",
            sa.String().with_variant(sa.String(collation="C"), "postgresql"),
            nullable=True,
        ),
        sa.Column("serial", sa.String(), nullable=True),
        sa.Column("fingerprint_sha256", sa.String(), nullable=True),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=True),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("namespace", sa.String(), nullable=True),
        sa.Column("service_account", sa.String(), nullable=True),
        sa.Column("pod_name", sa.String(), nullable=True),
        sa.Column("pod_uid", sa.String(), nullable=True),
        sa.Column("node_name", sa.String(), nullable=True),
        sa.Column("peer", sa.String(), nullable=True),
        sa.Column("csr_sha256", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("leaf_index"),
    )
    with op.batch_alter_table("issuance_record", schema=None) as batch_op:
        batch_op.create_index(
            "ix_issuance_record_fingerprint", ["fingerprint_sha256"], unique=False
        )
        batch_op.create_index(
            "ix_issuance_record_namespace_time", ["namespace", "time", "leaf_index"], unique=False
        )
        batch_op.create_index(
            "ix_issuance_record_outcome_time", ["outcome", "time", "leaf_index"], unique=False
        )
        batch_op.create_index("ix_issuance_record_pod_name", ["pod_name"], unique=False)
        batch_op.create_index("ix_issuance_record_pod_uid", ["pod_uid"], unique=False)
        batch_op.create_index("ix_issuance_record_serial", ["serial"], unique=False)
        batch_op.create_index(
            "ix_issuance_record_service_account", ["service_account", "time"], unique=False
        )
        batch_op.create_index(
            "ix_issuance_record_spiffe_id_time", ["spiffe_id", "time", "leaf_index"], unique=False
        )
        batch_op.create_index("ix_issuance_record_time", ["time", "leaf_index"], unique=False)

    op.create_table(
        "log_node",
        sa.Column("level", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("level", "idx"),
    )
    op.create_table(
        "log_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("tree_size", sa.BigInteger(), nullable=False),
        sa.Column("pruned_below", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "log_tree_head",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("tree_size", sa.BigInteger(), nullable=False),
        sa.Column("timestamp_ms", sa.BigInteger(), nullable=False),
        sa.Column("root_hash", sa.LargeBinary(), nullable=False),
        sa.Column("key_id", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("log_tree_head", schema=None) as batch_op:
        batch_op.create_index("ix_log_tree_head_size", ["tree_size", "timestamp_ms"], unique=False)

    op.bulk_insert(
        sa.table(
            "log_state",
            sa.column("id", sa.Integer()),
            sa.column("tree_size", sa.BigInteger()),
            sa.column("pruned_below", sa.BigInteger()),
        ),
        [{"id": 1, "tree_size": 0, "pruned_below": 0}],
    )


def downgrade() -> None:
    with op.batch_alter_table("log_tree_head", schema=None) as batch_op:
        batch_op.drop_index("ix_log_tree_head_size")

    op.drop_table("log_tree_head")
    op.drop_table("log_state")
    op.drop_table("log_node")
    with op.batch_alter_table("issuance_record", schema=None) as batch_op:
        batch_op.drop_index("ix_issuance_record_time")
        batch_op.drop_index("ix_issuance_record_spiffe_id_time")
        batch_op.drop_index("ix_issuance_record_service_account")
        batch_op.drop_index("ix_issuance_record_serial")
        batch_op.drop_index("ix_issuance_record_pod_uid")
        batch_op.drop_index("ix_issuance_record_pod_name")
        batch_op.drop_index("ix_issuance_record_outcome_time")
        batch_op.drop_index("ix_issuance_record_namespace_time")
        batch_op.drop_index("ix_issuance_record_fingerprint")

    op.drop_table("issuance_record")
    with op.batch_alter_table("decision_record", schema=None) as batch_op:
        batch_op.drop_index("ix_decision_record_time")
        batch_op.drop_index("ix_decision_record_policy_time")
        batch_op.drop_index("ix_decision_record_destination_time")
        batch_op.drop_index("ix_decision_record_allowed_time")

    op.drop_table("decision_record")
    with op.batch_alter_table("authority_journal", schema=None) as batch_op:
        batch_op.drop_index("ix_authority_journal_state")

    op.drop_table("authority_journal")
