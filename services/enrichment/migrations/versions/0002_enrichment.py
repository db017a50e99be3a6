"""The enrichment tables: shops' windows, fitted models, runs, stage deadlines, known shops and
the activity cursor.

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
    """Creates the tables and their index."""
    op.create_table(
        "shop_config",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("shop_id"),
    )
    op.create_table(
        "shop_model",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("back_test", sa.Boolean(), nullable=False),
        sa.Column("model", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", "back_test"),
    )
    op.create_table(
        "shop_run",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("as_of", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_through", sa.String(length=64), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("shop_id"),
    )
    op.create_table(
        "stage_deadline",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("person_id", sa.String(length=64), nullable=False),
        sa.Column("changes_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", "person_id"),
    )
    op.create_index("stage_deadline_due", "stage_deadline", ["changes_at"], unique=False)
    op.create_table(
        "known_shop",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("shop_id"),
    )
    op.create_table(
        "follow_cursor",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    """Drops them."""
    op.drop_index("stage_deadline_due", table_name="stage_deadline")
    for table in (
        "follow_cursor",
        "known_shop",
        "stage_deadline",
        "shop_run",
        "shop_model",
        "shop_config",
    ):
        op.drop_table(table)
