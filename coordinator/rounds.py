"""The round engine: open a round, dispatch its tasks, collect its waves, aggregate, publish, go on.

Every step is written to the store first, so a coordinator restarted on the same database resumes
the open round with the updates it had already accepted. The open round itself is held in memory
(coordinator.open_round), read once when it opens or resumes and written through on every change:
no arrival makes the loop read the round's tasks again. The rule each round runs is the job's
`Strategy` (coordinator.strategies), but for the rounds a method schedules itself (the class
statistics of `--head-init lda`), which that method aggregates. `RoundEngine` is the part of the
`Coordinator` (coordinator.server) that runs rounds; the connections it sends tasks on and the
updates it reads are the server's.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import replace

import numpy as np
from websockets.exceptions import ConnectionClosed

from coordinator.job import round_method_name
from coordinator.open_round import OpenRound
from coordinator.store import Round
from coordinator.strategies import AcceptedUpdate, Strategy, device_deltas
from coordinator.strategies.scheduled import ScheduledRound
from coordinator.update_checks import update_rms
from fwdfed import methods, protocol
from fwdfed import task_keys as keys

log = logging.getLogger("coordinator")

COLLECT_BATCH_S = 0.05
AWAY_SWEEP_S = 0.5  # how often the collect loop looks for tasked devices away past --device-timeout


class RoundEngine:
    def round_method(self, number: int) -> methods.Method:
        """The method of round `number` (`round_method_name`)."""
        name = round_method_name(self.method.name, self.options, number)
        return self.method if name == self.method.name else methods.get(name)

    def round_strategy(self, number: int) -> Strategy:
        """The strategy round `number` runs: the job's, or a scheduled method's round (the class statistics)."""
        method = self.round_method(number)
        if method is self.method:
            return self.strategy
        if number not in self._scheduled:
            self._scheduled[number] = ScheduledRound(method, self.scheduled_hparams(), self.layout, self.strategy)
        return self._scheduled[number]

    def scheduled_dense_values(self) -> int | None:
        """The longest dense part a scheduled round's method sends (the class statistics), if any."""
        method = self.round_method(1)
        if method is self.method or method.dense_length is None:
            return None
        return method.dense_length(self.scheduled_hparams())

    def scheduled_hparams(self) -> dict:
        """The class-statistics round's task hyperparameters."""
        from fwdfed.methods.class_stats import round_hparams

        hparams = round_hparams(self.layout, self.options.lda_shrinkage)
        if self.method.needs_teacher:  # the head round counts examples by the teacher's targets too
            hparams |= {k: self.job.hparams[k] for k in keys.TEACHER if k in self.job.hparams}
        return hparams

    def _lr_history(self) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
        """Per device, for the client lr strategies: train loss per closed round, and its dense change in the
        latest one."""
        losses: dict[str, list[float]] = {}
        last: dict[str, np.ndarray] = {}
        need_deltas = self.options.lr_strategy == "model-diff"
        for rnd in self.store.closed_round_list(self.job.id):
            block = (rnd.block_start, rnd.block_end) if rnd.block_start is not None else None
            for row in self.store.updates(rnd.id):
                losses.setdefault(row.device_id, []).append((row.loss_before + row.loss_after) / 2)
                if need_deltas:
                    update = AcceptedUpdate.from_row(row)
                    last[row.device_id] = device_deltas([update], self.job.adapter_dim, self.kind, block)[0]
        return losses, last

    def _reference(self, rnd: Round) -> bytes:
        """The previous round's global update, for a method that uses it (the forward gradient's selection)."""
        if not self.method.uses_reference or rnd.base_version == 0:
            return b""
        new = np.frombuffer(self.store.version(self.job.id, rnd.base_version).vector, "<f4")
        old = np.frombuffer(self.store.version(self.job.id, rnd.base_version - 1).vector, "<f4")
        return (new - old).astype("<f4").tobytes()

    def _round_scales(self, rnd: Round, version, block):
        """The per-tensor scales of the round's tasks (`--tensor-scale`), None when unscaled: from its base version,
        as the job's strategy makes them again to aggregate; made once per round attempt (its waves share them)."""
        if self.round_method(rnd.number) is not self.method:  # the class statistics take no directions
            return None
        if rnd.id not in self._scales:
            base = np.frombuffer(version.vector, "<f4")
            self._scales = {rnd.id: self.options.round_scales(base, self.layout, block)}
        return self._scales[rnd.id]

    async def _send_task(self, rnd: Round, task, version=None, reference: bytes | None = None) -> float | None:
        """Send the task to its device if it is connected: the time it was sent (for `Store.mark_sent`), or None."""
        version = version or self.store.version(self.job.id, rnd.base_version)
        reference = self._reference(rnd) if reference is None else reference
        deadline = max(0.0, rnd.wave_opened_at + self.job.round_deadline_s - time.time())
        message = protocol.Task(task_id=task.id, job_id=self.job.id, round=rnd.number, global_version=rnd.base_version,
                                base_model_hash=self.job.base_model_hash, adapter=version.vector,
                                adapter_sha256=version.sha256, method=self.round_method(rnd.number).name,
                                hparams=task.hparams,
                                deadline_s=deadline, reference=reference)
        ws = self.connections.get(task.device_id)
        if ws is not None:
            frame, in_seed_form = message.to_wire(), False
            if (history := self.downlink.history(task.device_id, rnd.base_version)) is not None:
                seed_form = replace(message, adapter=b"", history=history).to_wire()
                if len(seed_form) < len(frame):  # the smaller of the two
                    frame, in_seed_form = seed_form, True
            self.task_frames.setdefault(rnd.id, []).append((task.id, len(frame), in_seed_form))
            if task.device_id in self.held:  # from now on it holds this version (or says so when it reconnects)
                self.held[task.device_id] = (rnd.base_version, version.sha256)
            sent_at = time.time()  # before the send: an answer cannot come earlier than its task
            try:
                await ws.send(frame)
            except ConnectionClosed:
                pass
            return sent_at

    async def _resend_open_task(self, device_id: str) -> None:
        """After a restart or reconnect, a device gets back the task it has not answered: also one
        taken from it while it was away, if no other device has taken that task over (the wave is
        still short of live tasks), rather than the round waiting for its deadline."""
        if (state := self.open) is None:
            return
        tasks = state.unanswered_of(device_id) or self._restorable(state, device_id)
        rnd, sent = state.rnd, {}
        for task in tasks:
            if task.wave == rnd.wave:
                log.info("resending task %s (round %d) to %s", task.id, rnd.number, device_id)
                sent[task.id] = await self._send_task(rnd, task)
        await state.mark_sent(sent)

    def _restorable(self, state: OpenRound, device_id: str) -> list:
        """The device's abandoned, unanswered task of this wave, given back to it, when the wave lacks it."""
        mine = [t for t in state.by_device.get(device_id, ()) if t.wave == state.rnd.wave and
                t.abandoned_at is not None and t.forfeited is None and t.id not in state.answered]
        if not mine or len(state.live) >= self._target(state):
            return []
        log.info("round %d: %s is back and no device took over its task %s: giving it back", state.rnd.number,
                 device_id, mine[0].id)
        return [state.restore(mine[0])]

    def _hold(self, rnd: Round) -> OpenRound:
        """The round attempt in memory: the one held, or read from the store (a round just opened or resumed)."""
        if self.open is None or self.open.rnd.id != rnd.id:
            self.open = OpenRound.load(self.store, rnd)
        return self.open

    def _release(self, state: OpenRound) -> None:
        """The round attempt closed or failed: answers waiting for it (_settled) are decided against the store."""
        if self.open is state:
            self.open = None
        state.collecting.set()

    def _abandon_away(self, state: OpenRound) -> None:
        """Abandon the tasks whose device has been away past --device-timeout (their wave needs them elsewhere),
        looking at most every AWAY_SWEEP_S: the first look goes over every unanswered task (a resumed round's
        devices may not be back yet), the later ones over the devices that went away, not over the fleet."""
        now = time.time()
        if now - state.swept_at < AWAY_SWEEP_S:
            return
        devices = {state.tasks[t].device_id for t in state.unanswered} if not state.swept_at else list(self.gone_since)
        state.swept_at = now
        for device_id in devices:
            if device_id in self.connections:
                continue
            tasks = [t for t in state.by_device.get(device_id, ())
                     if t.id in state.unanswered and t.id not in state.pending]
            if not tasks:
                continue
            away = now - self.gone_since.setdefault(device_id, now)
            if away > self.device_timeout_s:
                for task in tasks:
                    state.abandon(task)
                    log.warning("round %d: %s away for %.0f s: task %s abandoned, reassigning", state.rnd.number,
                                device_id, away, task.id)

    def _target(self, state: OpenRound) -> int:
        """Updates this round wants (the strategy's count); stored, as it may only grow while the round is open."""
        wanted = self.strategy.target(len(self.connections), state.rnd.target)
        if wanted > state.rnd.target:
            state.raise_target(wanted)
        return max(wanted, state.rnd.target)

    def _tasked(self, state: OpenRound) -> int:
        """Devices a wave tasks: the target, or over-selected (`serve --over-select F`), ceil(target x (1 + F)), of
        which the round takes the first `target` to answer (and those still being committed when it stopped
        collecting); the others' updates come late."""
        return math.ceil(self._target(state) * (1 + self.options.over_select))

    async def _dispatch(self, rnd: Round) -> None:
        """Send tasks to idle connected devices until this wave has its target of live tasks."""
        state = self._hold(rnd)
        rnd = state.rnd
        wanted = self._tasked(state) - len(state.live)
        if wanted <= 0:
            return
        if len(self.connections) < (self.options.min_available or 0):  # serve --min-available: wait for the fleet
            return
        # A device whose task was abandoned is not asked again in the same wave: the task moved on.
        idle = [d for d in self.connections if d not in state.assigned]
        chosen = self.strategy.sample(idle, wanted, self.rng)
        if not chosen:
            return
        block = (rnd.block_start, rnd.block_end) if rnd.block_start is not None else None
        hparams = self.round_strategy(rnd.number).configure(rnd.wave, block, chosen, self._lr_history, self.rng)
        version, reference = self.store.version(self.job.id, rnd.base_version), self._reference(rnd)
        if (scales := self._round_scales(rnd, version, block)) is not None:
            hparams = {device: h | {keys.TENSOR_SCALES: [list(r) for r in scales]} for device, h in hparams.items()}
        tasks = state.add_tasks(hparams)  # one transaction
        sent = {}
        for task in tasks:
            log.debug("round %d wave %d: task %s -> %s (lr %.3g)", rnd.number, rnd.wave, task.id, task.device_id,
                      task.hparams[keys.LR])
            sent[task.id] = await self._send_task(rnd, task, version, reference)
        await state.mark_sent(sent)  # one transaction for the wave's sends, as for their rows
        log.info("round %d wave %d: %d tasks sent (%d of %d live)", rnd.number, rnd.wave, len(tasks), len(state.live),
                 self._target(state))

    async def _collect(self, rnd: Round) -> None:
        """Dispatch and wait until the current wave has its target of answers (without over-selection: every
        task answered) or its deadline passes; then wait for the updates still being committed, which the
        round's updates then include."""
        state = self._hold(rnd)
        state.collecting.set()
        deadline = state.rnd.wave_opened_at + self.job.round_deadline_s
        while True:
            self.changed.clear()
            self._abandon_away(state)
            await self._dispatch(state.rnd)
            if len(state.live) - len(state.unanswered) >= self._target(state):
                break
            remaining = deadline - time.time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=min(remaining, AWAY_SWEEP_S))
                # Let a burst of arrivals land before checking again.
                await asyncio.sleep(COLLECT_BATCH_S)
            except TimeoutError:
                pass
        state.collecting.clear()
        await state.settled()
        log.info("round %d wave %d collected in %.1f s: %d of %d live tasks answered; %d updates accepted, "
                 "%d refused while the round was open", state.rnd.number, state.rnd.wave,
                 time.time() - state.rnd.wave_opened_at, len(state.live) - len(state.unanswered), len(state.live),
                 state.accepted, state.refused)

    async def _gather(self, rnd: Round, block) -> tuple[Round, list, list[AcceptedUpdate], float | None]:
        """Collect the round's updates, wave after wave while the strategy asks for another:
        (the round as it stands, its updates, each as the round's rule reads it, the estimate variance if
        measured). Each stored update is read once here, in a thread, for all that follows."""
        while True:
            await self._collect(rnd)
            rows = self.store.updates(rnd.id)
            if len(rows) < self.job.min_devices:
                return rnd, rows, [], None
            accepted, more, variance = await asyncio.to_thread(self._another_wave, rnd, rows, block)
            if not more:
                return rnd, rows, accepted, variance
            log.info("round %d: estimate variance %.3g > %.3g: asking for more perturbations (wave %d)",
                     rnd.number, variance, self.options.variance_threshold, rnd.wave + 1)
            rnd = self.open.next_wave()

    def _another_wave(self, rnd: Round, rows: list, block) -> tuple[list[AcceptedUpdate], bool, float | None]:
        accepted = [self._accepted(rnd, row) for row in rows]
        return accepted, *self.round_strategy(rnd.number).another_wave(accepted, self.job.adapter_dim, rnd.wave, block)

    def _accepted(self, rnd: Round, row) -> AcceptedUpdate:
        """A stored update as the round's rule reads it: a dense part that covers one span of the adapter
        (the round's method's `dense_span`, hybrid's head) placed there."""
        method = self.round_method(rnd.number)
        span = method.dense_span(self._task(row.task_id).hparams) if method.dense_span else None
        return AcceptedUpdate.from_row(row, span, self.job.adapter_dim)

    def _combine(self, rnd: Round, base: np.ndarray, accepted: list[AcceptedUpdate], block) -> np.ndarray | None:
        """The round's rule applied to `accepted`; None when it cannot give a finite adapter."""
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                new = self.round_strategy(rnd.number).aggregate(base, accepted, block)
        except (ValueError, ArithmeticError):  # e.g. class statistics whose head is singular or not finite
            return None
        return new if np.isfinite(new).all() else None

    def _change_size(self, rnd: Round, row, base: np.ndarray) -> float:
        """How far an update would move the adapter: its bound's measure, or a statistics payload's largest value."""
        update = self._accepted(rnd, row)
        dense = update.change.dense
        if self.round_method(rnd.number).dense_length is not None:
            return float(np.max(np.abs(dense))) if dense is not None else 0.0
        scale_part = abs(update.change.scale - 1.0) * float(np.sqrt(np.mean(base.astype(np.float64) ** 2)))
        return update_rms(update.pairs, dense) + scale_part

    def _drop_updates(self, rnd: Round, offenders: list[tuple]) -> None:
        """Take accepted updates back out of the round, each recorded as a refusal with its code, and their
        tasks forfeited: the round collects again without them (another device may take their place)."""
        state = self._hold(rnd)
        for row, code, reason in offenders:
            state.drop_update(row)
            state.forfeit(state.tasks[row.task_id], code)
            self.store.add_refusal(self.job.id, row.device_id, code, reason)
            log.warning("round %d: dropped the update of %s for task %s (%s): %s; the round goes on without it",
                        rnd.number, row.device_id, row.task_id, code, reason)

    def _diverged(self, metrics: dict, base_version: int) -> str | None:
        """A held-out metric that is not finite for the new adapter but was for the round's base version."""
        before = {m.name for m in self.store.metrics(self.job.id) if m.version == base_version}
        return next((name for name, value in metrics.items() if not math.isfinite(value) and name in before), None)

    async def _publishable(self, rnd: Round, rows: list, accepted: list[AcceptedUpdate],
                           block) -> tuple[np.ndarray, dict] | None:
        """The next adapter and its held-out metrics; None when updates had to be dropped first (_drop_updates):
        one that the limits refuse (stored by an older coordinator, or under other limits), one without
        which the aggregate is finite, or, when a held-out metric stops being finite, the largest.
        The aggregation and the evaluation run in threads: the event loop goes on serving connections."""
        base = np.frombuffer(self.store.version(self.job.id, rnd.base_version).vector, dtype="<f4")
        offenders, new = await asyncio.to_thread(self._aggregate, rnd, rows, accepted, base, block)
        if offenders:
            self._drop_updates(rnd, offenders)
            return None
        metrics = await asyncio.to_thread(self.evaluate, new) if self.evaluate else {}
        if (name := self._diverged(metrics, rnd.base_version)) is not None:
            largest = await asyncio.to_thread(max, rows, key=lambda row: self._change_size(rnd, row, base))
            reason = f"with this update, the largest of the round, the held-out {name} is {metrics[name]}"
            self._drop_updates(rnd, [(largest, "diverged", reason)])
            return None
        return new, metrics

    def _aggregate(self, rnd: Round, rows: list, accepted: list[AcceptedUpdate], base: np.ndarray,
                   block) -> tuple[list[tuple], np.ndarray | None]:
        """(the updates to drop, each with its code and reason, None) or ([], the new adapter)."""
        method = self.round_method(rnd.number)
        stale = [(row, *refusal) for row, update in zip(rows, accepted)
                 if (refusal := self.checks.poisoning(update.pairs, row.scale, row.dense,
                                                      self._task(row.task_id).hparams, method))]
        if stale:
            return stale, None
        new = self._combine(rnd, base, accepted, block)
        if new is None:
            alone = [row for row, u in zip(rows, accepted) if self._combine(rnd, base, [u], block) is None]
            blamed = alone or [max(rows, key=lambda row: self._change_size(rnd, row, base))]
            reason = "the round's aggregate with this update is not finite"
            return [(row, "non_finite_aggregate", reason) for row in blamed], None
        return [], new

    def _finite_metrics(self, version: int, metrics: dict) -> dict:
        """The metrics that can be stored; a non-finite one is recorded as a refusal with its value instead."""
        kept = {}
        for name, value in metrics.items():
            if math.isfinite(value):
                kept[name] = value
            else:
                reason = f"version {version}: {name} is {value}, not stored"
                self.store.add_refusal(self.job.id, None, "non_finite_metric", reason)
                log.warning("%s", reason)
        return kept

    def _settle_task_frames(self, rnd: Round) -> list[tuple[str, int, bool]]:
        """The task frames this process sent for the round attempt (task id, bytes, in seed form), each task's
        written to the store (its bytes down, `coordinator status` shows them per device) and forgotten."""
        frames = self.task_frames.pop(rnd.id, [])
        per_task: dict[str, tuple[int, bool]] = {}
        for task_id, size, seed_form in frames:
            per_task[task_id] = (per_task.get(task_id, (0, False))[0] + size, seed_form)
        self.store.add_sent_bytes(per_task)
        return frames

    async def run_round(self, rnd: Round) -> bool:
        """Run one round attempt to its end; True if it closed with a new global version."""
        state = self._hold(rnd)
        rnd = state.rnd
        block = (rnd.block_start, rnd.block_end) if rnd.block_start is not None else None
        while True:
            rnd, rows, accepted, variance = await self._gather(rnd, block)
            if len(rows) < self.job.min_devices:
                reason = (f"{len(rows)} of the required {self.job.min_devices} updates arrived before the deadline "
                          f"({len(self.connections)} devices connected, {len(state.tasks)} tasked)")
                self.store.fail_round(rnd.id, reason)
                self._settle_task_frames(rnd)
                self._release(state)
                log.warning("round %d attempt %d failed: %s", rnd.number, rnd.attempt, reason)
                return False
            if (published := await self._publishable(rnd, rows, accepted, block)) is not None:
                break
        new, metrics = published
        metrics["train_loss_before"] = float(np.mean([u.loss_before for u in rows]))
        metrics["train_loss_after"] = float(np.mean([u.loss_after for u in rows]))
        metrics["waves"] = rnd.wave + 1
        metrics |= self.round_strategy(rnd.number).round_metrics(rnd.number)
        if variance is not None:
            metrics["estimate_variance"] = variance
        if frames := self._settle_task_frames(rnd):  # the task frames this process sent for the round
            metrics["task_bytes_max"] = float(max(size for _, size, _ in frames))
            metrics["task_bytes_mean"] = float(np.mean([size for _, size, _ in frames]))
            metrics["tasks_in_seed_form"] = float(sum(seed for _, _, seed in frames))
            metrics["tasks_sent"] = float(len(frames))
        version = self.store.close_round(rnd, new, self._finite_metrics(rnd.base_version + 1, metrics))
        self._release(state)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        log.info("round %d closed: %d updates -> version %d; %s", rnd.number, len(rows), version, shown)
        print(f"round {rnd.number}/{self.job.rounds}: {len(rows)} updates, {shown}", flush=True)
        return True

    async def run_job(self) -> bool:
        """Run rounds until the job has them all; False if a round failed too often."""
        if self.evaluate and not self.store.metrics(self.job.id):
            metrics = await asyncio.to_thread(self.evaluate, np.frombuffer(self.store.version(self.job.id, 0).vector, "<f4"))
            self.store.add_metrics(self.job.id, 0, self._finite_metrics(0, metrics))
            print("round 0 (initial adapter): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        failures = 0
        while (done := self.store.closed_rounds(self.job.id)) < self.job.rounds:
            rnd = self.store.open_round(self.job.id)
            if rnd is None:
                base = self.store.latest_version(self.job.id).version
                blocks = self.blocks
                rnd = self.store.start_round(self.job.id, done + 1, base, blocks[done % len(blocks)] if blocks else None)
                log.info("round %d attempt %d opened from version %d", rnd.number, rnd.attempt, base)
            else:
                log.info("resuming open round %d attempt %d", rnd.number, rnd.attempt)
            if await self.run_round(rnd):
                failures = 0
            else:
                failures += 1
                if failures >= self.max_attempts:
                    return False
        self.store.finish_job(self.job.id)
        self.finished.set()
        for device_id, ws in list(self.connections.items()):
            try:
                await ws.send(protocol.Done(job_id=self.job.id, reason="job finished").to_wire())
            except ConnectionClosed:
                pass
        return True
