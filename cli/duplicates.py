"""`c360 duplicates`: the Duplicates list (merge candidates the identity service raised instead
of merging), and the decisions on it: merge, dismiss, and unmerge within the shop's window."""

from datetime import datetime
from typing import Any

import click

from c360.identity.v1 import identity_pb2, identity_pb2_grpc
from cli.mesh import Mesh, every_page, run

PAGE_SIZE = 200
REASON = click.option("--reason", default="", help="Why (kept in the audit trail).")
STRENGTHS = {
    identity_pb2.STRENGTH_AUTHORITATIVE: "authoritative",
    identity_pb2.STRENGTH_ASSERTED: "asserted",
}


@click.group()
def duplicates() -> None:
    """The Duplicates list: persons the identity service kept apart because linking them
    conflicted, with the reason and the evidence; merge, dismiss, unmerge."""


def _call(mesh: Mesh, method: str, request: Any) -> Any:
    """One Identity RPC by name; a failure ends the command with its status."""

    async def work() -> Any:
        async with mesh.channel("identity") as channel:
            stub = identity_pb2_grpc.IdentityStub(channel)
            return await getattr(stub, method)(request, metadata=mesh.metadata)

    return run(work())


def _at(stamp: Any) -> str:
    instant: datetime = stamp.ToDatetime()
    return f"{instant:%Y-%m-%d %H:%M} UTC"


def candidate_lines(candidate: Any) -> list[str]:
    """A candidate as terminal lines: its id, reason, the two persons, and one line per record
    of evidence (source, event, strength, when, and the identifiers it carried, as the
    identity service gives them)."""
    lines = [
        f"{candidate.candidate_id}  {candidate.reason}  "
        f"{candidate.person_a_id} / {candidate.person_b_id}  raised {_at(candidate.raised_at)}"
    ]
    for evidence in candidate.evidence:
        carried = " ".join(f"{i.type}={i.value}" for i in evidence.identifiers)
        lines.append(
            f"    {evidence.source} {evidence.event_id} "
            f"({STRENGTHS.get(evidence.strength, 'unspecified')}, "
            f"{evidence.observed_at.ToDatetime():%Y-%m-%d}): {carried}"
        )
    return lines


@duplicates.command("list")
@click.option("--shop", required=True)
@click.pass_obj
def list_(mesh: Mesh, shop: str) -> None:
    """Open merge candidates, oldest first: id, reason, the two persons, and the evidence
    that linked them."""

    async def work() -> list[Any]:
        async with mesh.channel("identity") as channel:
            stub = identity_pb2_grpc.IdentityStub(channel)
            return await every_page(
                lambda token: stub.ListMergeCandidates(
                    identity_pb2.ListMergeCandidatesRequest(
                        shop_id=shop, page_size=PAGE_SIZE, page_token=token
                    ),
                    metadata=mesh.metadata,
                ),
                "candidates",
            )

    found = run(work())
    for candidate in found:
        for line in candidate_lines(candidate):
            click.echo(line)
    click.echo(f"{len(found)} open candidate{'' if len(found) == 1 else 's'}")


@duplicates.command("merge")
@click.option("--shop", required=True)
@click.argument("candidate_id", required=False)
@click.option(
    "--persons",
    nargs=2,
    metavar="SURVIVOR MERGED",
    help="Merge two persons by hand instead of accepting a candidate.",
)
@REASON
@click.pass_obj
def merge(
    mesh: Mesh,
    shop: str,
    candidate_id: str | None,
    persons: tuple[str, str] | None,
    reason: str,
) -> None:
    """Accept a candidate (CANDIDATE_ID), or merge two persons with --persons: the first
    absorbs the second. Reversible with `unmerge` within the shop's unmerge window."""
    if bool(candidate_id) == bool(persons):
        raise click.UsageError("give exactly one of CANDIDATE_ID and --persons")
    a, b = persons or ("", "")
    request = identity_pb2.MergeRequest(
        shop_id=shop, candidate_id=candidate_id or "", person_a_id=a, person_b_id=b, reason=reason
    )

    record = _call(mesh, "Merge", request).merge
    click.echo(
        f"merged {record.merged_person_id} into {record.surviving_person_id}: merge "
        f"{record.merge_id}, reversible until {_at(record.unmerge_deadline)}"
    )


@duplicates.command("dismiss")
@click.option("--shop", required=True)
@click.argument("candidate_id")
@REASON
@click.pass_obj
def dismiss(mesh: Mesh, shop: str, candidate_id: str, reason: str) -> None:
    """Dismiss a candidate: the two persons are recorded as not the same person, so the same
    evidence never merges them."""
    _call(
        mesh,
        "DismissCandidate",
        identity_pb2.DismissCandidateRequest(
            shop_id=shop, candidate_id=candidate_id, reason=reason
        ),
    )
    click.echo(f"dismissed {candidate_id}: recorded as not the same person")


@duplicates.command("unmerge")
@click.option("--shop", required=True)
@click.argument("merge_id")
@REASON
@click.pass_obj
def unmerge(mesh: Mesh, shop: str, merge_id: str, reason: str) -> None:
    """Reverse a merge within the shop's window: both persons come back exactly as they were,
    and are recorded as not the same person."""
    request = identity_pb2.UnmergeRequest(shop_id=shop, merge_id=merge_id, reason=reason)

    record = _call(mesh, "Unmerge", request).merge
    click.echo(
        f"unmerged {merge_id}: {record.surviving_person_id} and {record.merged_person_id} "
        f"are apart again"
    )
