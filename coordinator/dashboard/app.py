"""The dashboard's web server (aiohttp), beside the coordinator in its event loop or on its own.

Every request needs an operator token (`python -m coordinator operator-token`): as
`Authorization: Bearer <token>`, or once as `?token=<token>`, which sets an HttpOnly cookie and
redirects to the same page without it. No token: 401; a token the store does not know: 403.
Only GET and HEAD are served; nothing writes to the store.

Never slowing the rounds: the store is read in one thread of the dashboard's own, through its own
engine (its own connections), once a second while a page is open, whatever the number of pages;
each page gets the state over server-sent events when it changed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from coordinator.dashboard.page import ASSETS, asset, served_page
from coordinator.dashboard.snapshot import encode, snapshot
from coordinator.store import open_store
from fwdfed.net import is_loopback

log = logging.getLogger("coordinator.dashboard")

COOKIE = "fwdfed_operator"
POLL_S = 1.0
KEEPALIVE_S = 15.0
MAX_TOKEN = 256
HEADERS = {
    # plotly.js sets inline styles on what it draws; no script but the page's own files runs.
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Dashboard:
    def __init__(self, db, job_id: str, tls: bool = False, poll_s: float = POLL_S):
        self.db, self.job_id, self.tls, self.poll_s = str(db), job_id, tls, poll_s
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dashboard")
        self.store = None
        self.subscribers: set[asyncio.Queue] = set()
        self.text: str | None = None  # the latest state, as sent
        self.digest: str | None = None
        self.poller: asyncio.Task | None = None
        self.runner: web.AppRunner | None = None

    async def read(self, fn, *args):
        """Run a store read in the dashboard's thread: the event loop never waits on the database."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _open(self) -> None:
        self.store = open_store(self.db)  # a second engine: the coordinator's connections stay its own

    def _state(self) -> tuple[str, str]:
        return encode(snapshot(self.store, self.job_id))

    async def refresh(self) -> bool:
        """Read the state; True (and every page told) when it changed."""
        text, digest = await self.read(self._state)
        self.text = text
        if digest == self.digest:
            return False
        self.digest = digest
        for queue in list(self.subscribers):
            if queue.full():
                queue.get_nowait()  # a slow page skips to the newest state
            queue.put_nowait(text)
        return True

    async def poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            if self.subscribers:
                try:
                    await self.refresh()
                except Exception:  # the next poll tries again; the job goes on regardless
                    log.exception("dashboard: reading the store failed")

    # ---- access ----
    def token_of(self, request: web.Request) -> str | None:
        scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return request.query.get("token") or request.cookies.get(COOKIE) or None

    async def operator(self, token: str) -> str | None:
        return await self.read(self.store.operator, token[:MAX_TOKEN])

    @web.middleware
    async def guard(self, request: web.Request, handler):
        token = self.token_of(request)
        if token is None:
            raise web.HTTPUnauthorized(text="no operator token: open this page as /?token=TOKEN "
                                            "(python -m coordinator operator-token --db DB --out FILE issues one)\n",
                                       headers={**HEADERS, "WWW-Authenticate": "Bearer"})
        if await self.operator(token) is None:
            raise web.HTTPForbidden(text="the operator token is not valid (re-issued or never issued)\n",
                                    headers=HEADERS)
        if "token" in request.query:  # keep it out of the address bar and history: a cookie from now on
            response = web.HTTPSeeOther(request.rel_url.with_query({k: v for k, v in request.query.items()
                                                                    if k != "token"}))
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=self.tls, path="/")
            raise response
        response = await handler(request)
        response.headers.update(HEADERS)
        return response

    # ---- pages ----
    async def index(self, request: web.Request) -> web.Response:
        return web.Response(text=served_page(f"job {self.job_id}"), content_type="text/html")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound()
        return web.Response(body=asset(name), content_type=ASSETS[name])

    async def state(self, request: web.Request) -> web.Response:
        text, _ = await self.read(self._state)
        return web.Response(text=text, content_type="application/json")

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the state now, then each time it changes, until the token stops being valid."""
        token = self.token_of(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **HEADERS})
        await response.prepare(request)
        await self.refresh()  # this page starts from the state now, the others hear of it if it changed
        queue: asyncio.Queue = asyncio.Queue(maxsize=1)
        self.subscribers.add(queue)
        try:
            text = self.text
            while text is not None:  # None: the dashboard is closing
                await response.write(f"event: state\ndata: {text}\n\n".encode())
                while True:
                    try:
                        text = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                        break
                    except TimeoutError:
                        await response.write(b": keep-alive\n\n")
                if text is not None and await self.operator(token) is None:
                    break
        except ConnectionResetError:  # the page was closed
            pass
        finally:
            self.subscribers.discard(queue)
        return response

    async def _close_streams(self, app) -> None:
        for queue in list(self.subscribers):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.guard])
        app.router.add_get("/", self.index)
        app.router.add_get("/static/{name}", self.static)
        app.router.add_get("/api/state", self.state)
        app.router.add_get("/api/events", self.events)
        app.on_shutdown.append(self._close_streams)
        return app

    # ---- running ----
    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> str:
        """Listen on host:port (0: a free port); returns the page's address."""
        await self.read(self._open)
        self.runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=2.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=tls)
        await site.start()
        bound = self.runner.addresses[0][1]
        self.poller = asyncio.create_task(self.poll())
        shown = f"[{host}]" if ":" in host else host
        return f"{'https' if tls else 'http'}://{shown}:{bound}/"

    async def stop(self) -> None:
        if self.poller is not None:
            self.poller.cancel()
        if self.runner is not None:
            await self.runner.cleanup()
        self.pool.shutdown(wait=False)


def announce(url: str, host: str, db, tls: bool) -> None:
    print(f"dashboard on {url} (open {url}?token=TOKEN; python -m coordinator operator-token --db {db} "
          "--out FILE issues the token)", flush=True)
    if not tls and not is_loopback(host):
        print(f"warning: the dashboard listens on {host} without TLS: the operator token crosses the network "
              "in the clear; pass --cert and --key", file=sys.stderr, flush=True)


async def alongside(job_run, db, job_id: str, address: tuple[str, int], tls: ssl.SSLContext | None = None):
    """Run the coordinator's `job_run` with the dashboard beside it, in the same event loop; its result."""
    dashboard = Dashboard(db, job_id, tls=tls is not None)
    url = await dashboard.start(*address, tls)
    announce(url, address[0], db, tls is not None)
    try:
        return await job_run
    finally:
        await dashboard.stop()


async def serve_forever(db, job_id: str, address: tuple[str, int], tls: ssl.SSLContext | None = None) -> None:
    """`python -m coordinator dashboard`: serve until interrupted."""
    dashboard = Dashboard(db, job_id, tls=tls is not None)
    url = await dashboard.start(*address, tls)
    announce(url, address[0], db, tls is not None)
    try:
        await asyncio.Event().wait()
    finally:
        await dashboard.stop()
