"""The load benchmark's devices: thousands of protocol clients per process, lean enough that the
coordinator, not they, sets the pace (benchmarks/coordinator_load.py drives them).

Each device is websockets' Sans-I/O client (`ClientProtocol`) on an asyncio transport: no task and
no queue per connection. It says hello, and answers each task with a seed-form update that it
encodes, frames and masks as soon as the task arrives, and writes only on the driver's `go`: the
fleet's devices then answer at once, as if they had all finished training together. A worker
process runs one `Fleet` and speaks to the driver over a pipe:

    worker -> driver   ("connected", devices, seconds)
                       ("tasked", round, when)          every device holds its task of `round`
                       ("acked", round, first, last, accepted, refused, cpu)
                                                        first update written, last ack read (time.time()),
                                                        this process's CPU seconds in between
                       ("done",) | ("failed", why)
    driver -> worker   ("go",)                          write every device's update now
"""

from __future__ import annotations

import asyncio
import random
import time
from urllib.parse import urlsplit

import msgpack
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from fwdfed import protocol
from fwdfed import task_keys as keys
from fwdfed.directions import SEED_LIMIT, seed_pool

CONNECTING_AT_ONCE = 64  # per worker: devices arrive in waves, as a fleet does, not in one burst


class Device(asyncio.Protocol):
    """One device's connection. Everything it receives goes to its fleet."""

    def __init__(self, fleet: Fleet, device_id: str):
        self.fleet, self.device_id = fleet, device_id
        self.ws = ClientProtocol(fleet.uri, max_size=protocol.MAX_FRAME_BYTES)
        self.transport: asyncio.Transport | None = None
        self.welcomed = fleet.loop.create_future()
        self.update = b""  # its answer to the current task, framed and masked, written on `go`

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.ws.send_request(self.ws.connect())
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Response):
                if self.ws.handshake_exc is not None:
                    self.fleet.fail(f"{self.device_id}: handshake refused: {self.ws.handshake_exc}")
                else:
                    self.ws.send_binary(self.fleet.hello(self.device_id))
            elif event.opcode is Opcode.BINARY:
                self.fleet.received(self, msgpack.unpackb(event.data))
        self.flush()  # the hello, and the pongs the protocol answers pings with

    def connection_lost(self, exc) -> None:
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError(f"{self.device_id}: connection lost before welcome"))
        self.fleet.lost(self)

    def flush(self) -> None:
        for data in self.ws.data_to_send():
            if data:
                self.transport.write(data)

    def hold(self, frame: bytes) -> None:
        """Frame and mask `frame` now; `send` writes it."""
        self.ws.send_binary(frame)
        self.update = b"".join(self.ws.data_to_send())

    def send(self) -> None:
        self.transport.write(self.update)
        self.update = b""


class Fleet:
    def __init__(self, pipe, url: str, device_ids: list[str], base_model_hash: str, adapter_dim: int, pairs: int):
        self.pipe, self.url, self.ids = pipe, url, device_ids
        self.hash, self.dim, self.pairs = base_model_hash, adapter_dim, pairs
        self.uri = parse_uri(url)
        self.loop = asyncio.get_running_loop()
        self.devices: list[Device] = []
        self.rng = random.Random(len(device_ids))
        self.pools: dict[tuple, list[int]] = {}
        self.tasked: dict[int, int] = {}
        self.connected = False  # "connected" sent to the driver
        self.fully_tasked: tuple[int, float] | None = None  # (round, when) every device last held its task
        self.round = 0
        self.acked = self.accepted = 0
        self.first = self.last = self.cpu = 0.0
        self.done = 0
        self.ended = self.loop.create_future()

    def hello(self, device_id: str) -> bytes:
        return protocol.Hello(device_id=device_id, base_model_hash=self.hash, adapter_dim=self.dim, num_examples=10,
                              mem_budget_bytes=None).to_wire()

    def seeds(self, hparams: dict) -> list[int]:
        """`pairs` seeds: from the task's seed pool when it names one (else they would be refused), else any."""
        size, key = hparams.get(keys.SEED_POOL), hparams.get(keys.SEED_POOL_KEY)
        if size is None:
            return [self.rng.randrange(SEED_LIMIT) for _ in range(self.pairs)]
        if (size, key) not in self.pools:
            self.pools[size, key] = [int(s) for s in seed_pool(int(key, 16), size)]
        return self.rng.sample(self.pools[size, key], min(self.pairs, size))

    def received(self, device: Device, message: dict) -> None:
        kind = message.get("type")
        if kind == "task":
            seeds = self.seeds(message["hparams"])
            device.hold(msgpack.packb({
                "type": "update", "v": protocol.PROTOCOL_VERSION, "task_id": message["task_id"],
                "job_id": message["job_id"], "round": message["round"], "global_version": message["global_version"],
                "seeds": seeds, "coefs": [1e-4] * len(seeds), "scale": 1.0, "dense": b"", "num_examples": 10,
                "loss_before": 1.0, "loss_after": 0.9, "peak_rss_bytes": 1}, use_bin_type=True))
            number = message["round"]
            self.tasked[number] = self.tasked.get(number, 0) + 1
            if self.tasked[number] == len(self.ids):
                self.round = number
                self.fully_tasked = (number, time.time())
                if self.connected:  # else `connect` reports it, after "connected": a server can task at once
                    self.pipe.send(("tasked", *self.fully_tasked))
        elif kind == "ack":
            self.last = time.time()
            self.acked += 1
            self.accepted += message["accepted"]
            if self.acked == len(self.ids):
                self.pipe.send(("acked", self.round, self.first, self.last, self.accepted, self.acked - self.accepted,
                                time.process_time() - self.cpu))
        elif kind == "welcome":
            device.welcomed.set_result(None)
        elif kind == "done":
            self.done += 1
            if self.done == len(self.ids) and not self.ended.done():
                self.ended.set_result(None)
        else:
            self.fail(f"{device.device_id}: unexpected {message}")

    def lost(self, device: Device) -> None:
        if self.done < len(self.ids) and device.welcomed.done():
            self.fail(f"{device.device_id}: the coordinator closed the connection before the job ended")

    def fail(self, why: str) -> None:
        if not self.ended.done():
            self.ended.set_exception(RuntimeError(why))

    def go(self) -> None:
        self.acked = self.accepted = 0
        self.cpu, self.first = time.process_time(), time.time()
        for device in self.devices:
            device.send()

    async def connect(self) -> None:
        start = time.perf_counter()
        host, port = urlsplit(self.url).hostname, urlsplit(self.url).port
        gate = asyncio.Semaphore(CONNECTING_AT_ONCE)

        async def one(device_id: str) -> None:
            async with gate:
                device = Device(self, device_id)
                await self.loop.create_connection(lambda: device, host, port)
                self.devices.append(device)
                await asyncio.wait_for(device.welcomed, 120)

        await asyncio.gather(*(one(d) for d in self.ids))
        self.pipe.send(("connected", len(self.devices), time.perf_counter() - start))
        self.connected = True
        if self.fully_tasked is not None:
            self.pipe.send(("tasked", *self.fully_tasked))

    async def run(self) -> None:
        await self.connect()
        self.loop.add_reader(self.pipe.fileno(), self.order)
        try:
            await self.ended
        finally:
            self.loop.remove_reader(self.pipe.fileno())
            for device in self.devices:
                device.transport.close()

    def order(self) -> None:
        if self.pipe.recv() == ("go",):
            self.go()


def worker(pipe, url: str, device_ids: list[str], base_model_hash: str, adapter_dim: int, pairs: int) -> None:
    """A worker process's body: run a fleet until the job is done, and say how it ended."""
    async def main():
        await Fleet(pipe, url, device_ids, base_model_hash, adapter_dim, pairs).run()

    try:
        asyncio.run(main())
        pipe.send(("done",))
    except Exception as e:  # reported to the driver, which stops the run with it
        pipe.send(("failed", f"{type(e).__name__}: {e}"))
