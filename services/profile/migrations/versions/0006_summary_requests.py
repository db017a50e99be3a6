"""Summary refresh requests are counted: a refresh settles the request it read only while the
count has not moved (times can repeat).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Adds the count; requests waiting now count once."""
    op.add_column(
        "summary_due",
        sa.Column("requests", sa.BigInteger(), server_default="1", nullable=False),
    )


def downgrade() -> None:
    """Drops it."""
    op.drop_column("summary_due", "requests")
