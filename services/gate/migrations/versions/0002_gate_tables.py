"""The gate's tables: shop policies, contact policies, the message log and its releases.

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
    """Creates the tables."""
    op.create_table(
        "shop_policy",
        sa.Column("shop_id", sa.String(128), primary_key=True),
        sa.Column("policy", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "contact_policy",
        sa.Column("shop_id", sa.String(128), primary_key=True),
        sa.Column("person_id", sa.String(128), primary_key=True),
        sa.Column("granted", sa.JSON, nullable=False),
        sa.Column("global_unsubscribe", sa.Boolean, nullable=False),
        sa.Column("time_zone", sa.String(64), nullable=False),
        sa.Column("suppressed", sa.JSON, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "message_release",
        sa.Column("shop_id", sa.String(128), primary_key=True),
        sa.Column("person_id", sa.String(128), primary_key=True),
        sa.Column("entry_id", sa.String(40), primary_key=True),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "message_log",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("shop_id", sa.String(128), nullable=False),
        sa.Column("person_id", sa.String(128), nullable=False),
        sa.Column("entry_id", sa.String(40), nullable=False),
        sa.Column("message_id", sa.String(256), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("transactional", sa.Boolean, nullable=False),
        sa.Column("allowed", sa.Boolean, nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("shop_id", "person_id", "entry_id", name="message_log_entry"),
    )
    op.create_index("message_log_person", "message_log", ["shop_id", "person_id", "decided_at"])


def downgrade() -> None:
    """Drops the tables."""
    op.drop_table("message_log")
    op.drop_table("message_release")
    op.drop_table("contact_policy")
    op.drop_table("shop_policy")
