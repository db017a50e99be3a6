"""ShopData, which every service that owns a database serves: all of one shop's rows, and its
keys in the service's other stores, counted or removed for GDPR shop redaction."""

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import Connection, column, delete, func, inspect, select, table
from sqlalchemy.ext.asyncio import AsyncEngine

from c360.common.v1 import common_pb2, common_pb2_grpc
from services.runtime.server import Registration
from services.runtime.validation import Violations, shop

log = logging.getLogger(__name__)

# A store outside the database: (shop_id, dry_run) -> what it removed (or would), by name.
RedactExtra = Callable[[str, bool], Awaitable[dict[str, int]]]


def shop_tables(connection: Connection) -> list[str]:
    """The tables of the service's schema that have a shop_id column (Alembic's version table
    has none), each before any table it references, so that a foreign key never blocks a
    delete."""
    inspector = inspect(connection)
    ordered = [name for name, _ in inspector.get_sorted_table_and_fkc_names() if name]
    columns = inspector.get_multi_columns()
    return [
        name
        for name in reversed(ordered)
        if any(c["name"] == "shop_id" for c in columns[(None, name)])
    ]


async def redact_rows(engine: AsyncEngine, shop_id: str, dry_run: bool) -> dict[str, int]:
    """Removes every row of the shop from every table with a shop_id, in one transaction, and
    returns the rows removed by table; with `dry_run` counts them and changes nothing, giving
    the same numbers."""
    removed: dict[str, int] = {}
    async with engine.begin() as connection:
        for name in await connection.run_sync(shop_tables):
            rows = table(name, column("shop_id"))
            of_shop = rows.c.shop_id == shop_id
            if dry_run:
                counted = select(func.count()).select_from(rows).where(of_shop)
                removed[name] = (await connection.execute(counted)).scalar_one()
            else:
                removed[name] = (await connection.execute(delete(rows).where(of_shop))).rowcount
    return removed


class ShopDataServicer(common_pb2_grpc.ShopDataServicer):
    """RedactShop over the service's database, then over its other stores (`redact_extra`)."""

    def __init__(self, engine: AsyncEngine, redact_extra: RedactExtra | None = None) -> None:
        self._engine = engine
        self._redact_extra = redact_extra

    async def RedactShop(
        self, request: common_pb2.RedactShopDataRequest, context: Any
    ) -> common_pb2.RedactShopDataResponse:
        violations = Violations()
        shop_id = shop(request.shop_id, violations)
        violations.raise_any()
        removed = await redact_rows(self._engine, shop_id, request.dry_run)
        if self._redact_extra is not None:
            removed.update(await self._redact_extra(shop_id, request.dry_run))
        log.info(
            "shop redaction",
            extra={
                "shop_id": shop_id,
                "dry_run": request.dry_run,
                "removed": sum(removed.values()),
            },
        )
        return common_pb2.RedactShopDataResponse(removed=removed)


def shop_data(engine: AsyncEngine, redact_extra: RedactExtra | None = None) -> Registration:
    """The ShopData service of a service's database (and other stores), ready to register."""
    return Registration(
        common_pb2.DESCRIPTOR.services_by_name["ShopData"],
        ShopDataServicer(engine, redact_extra),
        common_pb2_grpc.add_ShopDataServicer_to_server,
    )
