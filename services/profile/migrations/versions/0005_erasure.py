"""GDPR erasure: the profile's tombstones of erased persons.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Creates the table."""
    op.create_table(
        "erased_person",
        sa.Column("shop_id", sa.String(length=128), nullable=False),
        sa.Column("person_id", sa.String(length=64), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("shop_id", "person_id"),
    )


def downgrade() -> None:
    """Drops it."""
    op.drop_table("erased_person")
