"""`c360`: the command line for operators, talking to a running mesh over gRPC with a token."""

import asyncio
import sys
from pathlib import Path
from typing import Any, cast

import click
import grpc

from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from cli.demo import demo
from cli.duplicates import duplicates
from cli.enrich import enrich
from cli.gdpr import gdpr
from cli.importing import Importer, Outcome
from cli.mesh import Mesh, Service, address_options, every_page, run
from cli.shop_report import report


@click.group()
@address_options
@click.option("--token", envvar="C360_TOKEN", help="Bearer token (or C360_TOKEN); required.")
@click.pass_context
def main(context: click.Context, /, token: str | None, **addresses: str) -> None:
    """Operate a c360 mesh: load a demo shop, report on a shop or an agency's shops, review
    duplicates, import and export data, run enrichment and read its model report, inspect and
    replay dead letters, answer data-subject requests. See docs/cli.md."""
    context.obj = Mesh(cast(dict[Service, str], addresses), token)


main.add_command(gdpr)
main.add_command(duplicates)
main.add_command(report)
main.add_command(enrich)
main.add_command(demo)


@main.command("import")
@click.argument("kind", type=click.Choice(["customers", "orders"]))
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--shop", required=True, help="The shop the records belong to.")
@click.pass_obj
def import_(mesh: Mesh, kind: str, path: Path, shop: str) -> None:
    """Import customers (Custobar JSON lines, Custobar or Klaviyo CSV) or orders (Shopify's order
    export CSV, or IngestOrderRequest JSON lines). Resumes after a crash; rejected records go to
    PATH.SHOP.rejected.jsonl."""
    size = path.stat().st_size
    with click.progressbar(length=size, label=f"importing {kind}", file=sys.stderr) as bar:
        try:
            outcome = asyncio.run(_import(mesh, kind, path, shop, bar.update))
        except grpc.aio.AioRpcError as error:
            raise click.ClickException(
                f"{error.code().name}: {error.details()} - run the same command again to resume"
            ) from None
    _summary(outcome, path, shop)


async def _import(mesh: Mesh, kind: str, path: Path, shop: str, progress: Any) -> Outcome:
    async with mesh.channel("profile") as channel:
        importer = Importer(profile_pb2_grpc.ProfileStub(channel), mesh.token, shop, path, progress)
        return await importer.run(kind)


def _summary(outcome: Outcome, path: Path, shop: str) -> None:
    resumed = f" (resumed after record {outcome.resumed_from})" if outcome.resumed_from else ""
    rejected = sum(outcome.rejected.values())
    click.echo(f"imported {outcome.done - rejected} records{resumed}, rejected {rejected}")
    for reason, count in outcome.rejected.most_common():
        click.echo(f"  {count:>6}  {reason}")
    if rejected:
        click.echo(f"details: {path.name}.{shop}.rejected.jsonl")


@main.command("export")
@click.argument("dataset", type=click.Choice(["crm360", "loyalty"]))
@click.option("--shop", required=True, help="The shop to export.")
@click.option("--format", "format_", type=click.Choice(["jsonl", "csv"]), default="jsonl")
@click.option("--segment", default="", help="Only this segment's members (a segment id).")
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="File (default stdout)."
)
@click.pass_obj
def export(
    mesh: Mesh, dataset: str, shop: str, format_: str, segment: str, output: Path | None
) -> None:
    """Export the CRM 360 or Loyalty Programme datasource (seed field names) as JSON lines or
    CSV, streamed as it is read. A file is written under a temporary name and renamed once
    complete, so a failed export never leaves a partial file behind."""
    request = profile_pb2.ExportRequest(
        shop_id=shop,
        dataset=profile_pb2.EXPORT_DATASET_CRM360
        if dataset == "crm360"
        else profile_pb2.EXPORT_DATASET_LOYALTY,
        format=profile_pb2.EXPORT_FORMAT_CSV
        if format_ == "csv"
        else profile_pb2.EXPORT_FORMAT_JSONL,
        segment_id=segment,
    )

    async def stream(sink: Any) -> int:
        written = 0
        async with mesh.channel("profile") as channel:
            call = profile_pb2_grpc.ProfileStub(channel).Export(request, metadata=mesh.metadata)
            async for chunk in call:
                sink.write(chunk.data)
                written += len(chunk.data)
        return written

    if output is None:
        written = run(stream(sys.stdout.buffer))
    else:
        partial = output.with_name(output.name + ".partial")
        try:
            with partial.open("wb") as sink:
                written = run(stream(sink))
            partial.replace(output)
        finally:
            partial.unlink(missing_ok=True)
    click.echo(f"exported {written} bytes of {dataset} for {shop}", err=True)


@main.group()
def dlq() -> None:
    """Dead letters: deliveries that failed processing, kept with their error."""


@dlq.command("list")
@click.option("--shop", required=True)
@click.pass_obj
def dlq_list(mesh: Mesh, shop: str) -> None:
    """List a shop's dead letters."""

    async def listing() -> list[Any]:
        async with mesh.channel("profile") as channel:
            stub = profile_pb2_grpc.ProfileStub(channel)
            return await every_page(
                lambda token: stub.ListDeadLetters(
                    profile_pb2.ListDeadLettersRequest(shop_id=shop, page_token=token),
                    metadata=mesh.metadata,
                ),
                "dead_letters",
            )

    for letter in run(listing()):
        click.echo(f"{letter.id}\t{letter.kind}\t{letter.attempts}\t{letter.error}")


@dlq.command("replay")
@click.option("--shop", required=True)
@click.argument("ids", nargs=-1)
@click.pass_obj
def dlq_replay(mesh: Mesh, shop: str, ids: tuple[str, ...]) -> None:
    """Process dead letters again (IDS, or every one of the shop)."""

    async def replay() -> Any:
        async with mesh.channel("profile") as channel:
            return await profile_pb2_grpc.ProfileStub(channel).ReplayDeadLetters(
                profile_pb2.ReplayDeadLettersRequest(shop_id=shop, ids=list(ids)),
                metadata=mesh.metadata,
            )

    answer = run(replay())
    click.echo(f"replayed {answer.replayed}, failed again {answer.failed_again}")
