"""`c360 --help` everywhere: every command and subcommand explains itself without a token or a
mesh; a command that calls the mesh asks for the token."""

import click
import pytest
from click.testing import CliRunner

from cli.main import main


def commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The path of every command under the group."""
    found = []
    for name, command in sorted(group.commands.items()):
        found.append((*path, name))
        if isinstance(command, click.Group):
            found += commands(command, (*path, name))
    return found


def test_the_root_help_lists_every_command() -> None:
    shown = CliRunner(env={"C360_TOKEN": ""}).invoke(main, ["--help"])
    assert shown.exit_code == 0, shown.output
    listed = shown.output.split("Commands:\n")[1].split()
    assert [word for word in listed if word in main.commands] == sorted(main.commands)
    assert sorted(main.commands) == [
        "demo", "dlq", "duplicates", "enrich", "export", "gdpr", "import", "report",
    ]  # fmt: skip


@pytest.mark.parametrize("path", commands(main), ids=" ".join)
def test_every_command_has_help_without_a_token(path: tuple[str, ...]) -> None:
    shown = CliRunner(env={"C360_TOKEN": ""}).invoke(main, [*path, "--help"], prog_name="c360")
    assert shown.exit_code == 0, shown.output
    assert shown.output.startswith(f"Usage: c360 {' '.join(path)} ")


def test_a_command_that_calls_the_mesh_asks_for_the_token() -> None:
    refused = CliRunner(env={"C360_TOKEN": ""}).invoke(main, ["report", "--shop", "s"])
    assert refused.exit_code == 2
    assert refused.output.endswith("Error: Missing option '--token' (or C360_TOKEN).\n")
