"""uvicorn on the caller's event loop: the HTTP side port shares the loop of the gRPC server
(one process, no thread), and never touches the process's signals or logging set-up."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator

import uvicorn
from starlette.types import ASGIApp


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The coordinator handles SIGINT/SIGTERM itself (coordinator.app.serve), and stops
        # this server on its way down.
        yield


class HttpServer:
    """Serves ``app`` on ``host:port`` from :meth:`start` to :meth:`stop`."""

    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._sock: socket.socket | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    def bind(self) -> int:
        """Binds the port (``port`` 0 picks one) and returns it; serving starts with
        :meth:`start`.

        Raises:
            OSError: the address cannot be bound (in use, or not of this host).
        """
        if self._sock is None:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            try:
                self._sock = socket.create_server((self.host, self.port), family=family)
            except OSError as exc:
                raise OSError(f"cannot listen on {self.host}:{self.port} for HTTP "
                              f"({exc.strerror or exc})") from None
            self.port = self._sock.getsockname()[1]
        return self.port

    async def start(self) -> int:
        """Serves on the bound port (binding it first if :meth:`bind` was not called) and
        returns it. Raises OSError as :meth:`bind` does."""
        self.bind()
        assert self._sock is not None
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False,
                                timeout_graceful_shutdown=1, server_header=False)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]),
                                         name="fedcoord-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"the HTTP server on {self.host}:{self.port} did not start")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        """Stops accepting, lets requests in flight finish (at most about a second)."""
        if self._server is None or self._task is None:
            if self._sock is not None:  # bound, never served
                self._sock.close()
                self._sock = None
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._server = self._task = None
        self._sock = None
