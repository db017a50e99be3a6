"""Enrichment's inputs: persons' repeat products on their summaries, and the activity outbox
enrichment follows; signals remember the model that computed them.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Adds the columns (repeat products empty until each summary is next refreshed) and the
    table."""
    op.add_column(
        "person_summary",
        sa.Column("repeat_products", sa.JSON(), nullable=False, server_default=sa.text("'{}'")),
    )
    op.add_column(
        "person_signal", sa.Column("model_fitted_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_table(
        "person_activity",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("person_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )


def downgrade() -> None:
    """Drops them."""
    op.drop_table("person_activity")
    op.drop_column("person_signal", "model_fitted_at")
    op.drop_column("person_summary", "repeat_products")
