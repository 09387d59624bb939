"""The floor under the coordinator's acceptance rate: a websockets server that does only what no
coordinator can skip for a seed-form update (receive its frame, decode and check it as a protocol
message, answer with an ack), with the same server settings as the coordinator's and no store, round
or checks against a task. `benchmarks/coordinator_load.py --floor` runs it for the same fleet,
beside the coordinator, so that the two figures compare as a ratio on the same machine:

    python -m benchmarks.websocket_floor --devices N --rounds R [--port 0]

It prints `listening on URL`, waits for N devices' hellos (each answered with a welcome), then
for R rounds sends every device a task (no adapter, no seed pool) and acks every update; after the
last round, a done to each.
"""

from __future__ import annotations

import argparse
import asyncio
import gc

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from fwdfed import protocol
from fwdfed.cli import run_main
from fwdfed.errors import UserError


class Floor:
    def __init__(self, devices: int, rounds: int):
        self.devices, self.rounds = devices, rounds
        self.connections: dict[str, ServerConnection] = {}
        self.everyone = asyncio.Event()
        self.answered = asyncio.Event()
        self.acks = 0

    async def handle(self, ws: ServerConnection) -> None:
        try:
            hello = protocol.decode(await ws.recv())
            if not isinstance(hello, protocol.Hello):
                return
            await ws.send(protocol.Welcome(job_id="floor", device_id=hello.device_id).to_wire())
            self.connections[hello.device_id] = ws
            if len(self.connections) == self.devices:
                self.everyone.set()
            async for frame in ws:
                update = protocol.decode(frame)
                if not isinstance(update, protocol.Update):
                    return
                await ws.send(protocol.Ack(task_id=update.task_id, accepted=True, reason="").to_wire())
                self.acks += 1
                if self.acks == self.devices:
                    self.answered.set()
        except (ConnectionClosed, protocol.ProtocolError):
            pass

    async def run(self, port: int) -> None:
        async with serve(self.handle, "127.0.0.1", port, compression=None, max_queue=4, ping_interval=120,
                         ping_timeout=120) as server:
            print(f"listening on ws://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
            await self.everyone.wait()
            for number in range(1, self.rounds + 1):
                self.acks = 0
                self.answered.clear()
                for device_id, ws in self.connections.items():
                    await ws.send(protocol.Task(task_id=f"{device_id}-{number}", job_id="floor", round=number,
                                                global_version=number - 1, base_model_hash="0" * 64, adapter=b"",
                                                adapter_sha256="0" * 64, method="mezo", hparams={},
                                                deadline_s=900.0, reference=b"").to_wire())
                await self.answered.wait()
            for ws in self.connections.values():
                await ws.send(protocol.Done(job_id="floor", reason="job finished").to_wire())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    if args.devices < 1 or args.rounds < 1:
        raise UserError("--devices and --rounds must be at least 1")
    gc.set_threshold(50_000, 20, 10)  # as the coordinator's serve does
    asyncio.run(Floor(args.devices, args.rounds).run(args.port))
    return 0


if __name__ == "__main__":
    run_main(main)
