"""A bundle's program tried first in a forked child: a program that crashes the runtime costs the check, not the process.

A corrupted program whose manifest matches it (a device without a trust key, or a bad program that
its operator signed) can crash the ExecuTorch runtime: a segfault or an abort takes the whole
process, which no `try` catches. `check_in_child(bundle)` forks the process (the runtime is already
imported, so the child starts in milliseconds and shares the parent's pages), loads the program
there and runs each of its methods once on inputs of the manifest's shapes (`exercise`), and
reports how the child ended: `ok`, `error` (a Python-level refusal, its one line) or `crashed`
(killed by a signal, or exited without a verdict). The parent loads the program only after an `ok`;
the child has exited by then, so the two never hold the program at once. `load_engine` is that,
for the device (device_sdk); `benchmarks/isolation_cost.py` measures what it costs.
"""

from __future__ import annotations

import os
import select
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch

from fwdfed.batch import Batch
from fwdfed.bundle.manifest import Bundle
from fwdfed.bundle.tasks import SEQ_CLS
from fwdfed.errors import first_line
from runtime.engine import ProgramEngine
from runtime.executorch import EngineError, runtime

OK, ERROR, CRASHED = "ok", "error", "crashed"
CHECK_TIMEOUT_S = 600.0  # one pass of every method; a child still running after this is killed as hung


class ProgramCrashed(EngineError):
    """The program crashed (or hung) the runtime in the child that tried it: the device does not load it."""


@dataclass(frozen=True)
class Verdict:
    outcome: str  # OK, ERROR or CRASHED
    detail: str  # ERROR: the child's one-line refusal; CRASHED: how it died ("killed by SIGSEGV", ...)
    seconds: float  # fork to the child's exit
    child_peak_rss: int  # the child's peak resident memory, bytes (pages shared with the parent count)


def exercise(bundle: Bundle) -> ProgramEngine:
    """The bundle's engine, with each of its methods run once on inputs of the manifest's shapes (token
    ids 0, a full attention mask, the initial adapter P times): what the device's first task will run."""
    engine = ProgramEngine.for_bundle(bundle)
    m = bundle.manifest
    b, length, p = m.inputs.batch_size, m.inputs.seq_len, m.inputs.max_perturbations
    tokens = torch.zeros((b, length), dtype=torch.int64)
    labels = torch.zeros((b,) if m.task == SEQ_CLS else (b, length), dtype=torch.int64)
    batch = Batch(input_ids=tokens, attention_mask=torch.ones_like(tokens), labels=labels,
                  weights=np.ones(b, np.float32))
    adapter = bundle.initial_adapter()
    adapters = np.tile(adapter, (p, 1))
    if m.streamed:  # every stage's program, each loaded and run in turn
        engine.losses(batch, adapters)
        return engine
    if engine.has_forward:
        engine.losses(batch, adapters)
    engine.logits(batch, adapter)
    if engine.has_features:
        engine.features(batch, adapter)
    if engine.has_batched_logits:
        engine.batched_logits(batch, adapters)
    if engine.has_split:  # the top and its features method read the prefix's states
        batch.prefix_states = engine.prefix_states(batch)
        engine.losses(batch, adapters)
        if engine.has_features:  # a classifier's top_features; a causal LM's top has none
            engine.features(batch, adapter)
    return engine


def check_in_child(bundle: Bundle, timeout_s: float = CHECK_TIMEOUT_S) -> Verdict:
    """`exercise(bundle)` in a forked child; how it ended. The parent's runtime is started first, so that
    the child inherits it instead of starting its own (and its CPU probe) in every check."""
    runtime()
    read, write = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the parent's code, whatever happens
        try:
            os.close(read)
            try:
                _fresh_threadpools()
                exercise(bundle)
                message = OK
            except Exception as e:  # any Python-level refusal is the verdict
                message = f"{ERROR} {first_line(e)}"
            os.write(write, message.encode("utf-8", "replace")[:4096])
        finally:
            os._exit(0)
    os.close(write)
    try:
        message = _read_until_closed(read, timeout_s)
    finally:
        os.close(read)
    if message is None:  # still running: a program that hangs the runtime is refused as one that crashes it
        os.kill(pid, signal.SIGKILL)
    _, status, usage = os.wait4(pid, 0)
    seconds, peak = time.monotonic() - start, usage.ru_maxrss * 1024  # Linux reports kilobytes
    if message is None:
        return Verdict(CRASHED, f"did not finish within {timeout_s:g} s (killed)", seconds, peak)
    if os.WIFSIGNALED(status):
        return Verdict(CRASHED, f"killed by {signal.Signals(os.WTERMSIG(status)).name}", seconds, peak)
    if os.WEXITSTATUS(status) != 0 or not message:  # exit() or os._exit() inside the runtime
        return Verdict(CRASHED, f"exited with status {os.WEXITSTATUS(status)} before its verdict", seconds, peak)
    outcome, _, detail = message.decode("utf-8", "replace").partition(" ")
    return Verdict(outcome, detail, seconds, peak)


def _fresh_threadpools() -> None:
    """In the child: thread pools that work after fork. Fork copies a pool but not its worker threads, so a
    child of a parent that had run a program waited forever on its first parallel kernel (MiniLM's
    prefix, seen here): the runtime's own pool is made anew, as large as the parent's, and the kernels
    that run through torch's OpenMP pool, which cannot be made anew, run on the child's one thread."""
    from executorch.extension.pybindings import _C

    _C._unsafe_reset_threadpool(_C._threadpool_get_thread_count())
    torch.set_num_threads(1)


def _read_until_closed(fd: int, timeout_s: float) -> bytes | None:
    """Everything written to `fd` until its writer closes it (the child exits), or None after `timeout_s`."""
    chunks, deadline = [], time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def load_engine(bundle: Bundle, isolate: bool) -> ProgramEngine:
    """The bundle's engine. With `isolate`, only after a forked child ran every method: a program that
    crashed the child is ProgramCrashed, one that the child refused is that refusal's EngineError (the
    same line as loading it here would give)."""
    if isolate:
        verdict = check_in_child(bundle)
        if verdict.outcome == ERROR:
            raise EngineError(verdict.detail)
        if verdict.outcome == CRASHED:
            raise ProgramCrashed(f"the program {bundle.program_path} crashed the ExecuTorch runtime in the child "
                                 f"process that tried it ({verdict.detail}): not loaded")
    return ProgramEngine.for_bundle(bundle)
