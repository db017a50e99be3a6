"""`c360 gdpr`: erase a person, preview an erasure, export a person's data, the shop's data
inventory. Every action is recorded in the gdpr service's audit trail under the token's name."""

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import click
from google.protobuf.json_format import MessageToDict

from c360.gdpr.v1 import gdpr_pb2, gdpr_pb2_grpc
from cli.mesh import Mesh, person_options, person_ref, run

POLL_SECONDS = 0.5


@click.group()
def gdpr() -> None:
    """Data-subject requests: erasure, preview, export; the shop's data inventory."""


@gdpr.command("erase")
@click.option("--shop", required=True)
@person_options
@click.option("--reason", default="", help="Why (kept in the audit trail; no personal data).")
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Follow the job until every service has erased the person.",
)
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to follow the job.")
@click.pass_obj
def erase(
    mesh: Mesh,
    shop: str,
    person_id: str | None,
    identifier: str | None,
    reason: str,
    wait: bool,
    timeout: float,
) -> None:
    """Erase a person: from this moment no read returns them; each service then scrubs its own
    data. The job retries by itself until done; `--no-wait` only starts it."""
    request = gdpr_pb2.EraseRequest(
        shop_id=shop, person=person_ref(person_id, identifier), reason=reason
    )

    async def work() -> tuple[Any, Any]:
        async with mesh.channel("gdpr") as channel:
            stub = gdpr_pb2_grpc.GdprStub(channel)
            started = await stub.Erase(request, metadata=mesh.metadata)
            job = await stub.GetErasure(
                gdpr_pb2.GetErasureRequest(job_id=started.job_id), metadata=mesh.metadata
            )
            deadline = time.monotonic() + timeout
            while wait and job.state != gdpr_pb2.ERASURE_STATE_DONE:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(POLL_SECONDS)
                job = await stub.GetErasure(
                    gdpr_pb2.GetErasureRequest(job_id=started.job_id), metadata=mesh.metadata
                )
            return started, job

    started, job = run(work())
    click.echo(f"job {started.job_id}: person {started.person_id} {_state(job.state)}")
    for step in job.steps:
        removed = ", ".join(f"{table} {n}" for table, n in sorted(step.removed.items()))
        status = "done" if step.done else f"pending ({step.attempts} attempts; {step.last_error})"
        click.echo(f"  {step.service:<10} {status}{': ' + removed if removed else ''}")
    if wait and job.state != gdpr_pb2.ERASURE_STATE_DONE:
        raise click.ClickException(
            f"job {started.job_id} is still {_state(job.state)} after {timeout:g} s; it keeps "
            f"retrying: follow it with `c360 gdpr erase` again or GetErasure"
        )


def _state(state: Any) -> str:
    return gdpr_pb2.ErasureState.Name(state).removeprefix("ERASURE_STATE_").lower()


@gdpr.command("preview")
@click.option("--shop", required=True)
@person_options
@click.pass_obj
def preview(mesh: Mesh, shop: str, person_id: str | None, identifier: str | None) -> None:
    """Per service and table, the rows an erasure of the person would touch now."""
    request = gdpr_pb2.PreviewEraseRequest(shop_id=shop, person=person_ref(person_id, identifier))

    async def work() -> Any:
        async with mesh.channel("gdpr") as channel:
            return await gdpr_pb2_grpc.GdprStub(channel).PreviewErase(
                request, metadata=mesh.metadata
            )

    counts = run(work()).counts
    click.echo(f"{'service':<12} {'table':<28} {'rows':>8}")
    for count in counts:
        click.echo(f"{count.service:<12} {count.table:<28} {count.rows:>8}")
    click.echo(f"{'total':<41} {sum(c.rows for c in counts):>8}")


@gdpr.command("export")
@click.option("--shop", required=True)
@person_options
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The JSON file to write (Shopify's customers/data_request shape).",
)
@click.pass_obj
def export(
    mesh: Mesh, shop: str, person_id: str | None, identifier: str | None, output: Path
) -> None:
    """Everything held about a person as one JSON file: identifiers, orders, refunds, events,
    opt-ins with their consent text, messages, segments, attribution."""
    request = gdpr_pb2.ExportRequest(shop_id=shop, person=person_ref(person_id, identifier))

    async def work() -> Any:
        async with mesh.channel("gdpr") as channel:
            return await gdpr_pb2_grpc.GdprStub(channel).Export(request, metadata=mesh.metadata)

    document = MessageToDict(run(work()).data)
    partial = output.with_name(output.name + ".partial")
    try:
        partial.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", "utf-8")
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
    orders = len(document.get("orders_requested", []))
    person = document["customer"]["person_id"]
    click.echo(f"exported person {person} ({orders} orders) to {output}")


@gdpr.command("inventory")
@click.option("--shop", required=True)
@click.option(
    "--retention-days",
    type=click.IntRange(1, 36500),
    help="Retention period (default: the service's, 3 years unless configured).",
)
@click.pass_obj
def inventory(mesh: Mesh, shop: str, retention_days: int | None) -> None:
    """The shop's personal data in counts: customers with email / phone, the oldest record,
    those past the retention period, erasures done."""
    request = gdpr_pb2.InventoryRequest(shop_id=shop, retention_days=retention_days or 0)

    async def work() -> Any:
        async with mesh.channel("gdpr") as channel:
            return await gdpr_pb2_grpc.GdprStub(channel).Inventory(request, metadata=mesh.metadata)

    found = run(work())

    def share(n: int) -> str:
        return f"{n:>9}  ({n / found.customers:.0%})" if found.customers else f"{n:>9}"

    oldest = (
        f"{found.oldest_record_at.ToDatetime():%Y-%m-%d}"
        if found.HasField("oldest_record_at")
        else "-"
    )
    click.echo(f"customers        {found.customers:>9}")
    click.echo(f"with email       {share(found.with_email)}")
    click.echo(f"with phone       {share(found.with_phone)}")
    click.echo(f"oldest record    {oldest:>9}")
    click.echo(
        f"past retention   {share(found.past_retention)}  not seen since "
        f"{found.retained_since.ToDatetime():%Y-%m-%d}"
    )
    click.echo(f"erasures done    {found.erasures_done:>9}")
