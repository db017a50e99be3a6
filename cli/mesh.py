"""Where the mesh is, the token to call it with, and running a command's calls: gRPC failures
become one line on stderr and exit status 1, never a traceback."""

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, TypeVar

import click
import grpc

from c360.common.v1 import common_pb2
from services.identity.identifiers import TYPES as IDENTIFIER_TYPES

Service = Literal["identity", "profile", "enrichment", "gate", "gdpr"]
DEFAULT_PORTS: dict[Service, int] = {
    "identity": 50051,
    "profile": 50052,
    "enrichment": 50053,
    "gate": 50054,
    "gdpr": 50055,
}
# Each command's own connection: a run never inherits another's failed one (gRPC shares
# subchannels between channels of one process otherwise).
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]

T = TypeVar("T")


class Mesh:
    """The services' addresses and the bearer token."""

    def __init__(self, addresses: dict[Service, str], token: str | None) -> None:
        self.addresses = addresses
        self._token = token

    @property
    def token(self) -> str:
        """The token; asked for only by a command that calls the mesh, so that `--help` of
        every command works without one."""
        if not self._token:
            raise click.UsageError("Missing option '--token' (or C360_TOKEN).")
        return self._token

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    def channel(self, service: Service) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.addresses[service], options=CHANNEL_OPTIONS)


def run(work: Coroutine[Any, Any, T]) -> T:
    """Runs a command's calls; a failed call ends the command with its status and details."""
    try:
        return asyncio.run(work)
    except grpc.aio.AioRpcError as error:
        raise click.ClickException(f"{error.code().name}: {error.details()}") from None


async def every_page(fetch: Callable[[str], Awaitable[Any]], field: str) -> list[Any]:
    """Every item of a paged listing: `fetch(page_token)` answers one page, whose `field` holds
    the items and `next_page_token` where the next starts (empty after the last)."""
    found: list[Any] = []
    token = ""
    while True:
        page = await fetch(token)
        found.extend(getattr(page, field))
        token = page.next_page_token
        if not token:
            return found


def address_options(command: Any) -> Any:
    """`--identity`, `--profile`, … (or C360_IDENTITY_ADDR, …) on the root command."""
    for service, port in reversed(DEFAULT_PORTS.items()):
        command = click.option(
            f"--{service}",
            envvar=f"C360_{service.upper()}_ADDR",
            default=f"localhost:{port}",
            show_default=True,
            help=f"Address of the {service} service.",
        )(command)
    return command


def person_options(command: Any) -> Any:
    """`--person ID` or `--identifier TYPE=VALUE`: the person a command is about."""
    command = click.option(
        "--identifier",
        metavar="TYPE=VALUE",
        help="One of their identifiers, e.g. email=ana@example.com; TYPE is one of "
        f"{', '.join(IDENTIFIER_TYPES)}.",
    )(command)
    return click.option("--person", "person_id", help="The person's id.")(command)


def person_ref(person_id: str | None, identifier: str | None) -> common_pb2.PersonRef:
    """The PersonRef the options name (exactly one of them)."""
    if bool(person_id) == bool(identifier):
        raise click.UsageError("give exactly one of --person and --identifier")
    if person_id:
        return common_pb2.PersonRef(person_id=person_id)
    kind, _, value = (identifier or "").partition("=")
    if kind not in IDENTIFIER_TYPES or not value:
        raise click.UsageError(
            f"--identifier takes TYPE=VALUE with TYPE one of {', '.join(IDENTIFIER_TYPES)}"
        )
    return common_pb2.PersonRef(identifier=common_pb2.Identifier(type=kind, value=value))
