"""The identity tables: persons, identifiers, evidence, merges, candidates, decisions, the
change outbox, tombstones and shop policies.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Creates the tables and their indexes."""
    op.create_table(
        "change",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("person_id", sa.String(length=64), nullable=False),
        sa.Column("other_person_id", sa.String(length=64), nullable=True),
        sa.Column("merge_id", sa.String(length=64), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    op.create_index("change_shop", "change", ["shop_id", "seq"], unique=False)
    op.create_table(
        "erased_identifier",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("person_id", sa.String(length=64), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", "key_hash"),
    )
    op.create_table(
        "evidence",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("event_id", sa.String(length=256), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("strength", sa.String(length=16), nullable=False),
        sa.Column("observed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("person_id", sa.String(length=64), nullable=True),
        sa.Column("anchor_type", sa.String(length=32), nullable=True),
        sa.Column("anchor_key", sa.String(length=320), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("candidate_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("shop_id", "event_id", name="evidence_event"),
    )
    op.create_index("evidence_person", "evidence", ["shop_id", "person_id"], unique=False)
    op.create_table(
        "evidence_identifier",
        sa.Column(
            "evidence_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("raw_value", sa.String(length=320), nullable=False),
        sa.Column("match_key", sa.String(length=320), nullable=False),
        sa.PrimaryKeyConstraint("evidence_id", "position"),
    )
    op.create_index(
        "evidence_identifier_key",
        "evidence_identifier",
        ["shop_id", "type", "match_key"],
        unique=False,
    )
    op.create_table(
        "identifier",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("match_key", sa.String(length=320), nullable=False),
        sa.Column("value", sa.String(length=320), nullable=False),
        sa.Column("raw_value", sa.String(length=320), nullable=False),
        sa.Column("person_id", sa.String(length=64), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("normalizer_version", sa.Integer(), nullable=False),
        sa.Column("conflicts", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("shop_id", "type", "match_key", name="identifier_key"),
    )
    op.create_index("identifier_person", "identifier", ["shop_id", "person_id"], unique=False)
    op.create_table(
        "merge",
        sa.Column("merge_id", sa.String(length=64), nullable=False),
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("survivor_id", sa.String(length=64), nullable=False),
        sa.Column("merged_id", sa.String(length=64), nullable=False),
        sa.Column("merged_by", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.String(length=256), nullable=False),
        sa.Column("event_id", sa.String(length=256), nullable=True),
        sa.Column("candidate_id", sa.String(length=64), nullable=True),
        sa.Column("merged_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("unmerge_deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("unmerged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("unmerged_by", sa.String(length=128), nullable=True),
        sa.Column("unmerge_reason", sa.String(length=256), nullable=True),
        sa.PrimaryKeyConstraint("merge_id"),
    )
    op.create_index(op.f("ix_merge_shop_id"), "merge", ["shop_id"], unique=False)
    op.create_table(
        "merge_candidate",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("candidate_id", sa.String(length=64), nullable=False),
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("person_a_id", sa.String(length=64), nullable=False),
        sa.Column("person_b_id", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("event_ids", sa.JSON(), nullable=False),
        sa.Column("raised_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decided_by", sa.String(length=128), nullable=True),
        sa.Column("decision_reason", sa.String(length=256), nullable=True),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("candidate_id"),
    )
    op.create_index(
        "merge_candidate_open", "merge_candidate", ["shop_id", "state", "seq"], unique=False
    )
    op.create_table(
        "not_same_person",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("person_a_id", sa.String(length=64), nullable=False),
        sa.Column("person_b_id", sa.String(length=64), nullable=False),
        sa.Column("decided_by", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.String(length=256), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "not_same_person_a", "not_same_person", ["shop_id", "person_a_id"], unique=False
    )
    op.create_index(
        "not_same_person_b", "not_same_person", ["shop_id", "person_b_id"], unique=False
    )
    op.create_table(
        "person",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("person_id", sa.String(length=64), nullable=False),
        sa.Column("parent_id", sa.String(length=64), nullable=True),
        sa.Column("root_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("shop_id", "person_id"),
    )
    op.create_index("person_parent", "person", ["shop_id", "parent_id"], unique=False)
    op.create_index("person_root", "person", ["shop_id", "root_id"], unique=False)
    op.create_table(
        "shop_policy",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("unmerge_window_seconds", sa.Integer(), nullable=False),
        sa.Column("default_country", sa.String(length=2), nullable=False),
        sa.Column("own_domains", sa.JSON(), nullable=False),
        sa.Column("blocked_values", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("shop_id"),
    )


def downgrade() -> None:
    """Drops the tables."""
    op.drop_table("shop_policy")
    op.drop_table("person")
    op.drop_table("not_same_person")
    op.drop_table("merge_candidate")
    op.drop_table("merge")
    op.drop_table("identifier")
    op.drop_table("evidence_identifier")
    op.drop_table("evidence")
    op.drop_table("erased_identifier")
    op.drop_table("change")
