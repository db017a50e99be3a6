"""`c360 enrich`: run a shop's enrichment with progress, read its model report."""

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from c360.enrichment.v1 import enrichment_pb2, enrichment_pb2_grpc
from cli.mesh import Mesh, run
from cli.reports import model_lines, write_plot

RUN_TIMEOUT_SECONDS = 3600.0


async def run_shop(mesh: Mesh, request: enrichment_pb2.RunShopRequest) -> int:
    """Runs a shop's enrichment (RunShop), showing its progress on stderr; returns how many
    persons it published."""
    published = 0
    async with mesh.channel("enrichment") as channel:
        call = enrichment_pb2_grpc.EnrichmentStub(channel).RunShop(
            request, metadata=mesh.metadata, timeout=RUN_TIMEOUT_SECONDS
        )
        with click.progressbar(length=0, label="publishing", file=sys.stderr) as bar:
            async for progress in call:
                if progress.phase == "publish":
                    bar.length = progress.total
                    bar.update(progress.done - bar.pos)
                elif progress.phase == "done":
                    published = progress.done
                    click.echo(f"done: {progress.done} persons", err=True)
                else:
                    click.echo(f"{progress.phase}: {progress.done}", err=True)
    return published


@click.group()
def enrich() -> None:
    """Enrichment: run a shop's models, read their report."""


@enrich.command("run")
@click.option("--shop", required=True)
@click.option(
    "--as-of",
    type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
    help="Back-test as of this UTC time (fitted and reported, nothing published).",
)
@click.pass_obj
def enrich_run(mesh: Mesh, shop: str, as_of: datetime | None) -> None:
    """Run the shop's daily enrichment now (or a back-test), with progress."""
    request = enrichment_pb2.RunShopRequest(shop_id=shop)
    if as_of is not None:
        request.as_of.FromDatetime(as_of.replace(tzinfo=UTC))
    run(run_shop(mesh, request))


@enrich.command("report")
@click.option("--shop", required=True)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the churn calibration plot: a .png file, or an .html page.",
)
@click.pass_obj
def enrich_report(mesh: Mesh, shop: str, plot: Path | None) -> None:
    """The shop's fitted parameters, sample sizes and churn calibration."""

    async def fetch() -> Any:
        async with mesh.channel("enrichment") as channel:
            return await enrichment_pb2_grpc.EnrichmentStub(channel).GetModelReport(
                enrichment_pb2.GetModelReportRequest(shop_id=shop), metadata=mesh.metadata
            )

    report = run(fetch())
    for line in model_lines(report):
        click.echo(line)
    if plot is not None:
        write_plot(report, plot)
        click.echo(f"plot written to {plot}", err=True)
