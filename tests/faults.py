"""A TCP proxy in front of a real server that a test can cut and restore: the service sees its
database or Redis become unreachable exactly as in a network failure."""

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; `cut` drops every connection and stops listening,
    `stall` holds every byte."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.port = 0

    def stall(self) -> None:
        """Keeps connections open but forwards nothing: a server that stopped answering."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forwards again."""
        self._flowing.set()

    @classmethod
    async def before(cls, url: str) -> "TcpProxy":
        """A started proxy in front of the server of a database or Redis URL."""
        parts = urlsplit(url)
        proxy = cls(parts.hostname or "127.0.0.1", parts.port or 0)
        await proxy.start()
        return proxy

    def url_through(self, url: str) -> str:
        """The URL with the proxy in place of the server (credentials and path kept)."""
        parts = urlsplit(url)
        credentials, _, _ = parts.netloc.rpartition("@")
        host = f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=f"{credentials}@{host}" if credentials else host))

    async def start(self) -> None:
        """Listens (on the same port again after a cut)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Stops listening and resets every open connection."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update({writer, upstream_writer})
        await asyncio.gather(
            self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        self._writers.discard(writer)
        writer.transport.abort()


class ReadOnlyRedis:
    """A server speaking Redis's protocol that answers every command as a read-only replica does
    after a failover."""

    REPLY = b"-READONLY You can't write against a read only replica.\r\n"

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ValueError):
            while True:
                header = await reader.readline()
                if not header:
                    break
                for _ in range(int(header[1:])):
                    length = int((await reader.readline())[1:])
                    await reader.readexactly(length + 2)
                writer.write(self.REPLY)
                await writer.drain()
        writer.close()
