"""A device that speaks the protocol without running a model: for load tests and fault injection.

It enrols with the bundle's identity and answers tasks with made-up seed-form updates, so a
coordinator can be driven by thousands of them from one process.
"""

from __future__ import annotations

import asyncio
import ssl
import time

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from fwdfed import handshake, protocol


class ProtocolClient:
    def __init__(self, url: str, device_id: str, base_model_hash: str, adapter_dim: int, token=None,
                 tls: ssl.SSLContext | None = None, signer: str | None = None):
        """`token`: an entry of `coordinator enrol`'s file ({"private_key": PEM}: the challenge is answered as
        `signer`, the device itself by default) or a bearer token (a string, `enrol --bearer`)."""
        self.url, self.device_id, self.hash, self.dim = url, device_id, base_model_hash, adapter_dim
        self.key = handshake.load_device_key(token["private_key"]) if isinstance(token, dict) else None
        self.signer = signer or device_id
        self.options = {"additional_headers": {"Authorization": f"Bearer {token}"} if isinstance(token, str) else None}
        if tls is not None:
            self.options["ssl"] = tls
        self.ws = None

    async def _connect(self):
        options = dict(self.options, max_size=protocol.MAX_FRAME_BYTES, open_timeout=60)
        if self.key is None:
            return await connect(self.url, **options)
        try:
            return await connect(self.url, **options)
        except InvalidStatus as e:  # the challenge (401): sign its nonce; any other refusal (503, 403) is the answer
            if e.response.status_code != 401:
                raise
            nonce = handshake.parse_challenge(e.response.headers.get("WWW-Authenticate", ""))
        signed = handshake.answer(self.key, self.signer, nonce, int(time.time()))
        return await connect(self.url, **dict(options, additional_headers={"Authorization": signed}))

    async def __aenter__(self):
        self.ws = await self._connect()
        await self.send(protocol.Hello(device_id=self.device_id, base_model_hash=self.hash, adapter_dim=self.dim,
                                       num_examples=10, mem_budget_bytes=None))
        welcome = await self.recv()
        if not isinstance(welcome, protocol.Welcome):
            raise RuntimeError(f"{self.device_id}: expected welcome, got {welcome}")
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()

    async def recv(self, timeout: float = 60) -> protocol.Message:
        return protocol.decode(await asyncio.wait_for(self.ws.recv(), timeout))

    async def send(self, message: protocol.Message) -> None:
        await self.ws.send(message.to_wire())

    def update(self, task: protocol.Task, job_id: str | None = None, seeds=(1, 2), coefs=(1e-3, -1e-3)):
        return protocol.Update(task_id=task.task_id, job_id=job_id or task.job_id, round=task.round,
                               global_version=task.global_version, seeds=list(seeds), coefs=list(coefs), scale=1.0, dense=b"",
                               num_examples=10, loss_before=1.0, loss_after=0.9, peak_rss_bytes=1)

    async def answer_until_done(self, pairs: int = 10) -> int:
        """Answer every task at once with `pairs` pairs until the job is done; returns updates accepted."""
        accepted = 0
        while True:
            message = await self.recv(timeout=600)
            if isinstance(message, protocol.Done):
                return accepted
            if isinstance(message, protocol.Task):
                seeds = [hash((self.device_id, message.round, k)) % (1 << 62) for k in range(pairs)]
                await self.send(self.update(message, seeds=seeds, coefs=[1e-4] * pairs))
            elif isinstance(message, protocol.Ack):
                accepted += message.accepted
