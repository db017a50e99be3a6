"""Bulk import and backfill: customers and orders from CSV or JSON lines, into a running mesh.

Records are read in a stream and sent in batches (IngestOrders, UpsertCustomers), several in
flight; as batches complete, the number of records done before the first unfinished one is
written to a checkpoint file beside the input, so an import cut short (the service killed, the
network gone) resumes where it stopped. Ingestion is idempotent, so records sent twice across a
crash change nothing. Customer batches that share a key are sent one after the other, so a later
record of a customer is applied after an earlier one, as in the file. Rejected records are
written, with their reasons, to a `<input>.<shop>.rejected.jsonl` file beside the input.
"""

import asyncio
import csv
import io
import json
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from c360.profile.v1 import profile_pb2
from services.profile.custobar import BOOLEANS, IDENTIFYING, keys_of

BATCH = 1000
IN_FLIGHT = 8  # batches
TIMEOUT = 300  # seconds a batch may take on a busy machine

# A Klaviyo profile export's columns, as Custobar-format fields.
KLAVIYO = {
    "Email": "email",
    "Phone Number": "phone_number",
    "First Name": "first_name",
    "Last Name": "last_name",
    "External ID": "external_id",
    "City": "city",
    "Country": "country",
    "Zip Code": "zip_code",
    "Address": "street_address",
}
SUBSCRIBED = {"Email Marketing Consent": "can_email", "SMS Marketing Consent": "can_sms"}
SOURCES = {
    "pos": profile_pb2.ORDER_SOURCE_POS,
    "marketplace": profile_pb2.ORDER_SOURCE_MARKETPLACE,
    "amazon": profile_pb2.ORDER_SOURCE_MARKETPLACE,
    "ebay": profile_pb2.ORDER_SOURCE_MARKETPLACE,
}


@dataclass
class Outcome:
    """What an import did: records done (this run and before it), rejected with reasons."""

    done: int = 0
    resumed_from: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Record:
    """One input record: where it starts in the file (for progress) and what it says."""

    number: int
    end_offset: int
    data: Any


def rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(end offset, row) of a CSV (rows as dicts) or JSON lines file (a line it cannot parse is
    given back as text, to be rejected)."""
    with path.open("rb") as raw:
        if path.suffix.lower() == ".csv":
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
            reader = csv.DictReader(text)
            for row in reader:
                yield raw.tell(), {k.strip(): v for k, v in row.items() if k}
            return
        for line in raw:
            if not line.strip():
                continue
            try:
                yield raw.tell(), json.loads(line)
            except json.JSONDecodeError:
                yield raw.tell(), line.decode("utf-8", "replace").strip()


def customer_record(row: dict[str, Any] | str, from_csv: bool) -> Any:
    """A Custobar-format record from a JSON line as is, or from a CSV row (Klaviyo's or
    Custobar's column names). Empty cells are left out: they must not erase what is known; CSV
    booleans ("true", "1", "yes") become booleans. Identifying numbers travel as strings."""
    if not isinstance(row, dict):
        return row
    if not any(key in row for key in (*KLAVIYO, *SUBSCRIBED)):
        return {k: _cell(k, v, from_csv) for k, v in row.items() if not (from_csv and v == "")}
    record: dict[str, Any] = {}
    for column, value in row.items():
        if value in (None, ""):
            continue
        if column in KLAVIYO:
            record[KLAVIYO[column]] = value
        elif column in SUBSCRIBED:
            record[SUBSCRIBED[column]] = value.strip().upper() == "SUBSCRIBED"
        elif "__" in column:
            record[column] = value
    return record


def _cell(key: str, value: Any, from_csv: bool) -> Any:
    if key in IDENTIFYING and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # a protobuf Struct would make it a double, losing digits
    if from_csv and key in BOOLEANS:
        return value.strip().lower() in ("true", "1", "yes")
    return value


def shopify_orders(rows_in: Iterator[tuple[int, dict[str, Any] | str]]) -> Iterator[
    tuple[int, dict[str, Any] | str]
]:  # fmt: skip
    """Rows of a Shopify order export (one row per line item, the order's fields on its first)
    as one order each, in IngestOrderRequest's JSON shape; JSON lines pass through."""
    current: dict[str, Any] | None = None
    last_offset = 0
    for offset, row in rows_in:
        if not isinstance(row, dict) or "Name" not in row:
            if current is not None:
                yield last_offset, current
                current = None
            yield offset, row
            continue
        if current is None or row.get("Name") != current["_name"]:
            if current is not None:
                yield last_offset, current
            identifiers = [
                {"type": t, "value": row[c]} for c, t in (("Email", "email"), ("Phone", "phone"))
                if row.get(c)
            ]  # fmt: skip
            current = {
                "_name": row["Name"],
                "order_id": row.get("Id") or row["Name"],
                "identifiers": identifiers,
                "placed_at": _shopify_time(row.get("Created at", "")),
                "total": row.get("Total", ""),
                "currency": row.get("Currency", ""),
                "source": row.get("Source", "web"),
                "location": row.get("Location", ""),
                "cancelled": bool(row.get("Cancelled at")),
                "line_items": [],
            }
        current["line_items"].append(
            {
                "title": row.get("Lineitem name", ""),
                "sku": row.get("Lineitem sku", ""),
                "quantity": int(row.get("Lineitem quantity") or 0),
                "price": row.get("Lineitem price") or "0",
            }
        )
        last_offset = offset
    if current is not None:
        yield last_offset, current


def _shopify_time(value: str) -> str:
    """Shopify's export time ("2024-01-05 10:11:12 +0100") as RFC 3339."""
    parts = value.strip().split(" ")
    if len(parts) == 3 and len(parts[2]) == 5:
        return f"{parts[0]}T{parts[1]}{parts[2][:3]}:{parts[2][3:]}"
    return value.strip()


def order_request(shop_id: str, data: Any) -> profile_pb2.IngestOrderRequest:
    """An IngestOrderRequest from an order in its JSON shape (source names as Shopify's)."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    order = {k: v for k, v in data.items() if not k.startswith("_")}
    source = str(order.pop("source", "online")).lower()
    request = json_format.ParseDict(order, profile_pb2.IngestOrderRequest())
    request.shop_id = shop_id
    if source.startswith("order_source_"):
        request.source = profile_pb2.OrderSource.Value(source.upper())
    else:
        request.source = SOURCES.get(source, profile_pb2.ORDER_SOURCE_ONLINE)
    return request


class Importer:
    """Sends records to the profile service, batch after batch, checkpointing as it goes."""

    def __init__(
        self,
        stub: Any,
        token: str,
        shop_id: str,
        path: Path,
        progress: Callable[[int], None],
    ) -> None:
        self._stub = stub
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._shop_id = shop_id
        self._path = path
        self._progress = progress
        # One checkpoint per file and shop: the same file may go to several shops.
        self.checkpoint = path.with_name(f"{path.name}.{shop_id}.c360-checkpoint")
        self.rejected_file = path.with_name(f"{path.name}.{shop_id}.rejected.jsonl")

    def _resume_point(self) -> int:
        if not self.checkpoint.exists():
            return 0
        return int(json.loads(self.checkpoint.read_text())["done"])

    def _save(self, done: int) -> None:
        staged = self.checkpoint.with_suffix(".tmp")
        staged.write_text(json.dumps({"done": done}))
        staged.replace(self.checkpoint)

    def _reject(self, outcome: Outcome, record: Record, reason: str) -> None:
        outcome.rejected[reason.split(":")[0]] += 1
        with self.rejected_file.open("a") as out:
            out.write(json.dumps({"record": record.number, "reason": reason}) + "\n")

    async def run(self, kind: str) -> Outcome:
        """Imports `customers` or `orders`; raises grpc.aio.AioRpcError when the service cannot
        be reached (the checkpoint says where to resume)."""
        outcome = Outcome(resumed_from=self._resume_point())
        if outcome.resumed_from == 0:
            self.rejected_file.unlink(missing_ok=True)
        source = rows(self._path)
        if kind == "orders":
            source = shopify_orders(source)
        batch: list[Record] = []
        self._done_offset = 0
        self._flying: deque[tuple[list[Record], set[str], asyncio.Task[None]]] = deque()
        try:
            for number, (offset, data) in enumerate(source, start=1):
                if number <= outcome.resumed_from:
                    self._done_offset = offset
                    continue
                batch.append(Record(number, offset, data))
                if len(batch) == BATCH:
                    await self._send(kind, batch, outcome)
                    batch = []
            if batch:
                await self._send(kind, batch, outcome)
            while self._flying:
                await self._land(outcome)
        finally:
            for _, _, task in self._flying:
                task.cancel()
            await asyncio.gather(*(task for _, _, task in self._flying), return_exceptions=True)
        self.checkpoint.unlink(missing_ok=True)
        return outcome

    async def _send(self, kind: str, batch: list[Record], outcome: Outcome) -> None:
        """Sends a batch once fewer than IN_FLIGHT are in flight (and, for customers, once none
        in flight shares a key with it)."""
        keys: set[str] = set()
        if kind == "customers":
            csv_file = self._path.suffix.lower() == ".csv"
            for record in batch:
                found = customer_record(record.data, csv_file)
                keys.update(keys_of(found) if isinstance(found, dict) else ())
        while len(self._flying) >= IN_FLIGHT or any(keys & other for _, other, _ in self._flying):
            await self._land(outcome)
        work = (
            self._customers(batch, outcome) if kind == "customers" else self._orders(batch, outcome)
        )
        self._flying.append((batch, keys, asyncio.create_task(work)))

    async def _land(self, outcome: Outcome) -> None:
        """Waits for the oldest batch in flight; records it as done."""
        batch, _, task = self._flying[0]
        await task
        self._flying.popleft()
        outcome.done += len(batch)
        self._save(batch[-1].number)
        self._progress(batch[-1].end_offset - self._done_offset)
        self._done_offset = batch[-1].end_offset

    async def _customers(self, batch: list[Record], outcome: Outcome) -> None:
        records = []
        for record in batch:
            found = customer_record(record.data, self._path.suffix.lower() == ".csv")
            struct = Struct()
            if isinstance(found, dict):
                struct.update(found)
            records.append(struct)
        answer = await self._stub.UpsertCustomers(
            profile_pb2.UpsertCustomersRequest(shop_id=self._shop_id, customers=records),
            metadata=self._metadata,
            timeout=TIMEOUT,
        )
        self._record_errors(outcome, batch, answer.errors)

    async def _orders(self, batch: list[Record], outcome: Outcome) -> None:
        sent: list[Record] = []
        requests = []
        for record in batch:
            try:
                requests.append(order_request("", record.data))
            except (ValueError, json_format.ParseError) as exc:
                self._reject(outcome, record, f"unreadable: {exc}")
                continue
            sent.append(record)
        if not requests:
            return
        answer = await self._stub.IngestOrders(
            profile_pb2.IngestOrdersRequest(shop_id=self._shop_id, orders=requests),
            metadata=self._metadata,
            timeout=TIMEOUT,
        )
        self._record_errors(outcome, sent, answer.errors)

    def _record_errors(
        self, outcome: Outcome, sent: list[Record], errors: Iterable[profile_pb2.RecordError]
    ) -> None:
        """A batch's rejected records, each with its violations joined as its reason."""
        reasons: dict[int, list[str]] = {}
        for error in errors:
            why = f"{error.field}: {error.description}" if error.field else error.description
            reasons.setdefault(error.index, []).append(why)
        for index, found in sorted(reasons.items()):
            self._reject(outcome, sent[index], "; ".join(found))
