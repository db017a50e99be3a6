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


def _wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not check():
        if time.monotonic() > deadline:
            raise BackingUnavailable(
                f"{what} did not become ready within {START_TIMEOUT_SECONDS:.0f}s"
            )
        time.sleep(0.1)


def _postgres_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def _as_postgres_user(argv: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root, and CI runs the suite as root.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


class LocalPostgres:
    """A throwaway PostgreSQL cluster in a temporary folder, stoppable and restartable on the
    same port."""

    def __init__(self) -> None:
        initdb = _postgres_binary("initdb")
        if not (initdb and _postgres_binary("pg_ctl")):
            raise BackingUnavailable(
                "PostgreSQL is not reachable and no initdb/pg_ctl binaries were found: install "
                "PostgreSQL (Debian: apt-get install postgresql) or set DATABASE_URL to a "
                "reachable postgresql+asyncpg:// URL."
            )
        self.folder = tempfile.mkdtemp(prefix="c360-pg-")
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self.port = free_port()
        self.running = False
        subprocess.run(
            _as_postgres_user([initdb, "-D", self._data, "-A", "trust", "-U", "postgres"]),
            check=True,
            capture_output=True,
        )
        self.start()
        createdb = _postgres_binary("createdb") or "createdb"
        subprocess.run(
            _as_postgres_user(
                [createdb, "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "test"]
            ),
            check=True,
            capture_output=True,
        )

    @property
    def _data(self) -> str:
        return str(Path(self.folder) / "data")

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of its `test` database."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/test"

    def _pg_ctl(self, *args: str) -> None:
        pg_ctl = _postgres_binary("pg_ctl") or "pg_ctl"
        subprocess.run(
            _as_postgres_user(
                [pg_ctl, "-D", self._data, "-t", str(int(START_TIMEOUT_SECONDS)), *args]
            ),
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        """Starts the server and waits until it accepts connections."""
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg_ctl("-o", options, "-l", str(Path(self.folder) / "log"), "-w", "start")
        self.running = True

    def stop(self) -> None:
        """Stops the server at once, terminating open connections (pg_ctl's fast mode)."""
        if self.running:
            self._pg_ctl("-m", "fast", "-w", "stop")
            self.running = False

    def remove(self) -> None:
        """Stops the server and deletes its folder."""
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


class LocalRedis:
    """A throwaway Redis that keeps nothing on disk."""

    def __init__(self) -> None:
        server = shutil.which("redis-server")
        if not server:
            raise BackingUnavailable(
                "Redis is not reachable and no redis-server binary was found: install Redis "
                "(Debian: apt-get install redis-server) or set REDIS_URL to a reachable "
                "redis:// URL."
            )
        self._server = server
        self.port = free_port()
        self.start()

    def start(self) -> None:
        """Starts the server (empty: it keeps nothing) and waits until it accepts connections."""
        self._process = subprocess.Popen(
            [self._server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_until(lambda: reachable("127.0.0.1", self.port), "throwaway Redis")

    @property
    def url(self) -> str:
        """Its redis:// URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def remove(self) -> None:
        """Stops the server, losing everything it held."""
        self._process.terminate()
        self._process.wait(timeout=START_TIMEOUT_SECONDS)


@dataclass
class Backing:
    """URLs of the PostgreSQL and Redis in use, and the throwaway servers to remove at the end."""

    database_url: str
    redis_url: str
    throwaway: list[LocalPostgres | LocalRedis] = field(default_factory=list)

    def stop(self) -> None:
        """Removes what this run started; leaves configured services alone."""
        for server in self.throwaway:
            server.remove()


def provide() -> Backing:
    """PostgreSQL and Redis at DATABASE_URL / REDIS_URL (or the defaults), started if need be."""
    backing = Backing(
        os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL),
        os.environ.get("REDIS_URL", DEFAULT_REDIS_URL),
    )
    database = urlsplit(backing.database_url)
    if not reachable(database.hostname or "127.0.0.1", database.port or 5432):
        postgres = LocalPostgres()
        backing.throwaway.append(postgres)
        backing.database_url = postgres.url
    redis_url = urlsplit(backing.redis_url)
    if not reachable(redis_url.hostname or "127.0.0.1", redis_url.port or 6379):
        redis = LocalRedis()
        backing.throwaway.append(redis)
        backing.redis_url = redis.url
    return backing
