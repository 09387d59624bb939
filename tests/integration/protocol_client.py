"""A device that speaks the protocol without running a model: for fault injection and load.

As a script it enrols, takes one task and then hangs, until it is killed:
    python -m tests.integration.protocol_client URL BUNDLE DEVICE_ID
"""

from __future__ import annotations

import asyncio
import sys

from websockets.asyncio.client import connect

from coordinator import protocol
from export.manifest import load_bundle


class ProtocolDevice:
    def __init__(self, url: str, device_id: str, base_model_hash: str, adapter_dim: int):
        self.url, self.device_id, self.hash, self.dim = url, device_id, base_model_hash, adapter_dim
        self.ws = None

    async def __aenter__(self):
        self.ws = await connect(self.url, max_size=protocol.MAX_FRAME_BYTES)
        await self.ws.send(protocol.Hello(device_id=self.device_id, base_model_hash=self.hash, adapter_dim=self.dim,
                                          num_examples=10, mem_budget_bytes=None).to_wire())
        welcome = await self.recv()
        assert isinstance(welcome, protocol.Welcome), welcome
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()

    async def recv(self, timeout: float = 60) -> protocol.Message:
        return protocol.decode(await asyncio.wait_for(self.ws.recv(), timeout))

    async def send(self, message: protocol.Message) -> None:
        await self.ws.send(message.to_wire())

    def update(self, task: protocol.Task, job_id: str | None = None, seeds=(1, 2), coefs=(1e-3, -1e-3)):
        return protocol.Update(task_id=task.task_id, job_id=job_id or task.job_id, round=task.round,
                               global_version=task.global_version, seeds=list(seeds), coefs=list(coefs), scale=1.0,
                               num_examples=10, loss_before=1.0, loss_after=0.9, peak_rss_bytes=1)


async def _hang(url: str, bundle_dir: str, device_id: str) -> None:
    manifest = load_bundle(bundle_dir).manifest
    async with ProtocolDevice(url, device_id, manifest.base_model_hash, manifest.adapter_dim) as device:
        task = await device.recv()
        print(f"got task {task.task_id}", flush=True)
        await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(_hang(*sys.argv[1:4]))
