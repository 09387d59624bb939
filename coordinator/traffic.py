"""Bytes each device's connection carries, counted per message and added to the store's device
totals about once a second (the operator's dashboard shows them).

A write per message would add a transaction to every task and update; one write a second for
the whole fleet does not, and runs in a thread so the event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.exc import OperationalError
from websockets.asyncio.server import ServerConnection

from coordinator.store import Store
from fwdfed.errors import first_line

log = logging.getLogger("coordinator")

FLUSH_S = 1.0


class CountingConnection(ServerConnection):
    """A server connection that counts the bytes of the messages it receives (up) and sends (down), and, once
    `Traffic.watch` named its device, notes itself among the connections that carried bytes since the last take."""

    bytes_up = bytes_down = 0
    settled_up = settled_down = 0  # what has been handed to Traffic already
    device_id: str | None = None
    carried: set | None = None  # Traffic's: a take then settles only the connections that carried something

    async def recv(self, decode: bool | None = None):
        message = await super().recv(decode)
        self.bytes_up += len(message)
        if self.carried is not None:
            self.carried.add(self)
        return message

    async def send(self, message, *, text: bool | None = None) -> None:
        await super().send(message, text=text)
        if isinstance(message, (bytes, bytearray, memoryview, str)):  # the coordinator sends whole frames only
            self.bytes_down += len(message)
            if self.carried is not None:
                self.carried.add(self)


class Traffic:
    def __init__(self, store: Store):
        self.store = store
        self.pending: dict[str, list[int]] = {}  # device -> [up, down] not yet written
        self.carried: set[CountingConnection] = set()  # connections with bytes not yet settled

    def watch(self, device_id: str, ws) -> None:
        """Count `ws`'s bytes as `device_id`'s from now on (its hello's included)."""
        if isinstance(ws, CountingConnection):
            ws.device_id, ws.carried = device_id, self.carried
            self.carried.add(ws)

    def settle(self, device_id: str, ws) -> None:
        """Move what `ws` carried since it was last settled to `device_id`'s pending counts."""
        up, down = getattr(ws, "bytes_up", 0) - getattr(ws, "settled_up", 0), \
            getattr(ws, "bytes_down", 0) - getattr(ws, "settled_down", 0)
        if up or down:
            counts = self.pending.setdefault(device_id, [0, 0])
            counts[0] += up
            counts[1] += down
            ws.settled_up, ws.settled_down = ws.bytes_up, ws.bytes_down

    def take(self) -> dict[str, list[int]]:
        """The counts of every connection that carried bytes since the last take (closed ones included):
        the fleet's idle connections cost nothing."""
        for ws in list(self.carried):
            self.settle(ws.device_id, ws)
        self.carried.clear()
        counts, self.pending = self.pending, {}
        return counts

    def flush(self) -> None:
        if counts := self.take():
            self.store.add_traffic(counts)

    async def run(self) -> None:
        """Write the counts every FLUSH_S seconds until cancelled."""
        while True:
            await asyncio.sleep(FLUSH_S)
            if counts := self.take():
                try:
                    await asyncio.to_thread(self.store.add_traffic, counts)
                except OperationalError as e:  # the database cannot be written: the job's own writes will say so
                    log.warning("could not store the devices' byte counts: %s", first_line(e.orig or e))
                except Exception:  # a figure for the operator: losing it must not stop the job
                    log.exception("could not store the devices' byte counts")
