"""`c360 duplicates` against a real identity service on PostgreSQL: the Duplicates list with
reasons and evidence, accepting, dismissing and undoing merges, errors as one line."""

import asyncio
import itertools
import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result

from c360.identity.v1 import identity_pb2_grpc
from cli.main import main
from tests.clock import Clock
from tests.conftest import ADMIN_TOKEN, StartService
from tests.integration.test_identity import NOON, Identity


@pytest.fixture
async def identity(start_service: StartService) -> AsyncIterator[tuple[Identity, str]]:
    """A client of one shop on the identity service (its clock stopped at NOON, 2026-06-01
    12:00 UTC), and the service's address for the CLI."""
    server = await start_service("identity", clock=Clock(NOON))
    address = f"127.0.0.1:{server.port}"
    async with grpc.aio.insecure_channel(address) as channel:
        stub = identity_pb2_grpc.IdentityStub(channel)
        shop = f"shop-{secrets.token_hex(4)}"
        yield Identity(stub, shop, Clock(NOON), itertools.count(1)), address


async def c360(address: str, *args: str) -> Result:
    return await asyncio.to_thread(
        CliRunner().invoke,
        main,
        ["--identity", address, "--token", ADMIN_TOKEN, "duplicates", *args],
    )


async def two_accounts(identity: Identity, email: str, first: str, second: str) -> Any:
    """One shopper with two Shopify customer accounts: a candidate, not a merge."""
    await identity.resolve(("shopify_customer_id", first), ("email", email), event_id=f"o-{first}")
    return await identity.resolve(
        ("shopify_customer_id", second), ("email", email), event_id=f"o-{second}"
    )


async def test_the_list_shows_each_candidate_with_its_reason_and_evidence(
    identity: tuple[Identity, str],
) -> None:
    client, address = identity
    empty = await c360(address, "list", "--shop", client.shop)
    assert (empty.exit_code, empty.output) == (0, "0 open candidates\n")
    raised = await two_accounts(client, "Ana@Mail.example", "1001", "1002")
    first = await client.lookup("shopify_customer_id", "1001")

    listed = await c360(address, "list", "--shop", client.shop)
    assert listed.exit_code == 0, listed.output
    assert listed.output.splitlines() == [
        f"{raised.candidate_id}  two_shopify_customer_ids  {raised.person_id} / {first}  "
        "raised 2026-06-01 12:00 UTC",
        "    shopify o-1002 (authoritative, 2026-06-01): shopify_customer_id=1002 "
        "email=Ana@Mail.example",
        "1 open candidate",
    ]


async def test_merge_unmerge_and_dismiss_through_the_cli(identity: tuple[Identity, str]) -> None:
    client, address = identity
    accepted = await two_accounts(client, "bo@mail.example", "2001", "2002")
    dismissed = await two_accounts(client, "cy@mail.example", "3001", "3002")
    # The candidate's first person (the new account's) absorbs the second.
    survivor, absorbed = accepted.person_id, await client.lookup("shopify_customer_id", "2001")

    merged = await c360(
        address, "merge", "--shop", client.shop, accepted.candidate_id, "--reason", "same buyer"
    )
    assert merged.exit_code == 0, merged.output
    [merge] = (await client.person(survivor)).merges
    assert (merge.surviving_person_id, merge.merged_person_id, merge.reason) == (
        survivor,
        absorbed,
        "same buyer",
    )
    assert merged.output == (
        f"merged {absorbed} into {survivor}: merge {merge.merge_id}, "
        "reversible until 2026-06-08 12:00 UTC\n"
    )
    assert await client.lookup("shopify_customer_id", "2001") == survivor

    again = await c360(address, "merge", "--shop", client.shop, accepted.candidate_id)
    assert again.exit_code == 1
    assert again.output.startswith("Error: FAILED_PRECONDITION: ")

    undone = await c360(address, "unmerge", "--shop", client.shop, merge.merge_id)
    assert undone.exit_code == 0, undone.output
    assert undone.output == (
        f"unmerged {merge.merge_id}: {survivor} and {absorbed} are apart again\n"
    )
    assert await client.lookup("shopify_customer_id", "2001") == absorbed

    gone = await c360(address, "dismiss", "--shop", client.shop, dismissed.candidate_id)
    assert (gone.exit_code, gone.output) == (
        0,
        f"dismissed {dismissed.candidate_id}: recorded as not the same person\n",
    )
    left = await c360(address, "list", "--shop", client.shop)
    assert left.output == "0 open candidates\n"


async def test_merge_by_hand_takes_two_persons_and_refuses_both_forms(
    identity: tuple[Identity, str],
) -> None:
    client, address = identity
    a = await client.resolve(("email", "di@mail.example"))
    b = await client.resolve(("email", "di.other@mail.example"))
    both = await c360(
        address, "merge", "--shop", client.shop, "c-1", "--persons", a.person_id, b.person_id
    )
    assert both.exit_code == 2
    assert "give exactly one of CANDIDATE_ID and --persons" in both.output
    merged = await c360(
        address, "merge", "--shop", client.shop, "--persons", a.person_id, b.person_id
    )
    assert merged.exit_code == 0, merged.output
    assert merged.output.startswith(f"merged {b.person_id} into {a.person_id}: merge ")
    assert await client.lookup("email", "di.other@mail.example") == a.person_id
