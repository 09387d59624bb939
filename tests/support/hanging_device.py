"""A process that enrols, takes one task and then hangs until it is killed (a device dying mid-round):
    python -m tests.support.hanging_device URL BUNDLE DEVICE_ID
"""

from __future__ import annotations

import asyncio
import sys

from fwdfed.bundle.manifest import load_bundle
from tests.support.protocol_client import ProtocolClient


async def take_a_task_and_hang(url: str, bundle_dir: str, device_id: str) -> None:
    manifest = load_bundle(bundle_dir).manifest
    async with ProtocolClient(url, device_id, manifest.base_model_hash, manifest.adapter_dim) as device:
        task = await device.recv()
        print(f"got task {task.task_id}", flush=True)
        await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(take_a_task_and_hang(*sys.argv[1:4]))
