"""A device's training: a task's checks, its local steps through the program, and the adapter it starts from.

`Trainer.train(task)` checks every value of an untrusted task before anything it sizes is
allocated, runs the method's optimizer over the device's batches (a split program's prefix
states computed once, before the first forward-only step), and answers with the update. A task
may bring its adapter as a history of per-seed sums since the version this device kept
(`task_adapter`, the downlink in seed form). The connection is device_sdk.client's.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from device_sdk.budget import BudgetGuard
from device_sdk.setup import DeviceConfig, DeviceError, Setup
from fwdfed import methods, protocol
from fwdfed import task_keys as keys
from fwdfed.directions import task_kind
from fwdfed.memory import format_size, peak_rss
from fwdfed.memory_plan import plan_memory
from fwdfed.methods.estimate import PoolDraws, hparam, mean_loss, parse_seed_pool, parse_steps
from fwdfed.methods.fedkd import teacher_objective
from fwdfed.tensor_scale import check_dim
from fwdfed.history import entry_sums
from fwdfed.update import replay
from runtime.engine import ProgramEngine
from runtime.prefix_cache import cache_prefix_states

log = logging.getLogger("device")

LOSS_PROBE_BATCHES = 4  # batches on which loss_before / loss_after are measured


class HistoryMismatch(Exception):
    """A task's seed-form history, replayed onto the adapter this device kept, is not the task's adapter."""


class Trainer:
    def __init__(self, config: DeviceConfig, setup: Setup, engine: ProgramEngine | None):
        self.config = config
        self.bundle, self.trust_key, self.plan = setup.bundle, setup.trust_key, setup.plan
        self.num_examples, self.labelling = setup.num_examples, setup.labelling
        self.batches, self.distillation_batches = setup.batches, setup.distillation_batches
        self.engine = engine
        self._eager = None  # built on the first backprop task
        self.prefix_cache = None  # a split program's prefix states, computed before the first training step
        self._prefix_folder = None
        # The global version this device holds and its float32 adapter: the bundle's initial adapter is the
        # job's version 0 when the job started from it (the coordinator compares the sha256). None: holds none.
        self.held: tuple[int, np.ndarray] | None = (0, self.bundle.initial_adapter()) if config.keep_adapter else None

    def check_task(self, task: protocol.Task) -> np.ndarray:
        m = self.bundle.manifest
        if task.base_model_hash != m.base_model_hash:
            raise DeviceError(f"task {task.task_id} is for base model {task.base_model_hash[:12]}, "
                              f"this device holds {m.base_model_hash[:12]}")
        if len(task.adapter) != 4 * m.adapter_dim:
            raise DeviceError(f"task {task.task_id} carries {len(task.adapter)} adapter bytes, expected {4 * m.adapter_dim}")
        if hashlib.sha256(task.adapter).hexdigest() != task.adapter_sha256:
            raise DeviceError(f"task {task.task_id}: the adapter does not match its sha256 (corrupted in transit)")
        if task.method not in methods.METHODS:
            raise DeviceError(f"task {task.task_id} asks for method {task.method!r}; this device runs "
                              f"{methods.names()}")
        if methods.get(task.method).needs_teacher or keys.TEACHER_SHA256 in task.hparams:
            wanted = str(task.hparams.get(keys.TEACHER_SHA256, ""))
            if self.labelling is None:
                raise DeviceError(f"task {task.task_id} asks for teacher {wanted[:12]} ({task.method}); this device "
                                  "was given no teacher bundle")
            if wanted != self.labelling.sha256:
                raise DeviceError(f"task {task.task_id} is for teacher {wanted[:12]}, this device holds teacher "
                                  f"{self.labelling.sha256[:12]}")
        if len(task.reference) not in (0, 4 * m.adapter_dim):
            raise DeviceError(f"task {task.task_id} carries a reference of {len(task.reference)} bytes")
        adapter = np.frombuffer(task.adapter, dtype="<f4").copy()
        # A sha256 only says the bytes arrived as sent: NaN or infinity would poison every loss.
        for name, values in (("adapter", adapter), ("reference", np.frombuffer(task.reference, dtype="<f4"))):
            if not np.isfinite(values).all():
                raise DeviceError(f"task {task.task_id}: its {name} holds NaN or infinite values")
        return adapter

    def train(self, task: protocol.Task) -> protocol.Update:
        adapter = self.check_task(task)
        method = methods.get(task.method)
        # Every hyperparameter is checked here, before the first allocation the task sizes.
        try:
            config = method.config.from_hparams(task.hparams)
            steps = parse_steps(task.hparams)
            wave = hparam(task.hparams, keys.WAVE, int, 0)
            pool = parse_seed_pool(task.hparams)
            if wave < 0:
                raise ValueError(f"wave must be >= 0, got {wave}")
            if config.block is not None and config.block[1] > adapter.shape[0]:
                raise ValueError(f"the adapter block [{config.block[0]}, {config.block[1]}) passes the adapter's "
                                 f"dimension {adapter.shape[0]}")
            scales = getattr(config, "scales", None)  # a zeroth-order method's (StepConfig); backprop has none
            check_dim(scales, adapter.shape[0])
            if steps * getattr(config, "directions", 0) > protocol.MAX_PAIRS:  # backprop sends no pairs
                raise ValueError(f"{steps} steps of {config.directions} directions make more (seed, coefficient) "
                                 f"pairs than an update may carry ({protocol.MAX_PAIRS})")
        except (ValueError, TypeError) as e:
            raise DeviceError(f"task {task.task_id} has an unusable hyperparameter: {e}") from None
        if self.plan is not None:  # a task may ask for more directions per step than the plan assumed
            plan_memory(self.bundle, self.plan.budget, self.num_examples, getattr(config, "directions", 1),
                        runtime=self.plan.runtime, method=method.name)
        reference = np.frombuffer(task.reference, dtype="<f4") if task.reference else None
        # A task that names the teacher trains on every row, scored by the distillation loss (which
        # needs no label); any other on the labelled rows, by the program's own loss.
        if keys.TEACHER_SHA256 in task.hparams:
            batches, scored_by = self.distillation_batches, teacher_objective(self.engine, task.hparams)
        else:
            batches, scored_by = self.batches, self.engine
        if not batches:
            raise DeviceError(f"task {task.task_id} ({task.method}) needs labelled rows; this device's shard has none")
        # A different slice of the shard every round; the same seeds never repeat across devices or rounds.
        start = (task.round * steps) % len(batches)
        batches = batches[start:] + batches[:start]
        rng = np.random.default_rng([self.config.seed, task.round, wave, zlib.crc32(self.config.device_id.encode())])
        if pool is not None:  # FedKSeed: every direction one of the job's pool
            rng = PoolDraws(rng, pool)
        if not method.needs_autograd:
            self._cache_prefix_states()
        probe = batches[:LOSS_PROBE_BATCHES]
        loss_before = mean_loss(scored_by, probe, adapter)
        guard = BudgetGuard(self.config.mem_budget_bytes)
        optimizer = method.make_optimizer(self._engine_for(method), adapter, config, rng, reference)
        run = optimizer.train(batches, steps, guard)
        if method.dense_length is None:
            loss_after = mean_loss(scored_by, probe, run.update.apply(adapter, config.kind, config.block, scales))
        else:  # the dense part is the method's own payload (class statistics), not a change of the adapter
            loss_after = loss_before
        guard()  # the probe evaluations count too
        dense = run.dense
        if dense is not None and method.dense_span:  # a change of one span alone (hybrid's head): that span goes up
            start, stop = method.dense_span(task.hparams)
            dense = dense[start:stop]
        return protocol.Update(task_id=task.task_id, job_id=task.job_id, round=task.round,
                               global_version=task.global_version, seeds=[s for s, _ in run.pairs],
                               coefs=[c for _, c in run.pairs], scale=run.scale,
                               dense=b"" if dense is None else dense.astype("<f4").tobytes(),
                               num_examples=self.num_examples,
                               loss_before=loss_before, loss_after=loss_after, peak_rss_bytes=peak_rss())

    def _cache_prefix_states(self) -> None:
        """Once, before the first forward-only step: a split program's frozen prefix over the shard
        (runtime.prefix_cache); every pass after it runs the adapted top alone."""
        if self.prefix_cache is not None or not getattr(self.engine, "has_split", False) or not self.batches:
            return
        self._prefix_folder = tempfile.TemporaryDirectory(prefix="fwdfed-prefix-")
        self.prefix_cache = cache_prefix_states(self.engine, self.batches, Path(self._prefix_folder.name))
        log.info("%s: prefix states of %d batches in %.1f s (%s, float16, memory-mapped)", self.config.device_id,
                 self.prefix_cache.passes, self.prefix_cache.seconds, format_size(self.prefix_cache.bytes))

    def _engine_for(self, method: methods.Method):
        """The ExecuTorch program for forward-only methods; eager PyTorch (autograd) for backprop."""
        if not method.needs_autograd:
            return self.engine
        if self._eager is None:
            from runtime.eager import EagerEngine

            self._eager = EagerEngine(self.bundle)
        return self._eager

    def task_adapter(self, task: protocol.Task) -> protocol.Task:
        """The task with its dense adapter: as sent, or, for a task with a history, the adapter this device kept
        with the history replayed onto it (fwdfed.update.replay), checked against the task's sha256
        (HistoryMismatch otherwise: this device then holds nothing, and asks for the dense adapter)."""
        if task.history is None:
            return task
        try:
            if self.held is None:
                raise ValueError("this device holds no adapter")
            version, adapter = self.held
            first = task.global_version - len(task.history)
            numbers = [step["version"] for step in task.history]
            if first != version or numbers != list(range(version + 1, task.global_version + 1)):
                raise ValueError(f"it goes from version {first}, this device holds {version}")
            pool = parse_seed_pool(task.hparams) if any("sums" in step for step in task.history) else None
            steps = [entry_sums(step, pool) for step in task.history]
            data = replay(adapter, steps, task_kind(task.hparams)).astype("<f4").tobytes()
        except (ValueError, TypeError, KeyError) as e:
            self.held = None
            raise HistoryMismatch(f"task {task.task_id}: its history cannot be replayed: {e}") from None
        if hashlib.sha256(data).hexdigest() != task.adapter_sha256:
            self.held = None
            raise HistoryMismatch(f"task {task.task_id}: its history, replayed, does not match the adapter's sha256")
        return replace(task, adapter=data, history=None)

    def keep(self, task: protocol.Task) -> None:
        """After a task's adapter passed its checks: it is the version this device holds from now on."""
        if self.config.keep_adapter:
            self.held = (task.global_version, np.frombuffer(task.adapter, "<f4").copy())
