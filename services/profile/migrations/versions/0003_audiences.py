"""The audiences: persons' summaries and anchors, enrichment's signals, the change feed,
segments and the loyalty programme and ledger.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Creates the tables and their indexes."""
    op.create_table(
        "loyalty_earning",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("rate", sa.Numeric(precision=20, scale=6), nullable=False),
        sa.Column("earned_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("shop_id", "order_id"),
    )
    op.create_table(
        "loyalty_programme",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("tiers", sa.JSON(), nullable=False),
        sa.Column("points_per_unit", sa.Numeric(precision=20, scale=6), nullable=False),
        sa.Column("expiry_days", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("shop_id"),
    )
    op.create_table(
        "person_anchor",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("anchor_type", sa.String(length=32), nullable=False),
        sa.Column("anchor_key", sa.String(length=320), nullable=False),
        sa.Column("person_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", "anchor_type", "anchor_key"),
    )
    op.create_index("person_anchor_person", "person_anchor", ["shop_id", "person_id"], unique=False)
    op.create_table(
        "person_signal",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("person_id", sa.String(length=64), nullable=False),
        sa.Column("lifecycle_stage", sa.String(length=16), nullable=False),
        sa.Column("rfm_r", sa.Integer(), nullable=True),
        sa.Column("rfm_f", sa.Integer(), nullable=True),
        sa.Column("rfm_m", sa.Integer(), nullable=True),
        sa.Column("churn_risk", sa.Float(), nullable=True),
        sa.Column("engagement", sa.Float(), nullable=True),
        sa.Column("predictions", sa.JSON(), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", "person_id"),
    )
    op.create_table(
        "person_summary",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("person_id", sa.String(length=64), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("first_name", sa.String(length=256), nullable=False),
        sa.Column("locale", sa.String(length=35), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("order_count", sa.Integer(), nullable=False),
        sa.Column("spend", sa.Numeric(precision=20, scale=4), nullable=False),
        sa.Column("aov", sa.Numeric(precision=20, scale=4), nullable=False),
        sa.Column("first_order_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_order_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acquisition", sa.String(length=16), nullable=False),
        sa.Column("online_orders", sa.Integer(), nullable=False),
        sa.Column("pos_orders", sa.Integer(), nullable=False),
        sa.Column("marketplace_orders", sa.Integer(), nullable=False),
        sa.Column("location", sa.String(length=256), nullable=False),
        sa.Column("preferred_category", sa.String(length=256), nullable=False),
        sa.Column("consent_email", sa.Boolean(), nullable=False),
        sa.Column("consent_sms", sa.Boolean(), nullable=False),
        sa.Column("consent_whatsapp", sa.Boolean(), nullable=False),
        sa.Column("consent_push", sa.Boolean(), nullable=False),
        sa.Column("unsubscribed", sa.Boolean(), nullable=False),
        sa.Column("app_installed", sa.Boolean(), nullable=False),
        sa.Column("loyalty_member", sa.Boolean(), nullable=False),
        sa.Column(
            "lifetime_points", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("tier", sa.String(length=64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", "person_id"),
    )
    op.create_table(
        "person_tag",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("person_id", sa.String(length=64), nullable=False),
        sa.Column("tag", sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", "person_id", "tag"),
    )
    op.create_table(
        "profile_change",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("person_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    op.create_index("profile_change_shop", "profile_change", ["shop_id", "seq"], unique=False)
    op.create_table(
        "segment",
        sa.Column("segment_id", sa.String(length=32), nullable=False),
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("filter", sa.String(length=2000), nullable=False),
        sa.Column(
            "member_count", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("segment_id"),
        sa.UniqueConstraint("shop_id", "name", name="segment_name"),
    )
    op.create_table(
        "summary_due",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("person_id", sa.String(length=64), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", "person_id"),
    )
    op.create_index("event_fact_at", "event_fact", ["shop_id", "at"], unique=False)
    op.create_index("order_fact_placed", "order_fact", ["shop_id", "placed_at"], unique=False)


def downgrade() -> None:
    """Drops the tables and indexes."""
    op.drop_index("order_fact_placed", table_name="order_fact")
    op.drop_index("event_fact_at", table_name="event_fact")
    for table in (
        "summary_due", "segment", "profile_change", "person_tag", "person_summary",
        "person_signal", "person_anchor", "loyalty_programme", "loyalty_earning",
    ):  # fmt: skip
        op.drop_table(table)
