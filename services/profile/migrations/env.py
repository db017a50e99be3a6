"""Alembic environment of the profile service (tables in its own schema and version table)."""

from services.runtime.db import run_migrations

run_migrations()
