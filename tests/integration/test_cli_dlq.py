"""`c360 dlq list|replay` against the real profile service: a malformed Shopify delivery is
listed with its error and replays to the same error."""

import asyncio

from click.testing import CliRunner, Result

from cli.main import main
from tests.conftest import ADMIN_TOKEN
from tests.integration.conftest import Endpoint
from tests.polling import eventually


async def c360(endpoint: Endpoint, *args: str) -> Result:
    return await asyncio.to_thread(
        CliRunner().invoke,
        main,
        ["--profile", endpoint.profile_address, "--token", ADMIN_TOKEN, "dlq", *args],
    )


async def test_dead_letters_are_listed_and_replayed(endpoint: Endpoint) -> None:
    assert (await c360(endpoint, "list", "--shop", endpoint.shop)).output == ""
    for _ in range(2):
        assert (await endpoint.deliver("orders/create", b'{"id": }'))[0] == 200
    letters = await eventually(endpoint.dead_letters, lambda d: len(d) == 2, "dead letters")

    listed = await c360(endpoint, "list", "--shop", endpoint.shop)
    assert listed.exit_code == 0, listed.output
    assert listed.output.splitlines() == [
        f"{letter.id}\twebhook:orders/create\t1\t{letter.error}" for letter in letters
    ]
    assert all(letter.error.startswith("JSONDecodeError: ") for letter in letters)

    replayed = await c360(endpoint, "replay", "--shop", endpoint.shop, letters[0].id)
    assert (replayed.exit_code, replayed.output) == (0, "replayed 0, failed again 1\n")
