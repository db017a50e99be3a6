"""The real PostgreSQL and Redis the suite runs against: the configured ones when reachable,
otherwise throwaway ones started from local binaries, otherwise a clear failure."""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
START_TIMEOUT_SECONDS = 30.0


class BackingUnavailable(Exception):
    """A backing service is neither reachable nor startable; the message says what to install."""


def reachable(host: str, port: int) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def _wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not check():
        if time.monotonic() > deadline:
            raise BackingUnavailable(f"{what} did not start within {START_TIMEOUT_SECONDS:.0f}s")
        time.sleep(0.1)


@dataclass
class Backing:
    """URLs of the PostgreSQL and Redis in use, and what to stop at the end."""

    database_url: str
    redis_url: str
    _started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _folders: list[str] = field(default_factory=list)

    def stop(self) -> None:
        """Stops what this run started; leaves configured services alone."""
        for process in self._started:
            process.terminate()
            process.wait(timeout=30)
        for folder in self._folders:
            shutil.rmtree(folder, ignore_errors=True)


def _as_postgres_user(argv: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI machines run tests as root.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


def _start_postgres(backing: Backing) -> str:
    initdb, postgres = _binary("initdb"), _binary("postgres")
    if not (initdb and postgres):
        raise BackingUnavailable(
            "PostgreSQL is not reachable and no initdb/postgres binaries were found: install "
            "PostgreSQL (Debian: apt-get install postgresql) or set DATABASE_URL to a reachable "
            "postgresql+asyncpg:// URL."
        )
    folder = tempfile.mkdtemp(prefix="c360-pg-")
    backing._folders.append(folder)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data = str(Path(folder) / "data")
    port = free_port()
    subprocess.run(
        _as_postgres_user([initdb, "-D", data, "-A", "trust", "-U", "postgres"]),
        check=True,
        capture_output=True,
    )
    backing._started.append(
        subprocess.Popen(
            _as_postgres_user(
                [
                    postgres,
                    "-D",
                    data,
                    "-p",
                    str(port),
                    "-k",
                    folder,
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    _wait_until(lambda: reachable("127.0.0.1", port), "throwaway PostgreSQL")
    createdb = _binary("createdb")
    if createdb:
        _wait_until(
            lambda: (
                subprocess.run(
                    _as_postgres_user(
                        [createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "test"]
                    ),
                    capture_output=True,
                ).returncode
                == 0
            ),
            "creating database test",
        )
    return f"postgresql+asyncpg://postgres@127.0.0.1:{port}/test"


def _start_redis(backing: Backing) -> str:
    server = shutil.which("redis-server")
    if not server:
        raise BackingUnavailable(
            "Redis is not reachable and no redis-server binary was found: install Redis "
            "(Debian: apt-get install redis-server) or set REDIS_URL to a reachable redis:// URL."
        )
    port = free_port()
    backing._started.append(
        subprocess.Popen(
            [
                server,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    _wait_until(lambda: reachable("127.0.0.1", port), "throwaway Redis")
    return f"redis://127.0.0.1:{port}/0"


def provide() -> Backing:
    """PostgreSQL and Redis at DATABASE_URL / REDIS_URL (or the defaults), started if need be."""
    backing = Backing(
        os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL),
        os.environ.get("REDIS_URL", DEFAULT_REDIS_URL),
    )
    database = urlsplit(backing.database_url)
    if not reachable(database.hostname or "127.0.0.1", database.port or 5432):
        backing.database_url = _start_postgres(backing)
    redis_url = urlsplit(backing.redis_url)
    if not reachable(redis_url.hostname or "127.0.0.1", redis_url.port or 6379):
        backing.redis_url = _start_redis(backing)
    return backing
