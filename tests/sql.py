"""Reading a service's tables straight from PostgreSQL, to check what it stored."""

from typing import Any

from services.runtime.db import plain_connection


async def sql(settings: Any, query: str, *args: Any) -> list[Any]:
    """Rows of a query in the service's schema."""
    connection = await plain_connection(settings)
    try:
        return list(await connection.fetch(query, *args))
    finally:
        await connection.close()
