"""The device's program: loaded once a child process ran it without crashing (runtime.isolation).

A program the runtime refuses with an error stops the device at start with one line, as it always
has: a setup to fix. One that crashed the child (DeviceConfig.isolate_load) leaves the device up
without a program: it connects and declines each task it is given (`ProgramUnavailable`), and
reads the bundle from disk again at every task, so that it trains once the operator replaced it.
"""

from __future__ import annotations

import logging

from device_sdk.setup import DeviceConfig, DeviceError
from fwdfed.bundle.manifest import Bundle, BundleError, load_bundle
from runtime.executorch import EngineError
from runtime.isolation import ProgramCrashed, load_engine

log = logging.getLogger("device")


class ProgramUnavailable(DeviceError):
    """This task cannot run because the program crashed the runtime's child; the device stays up."""


def same_shapes(a: Bundle, b: Bundle) -> bool:
    """Whether `b` takes what the device prepared for `a`: its hello (model, adapter) and its shard's batches."""
    ma, mb = a.manifest, b.manifest
    return (ma.base_model_hash, ma.adapter_dim, ma.task, ma.inputs, ma.model.num_labels) == \
        (mb.base_model_hash, mb.adapter_dim, mb.task, mb.inputs, mb.model.num_labels)


class DeviceProgram:
    """The engine of `bundle`, shared by the logical devices of one process (the emulator's --workers)."""

    def __init__(self, config: DeviceConfig, bundle: Bundle, trust_key):
        self.config, self.bundle, self.trust_key = config, bundle, trust_key
        self.engine = None
        self.crashed: str | None = None  # the last check's line while the program crashes the child

    def load(self):
        """The engine; None (and `crashed` said once in the log) when the program crashed the child.
        A program refused with an error raises that EngineError."""
        try:
            self.engine, self.crashed = load_engine(self.bundle, self.config.isolate_load), None
        except ProgramCrashed as e:
            if self.crashed is None:  # a retry's crash is in its decline's line instead
                log.error("%s: %s; declining tasks until the bundle is replaced", self.config.device_id, e)
            self.crashed = str(e)
        return self.engine

    def for_task(self, task_id: str):
        """The engine for this task: after a crash, the bundle read and checked again first (the operator
        may have replaced it). ProgramUnavailable, with the line for the decline, while it cannot be loaded."""
        if self.engine is not None:
            return self.engine
        try:
            bundle = load_bundle(self.config.bundle, trust_key=self.trust_key)
        except BundleError as e:
            raise ProgramUnavailable(f"task {task_id}: {e}") from None
        if not same_shapes(self.bundle, bundle):
            raise ProgramUnavailable(f"task {task_id}: the bundle {self.config.bundle} was replaced by one of other "
                                     "shapes (model, adapter, inputs or classes) than this device set up for: "
                                     "restart the device")
        self.bundle = bundle
        try:
            self.load()
        except EngineError as e:
            raise ProgramUnavailable(f"task {task_id}: {e}") from None
        if self.engine is None:
            raise ProgramUnavailable(f"task {task_id}: {self.crashed}")
        return self.engine
