"""A coordinator that follows a script: for the Java device's tests of what the real one never
sends (malformed tasks, frames that break the protocol) and of connections that drop at a
chosen moment. It listens on loopback in a thread of its own and records every frame it receives.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection, serve


class ScriptedCoordinator:
    """`script(ws, connection_number)` plays one connection (numbered from 0); `refuse(n)` says
    whether the n-th handshake is refused with HTTP 503, as a full coordinator does."""

    def __init__(self, script: Callable[[ServerConnection, int], Awaitable[None]],
                 refuse: Callable[[int], bool] = lambda n: False):
        self.script, self.refuse = script, refuse
        self.received: list[bytes] = []  # every binary frame, in order, across connections
        self.handshakes = 0
        self.connections = 0
        self.errors: list[BaseException] = []
        self._ready = threading.Event()
        self._stop: asyncio.Future | None = None
        self._active = 0  # connections whose script is still playing
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the scripted coordinator did not start")

    async def _serve(self):
        self._loop = asyncio.get_running_loop()
        self._stop = self._loop.create_future()

        def handshake(connection, request):
            n = self.handshakes
            self.handshakes += 1
            if self.refuse(n):
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "full for now\n")
            return None

        async def handle(ws: ServerConnection):
            n = self.connections
            self.connections += 1
            self._active += 1
            try:
                await self.script(ws, n)
            except Exception as e:  # noqa: BLE001 - a failed expectation of the script: the test reports it
                if not type(e).__name__.startswith("ConnectionClosed"):
                    self.errors.append(e)
            finally:
                self._active -= 1

        async with serve(handle, "127.0.0.1", 0, process_request=handshake, max_size=None) as server:
            self.url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            self._ready.set()
            await self._stop

    async def recv(self, ws: ServerConnection, timeout: float = 120) -> bytes:
        frame = await asyncio.wait_for(ws.recv(), timeout)
        self.received.append(frame)
        return frame

    async def _drain_and_stop(self, timeout: float):
        """Stop once every script has played to its end (a device that sent its last frame and left: its
        script reads that frame before the connection's close ends it), or after `timeout`."""
        deadline = self._loop.time() + timeout
        while self._active and self._loop.time() < deadline:
            await asyncio.sleep(0.05)
        self._stop.set_result(None)

    def close(self, timeout: float = 10):
        if self._stop is not None:
            asyncio.run_coroutine_threadsafe(self._drain_and_stop(timeout), self._loop)
        self._thread.join(timeout + 10)
