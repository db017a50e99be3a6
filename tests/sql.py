"""Reading a service's tables straight from PostgreSQL, to check what it stored."""

from typing import Any

import asyncpg
from sqlalchemy.engine import make_url


async def sql(settings: Any, query: str, *args: Any) -> list[Any]:
    """Rows of a query in the service's schema."""
    url = make_url(settings.sqlalchemy_url).set(drivername="postgresql")
    connection = await asyncpg.connect(
        url.render_as_string(hide_password=False),
        server_settings={"search_path": settings.schema_name},
    )
    try:
        return list(await connection.fetch(query, *args))
    finally:
        await connection.close()
