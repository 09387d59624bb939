"""A fleet of model-free devices in one process that reconnect as a device should and keep a record of every
update they sent and every answer they got: what the fault tests weigh the coordinator's database against.

    python -m tests.support.device_fleet --url ws://192.0.2.1:8765 --bundle BUNDLE --devices 21 \\
        --addresses 192.0.2.10 192.0.2.11 ... --report fleet.json --within 120

Each device answers every task with a made-up seed-form update that depends only on the device and the
task (the same task answered twice gives the same update), after a pause of up to `--think` seconds (so a
round's updates arrive spread out, as a fleet's do). A device that loses its connection reconnects with
backoff (0.2 s doubling to 2 s, docs/protocol.md; each attempt given up after `--open-timeout` s, 10 as in
the device SDK), also when refused as `duplicate_device`, and sends again every update it had sent without getting
its ack; a task the coordinator sends again meanwhile is not answered twice (a device reads nothing while it
"thinks", as the SDK reads nothing while it trains: answering again, it would miss the ack and the `done` of
a coordinator that closes the job meanwhile). It stops at `done`, at any other `error`, or when `--within`
seconds have passed (or at SIGTERM): the fleet never hangs. The report (JSON) has, per device, the times it
was welcomed and, per task, the round, the update's seeds and coefficients, how often it was sent, and every
ack.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import signal
import sys
import time
from pathlib import Path

from websockets.exceptions import ConnectionClosed, InvalidHandshake

from fwdfed import protocol
from tests.support.protocol_client import ProtocolClient

RETRYABLE = (OSError, InvalidHandshake, TimeoutError, ConnectionClosed)


class Reconnect(Exception):
    """The coordinator still holds this device's previous connection (`duplicate_device`): wait and come back."""


def update_pairs(device_id: str, task_id: str, pairs: int) -> tuple[list[int], list[float]]:
    """The update a device sends for a task: the same for the same task, whichever connection it goes on."""
    digest = hashlib.sha256(f"{device_id}/{task_id}".encode()).digest()
    rng = random.Random(digest)
    return [rng.randrange(1 << 62) for _ in range(pairs)], [rng.uniform(-1e-4, 1e-4) for _ in range(pairs)]


class RecordingDevice(ProtocolClient):
    def __init__(self, url: str, device_id: str, base_model_hash: str, adapter_dim: int, *, address: str | None,
                 token=None, think_s: float = 0.0, pairs: int = 4, ping_s: float = 2.0, open_timeout_s: float = 10.0,
                 seed: int = 0):
        super().__init__(url, device_id, base_model_hash, adapter_dim, token)
        # The source address (one per device: a partition cuts some devices off, not all); pings every
        # ping_s, so a connection that died without a close is noticed within 2 × ping_s, as the coordinator
        # notices it within 2 × its heartbeat.
        self.options.update(ping_interval=ping_s, ping_timeout=ping_s, close_timeout=2)
        if address is not None:
            self.options["local_addr"] = (address, 0)
        self.address, self.think_s, self.pairs, self.open_timeout_s = address, think_s, pairs, open_timeout_s
        self.rng = random.Random(f"{seed}/{device_id}")
        self.welcomed: list[float] = []  # wall-clock times of each welcome
        self.tasks: dict[str, dict] = {}
        self.unacked: dict[str, protocol.Update] = {}  # sent, no ack yet: sent again after a reconnect
        self.done, self.error, self.last_failure = False, None, None

    async def run(self, until: float) -> None:
        """Take tasks until done, refused, or `until` (time.monotonic)."""
        backoff = 0.2
        while not self.done and self.error is None and (left := until - time.monotonic()) > 0:
            try:  # each attempt bounded: a connection opened into a partition waits on TCP's own SYN backoff
                self.ws = await asyncio.wait_for(self._connect(), min(left, self.open_timeout_s))
            except RETRYABLE as e:
                self.last_failure = f"connect: {e!r}"
                await asyncio.sleep(min(backoff, max(0.0, until - time.monotonic())))
                backoff = min(2 * backoff, 2.0)
                continue
            try:
                await self._session(until)
                backoff = 0.2
            except Reconnect as e:
                self.last_failure = str(e)
                await asyncio.sleep(min(backoff, max(0.0, until - time.monotonic())))
                backoff = min(2 * backoff, 2.0)
            except RETRYABLE as e:
                self.last_failure = f"session: {e!r}"
            finally:
                await self.ws.close()

    async def _next(self, until: float) -> protocol.Message:
        return await self.recv(timeout=max(0.0, until - time.monotonic()))

    async def _session(self, until: float) -> None:
        await self.send(protocol.Hello(device_id=self.device_id, base_model_hash=self.hash, adapter_dim=self.dim,
                                       num_examples=10, mem_budget_bytes=None))
        message = await self._next(until)
        if isinstance(message, protocol.Error):
            return self._refused(message)
        self.welcomed.append(time.time())
        for update in list(self.unacked.values()):  # the ack may have been lost with the connection
            self.tasks[update.task_id]["sends"] += 1
            await self.send(update)
        while True:
            message = await self._next(until)
            if isinstance(message, protocol.Task):
                await self._answer(message)
            elif isinstance(message, protocol.Ack):
                record = self.tasks[message.task_id]
                record["acks"].append([message.accepted, message.reason])
                self.unacked.pop(message.task_id, None)
            elif isinstance(message, protocol.Done):
                self.done = True
                return
            elif isinstance(message, protocol.Error):
                return self._refused(message)

    async def _answer(self, task: protocol.Task) -> None:
        record = self.tasks.setdefault(task.task_id, {"round": task.round, "version": task.global_version,
                                                      "received": 0, "sends": 0, "acks": []})
        record["received"] += 1
        if task.task_id in self.unacked:  # sent again on this connection already, just after the welcome
            return
        if self.think_s:
            await asyncio.sleep(self.rng.uniform(0, self.think_s))
        seeds, coefs = update_pairs(self.device_id, task.task_id, self.pairs)
        record["seeds"], record["coefs"] = seeds, coefs
        update = self.update(task, seeds=seeds, coefs=coefs)
        self.unacked[task.task_id] = update
        record["sends"] += 1
        await self.send(update)

    def _refused(self, error: protocol.Error) -> None:
        if error.code == "duplicate_device":
            raise Reconnect(f"duplicate_device: {error.message}")
        self.error = f"{error.code}: {error.message}"

    def report(self) -> dict:
        return {"address": self.address, "welcomed": self.welcomed, "done": self.done, "error": self.error,
                "last_failure": self.last_failure, "tasks": self.tasks}


async def run_fleet(devices: list[RecordingDevice], within_s: float) -> None:
    """Run the devices until each stops, `within_s` passes, or SIGTERM (then the report is still written)."""
    until = time.monotonic() + within_s
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    runs = asyncio.gather(*(d.run(until) for d in devices))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({runs, stopped}, return_when=asyncio.FIRST_COMPLETED)
    for task in (runs, stopped):
        task.cancel()
    await asyncio.gather(runs, stopped, return_exceptions=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--bundle", type=Path, required=True, help="the job's bundle: its model hash and adapter size")
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--prefix", default="dev", help="device ids are PREFIX-0, PREFIX-1, ...")
    parser.add_argument("--addresses", nargs="*", default=[],
                        help="source address of device i: the i-th of these, cycling (default: the system's choice)")
    parser.add_argument("--credentials", type=Path, help="`coordinator enrol`'s file (default: no credential)")
    parser.add_argument("--think", type=float, default=0.0, help="each task answered after up to this many seconds")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--ping", type=float, default=2.0, help="seconds between a device's pings")
    parser.add_argument("--open-timeout", type=float, default=10.0,
                        help="seconds a connection attempt may take (its TCP connect and handshake)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--within", type=float, required=True, help="seconds after which every device gives up")
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args(argv)
    from fwdfed.bundle.manifest import load_bundle

    manifest = load_bundle(args.bundle, check_program=False).manifest
    credentials = json.loads(args.credentials.read_text()) if args.credentials else {}
    names = [f"{args.prefix}-{i}" for i in range(args.devices)]
    devices = [RecordingDevice(args.url, name, manifest.base_model_hash, manifest.adapter_dim,
                               address=args.addresses[i % len(args.addresses)] if args.addresses else None,
                               token=credentials.get(name), think_s=args.think, pairs=args.pairs, ping_s=args.ping,
                               open_timeout_s=args.open_timeout, seed=args.seed)
               for i, name in enumerate(names)]
    started = time.time()
    print(f"fleet of {len(devices)} devices started", flush=True)
    asyncio.run(run_fleet(devices, args.within))
    report = {"started": started, "ended": time.time(), "devices": {d.device_id: d.report() for d in devices}}
    args.report.write_text(json.dumps(report))
    unfinished = [d.device_id for d in devices if not d.done]
    print(f"fleet done: {len(devices) - len(unfinished)} of {len(devices)} devices saw the job end", flush=True)
    return 0 if not unfinished else 1


if __name__ == "__main__":
    sys.exit(main())
