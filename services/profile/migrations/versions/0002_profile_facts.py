"""The profile facts (orders, refunds, events, consents, customers), the consent outbox to the
gate and the webhook inbox.

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
        "consent_fact",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("consent_id", sa.String(length=64), nullable=False),
        sa.Column("anchor_type", sa.String(length=32), nullable=False),
        sa.Column("anchor_key", sa.String(length=320), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("granted", sa.Boolean(), nullable=False),
        sa.Column("consent_text", sa.String(length=4000), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", "consent_id"),
    )
    op.create_index(
        "consent_fact_anchor",
        "consent_fact",
        ["shop_id", "anchor_type", "anchor_key"],
        unique=False,
    )
    op.create_table(
        "customer_fact",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("source_id", sa.String(length=400), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("anchor_type", sa.String(length=32), nullable=False),
        sa.Column("anchor_key", sa.String(length=320), nullable=False),
        sa.Column("first_name", sa.String(length=256), nullable=False),
        sa.Column("last_name", sa.String(length=256), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("forgotten", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", "source", "source_id"),
    )
    op.create_index(
        "customer_fact_anchor",
        "customer_fact",
        ["shop_id", "anchor_type", "anchor_key"],
        unique=False,
    )
    op.create_table(
        "event_fact",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("event_id", sa.String(length=256), nullable=False),
        sa.Column("anchor_type", sa.String(length=32), nullable=False),
        sa.Column("anchor_key", sa.String(length=320), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", "event_id"),
    )
    op.create_index(
        "event_fact_anchor", "event_fact", ["shop_id", "anchor_type", "anchor_key"], unique=False
    )
    op.create_table(
        "follow_cursor",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "gate_push",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("person_id", sa.String(length=64), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("urgent", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", "person_id"),
    )
    op.create_table(
        "order_fact",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("placed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("anchor_type", sa.String(length=32), nullable=False),
        sa.Column("anchor_key", sa.String(length=320), nullable=False),
        sa.Column("total", sa.Numeric(precision=20, scale=4), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("location", sa.String(length=256), nullable=False),
        sa.Column("cancelled", sa.Boolean(), nullable=False),
        sa.Column("line_items", sa.JSON(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", "order_id"),
    )
    op.create_index(
        "order_fact_anchor", "order_fact", ["shop_id", "anchor_type", "anchor_key"], unique=False
    )
    op.create_table(
        "refund_fact",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("refund_id", sa.String(length=64), nullable=False),
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("amount", sa.Numeric(precision=20, scale=4), nullable=False),
        sa.Column("refunded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("is_return", sa.Boolean(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", "refund_id"),
    )
    op.create_index("refund_fact_order", "refund_fact", ["shop_id", "order_id"], unique=False)
    op.create_table(
        "webhook_inbox",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("webhook_id", sa.String(length=128), nullable=False),
        sa.Column("topic", sa.String(length=64), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("triggered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("error", sa.String(length=1000), nullable=True),
        sa.Column("first_failed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("shop_id", "webhook_id", name="webhook_inbox_delivery"),
    )
    op.create_index(
        "webhook_inbox_due", "webhook_inbox", ["state", "next_attempt_at"], unique=False
    )


def downgrade() -> None:
    """Drops the tables."""
    op.drop_table("webhook_inbox")
    op.drop_table("refund_fact")
    op.drop_table("order_fact")
    op.drop_table("gate_push")
    op.drop_table("follow_cursor")
    op.drop_table("event_fact")
    op.drop_table("customer_fact")
    op.drop_table("consent_fact")
