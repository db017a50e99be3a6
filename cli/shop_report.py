"""`c360 report`: one shop's report, or the agency roll-up of every shop the token may read, as
terminal tables and, with --out, as PNG pictures and one HTML page (see cli/reports.py)."""

import asyncio
from pathlib import Path
from typing import Any

import click
import grpc

from c360.enrichment.v1 import enrichment_pb2, enrichment_pb2_grpc
from c360.gate.v1 import gate_pb2, gate_pb2_grpc
from c360.profile.v1 import profile_pb2, profile_pb2_grpc
from cli.mesh import Mesh, run
from cli.reports import ShopFigures, agency_sections, shop_sections, write_report

# Fatigue postures asked of the gate at once, for an agency's shops.
IN_FLIGHT = 8


async def gather_figures(mesh: Mesh, shops: list[str], with_model: bool) -> list[ShopFigures]:
    """The figures of these shops (empty: every shop the token may read): the profile's
    report, the gate's fatigue posture and, `with_model`, enrichment's model report."""
    async with (
        mesh.channel("profile") as to_profile,
        mesh.channel("gate") as to_gate,
        mesh.channel("enrichment") as to_enrichment,
    ):
        answer = await profile_pb2_grpc.ProfileStub(to_profile).GetShopReports(
            profile_pb2.GetShopReportsRequest(shops=shops), metadata=mesh.metadata
        )
        gate = gate_pb2_grpc.GateStub(to_gate)
        enrichment = enrichment_pb2_grpc.EnrichmentStub(to_enrichment)
        limit = asyncio.Semaphore(IN_FLIGHT)

        async def figures(report: Any) -> ShopFigures:
            async with limit:
                posture = await gate.GetFatiguePosture(
                    gate_pb2.GetFatiguePostureRequest(shop_id=report.shop_id),
                    metadata=mesh.metadata,
                )
                model = await model_report(enrichment, mesh, report.shop_id) if with_model else None
            return ShopFigures(report, posture, model)

        return list(await asyncio.gather(*(figures(r) for r in answer.reports)))


async def model_report(enrichment: Any, mesh: Mesh, shop: str) -> Any:
    """The shop's model report, None when no model was fitted yet."""
    try:
        return await enrichment.GetModelReport(
            enrichment_pb2.GetModelReportRequest(shop_id=shop), metadata=mesh.metadata
        )
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


@click.command()
@click.option("--shop", help="The shop to report on.")
@click.option(
    "--agency",
    is_flag=True,
    help="Roll up every shop the token may read (all shops, for a token bound to every shop).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write report.html (every picture inline) and one PNG per picture here.",
)
@click.pass_obj
def report(mesh: Mesh, shop: str | None, agency: bool, out: Path | None) -> None:
    """A shop's lifecycle distribution, RFM grid, fatigue posture ("30% of the list is at
    fatigue >= 0.7"), profile coverage and churn calibration; or, with --agency, coverage,
    lifecycle and fatigue posture of every shop side by side, flagging shops with more than
    60% of their customers at fatigue >= 0.7. Definitions: docs/cli.md."""
    if bool(shop) == agency:
        raise click.UsageError("give --shop SHOP or --agency")
    found = run(gather_figures(mesh, [shop] if shop else [], with_model=not agency))
    if agency:
        customers = sum(f.customers for f in found)
        title = f"Agency roll-up: {len(found)} shops, {customers:,} customers"
        sections = agency_sections(found)
    else:
        [figures] = found
        title = f"Shop {figures.report.shop_id}: {figures.customers:,} customers"
        sections = shop_sections(figures)
    refreshing = sum(f.report.refreshing for f in found)
    click.echo(title)
    if refreshing:
        click.echo(f"({refreshing:,} profiles are still being refreshed: the figures may move)")
    for section in sections:
        click.echo(f"\n{section.title}")
        for line in section.lines:
            click.echo(f"  {line}")
    if out is not None:
        written = write_report(title, sections, out)
        click.echo(f"\nwritten: {', '.join(str(path) for path in written)}", err=True)
