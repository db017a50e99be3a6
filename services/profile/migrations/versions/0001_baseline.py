"""Baseline of the profile service: its schema and version table; tables come with its issue.

Revision ID: 0001
"""

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Nothing beyond the schema and version table, which the environment creates."""


def downgrade() -> None:
    """Nothing to undo."""
