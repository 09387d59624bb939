"""A teacher's labelling phase on the device (fwdfed.methods.fedkd): load, label the shard, free.

The teacher's bundle is an inference-only program (`python -m export.teacher`, or `python -m
export --inference-only`). The device runs it once over its examples, with the teacher's own
tokenizer and shapes, keeps the logits of every example (a few floats each), and drops the
program before the student's is loaded, so the two are never resident together. What the phase
took is measured: its peak (the kernel's high-water mark, reset at the start where the kernel
allows it) and the resident memory before loading and after freeing.
"""

from __future__ import annotations

import ctypes
import gc
from dataclasses import dataclass

import numpy as np

from fwdfed.bundle.manifest import Bundle
from fwdfed.bundle.tasks import SEQ_CLS
from fwdfed.errors import UserError
from fwdfed.memory import current_rss, peak_rss, reset_peak
from runtime.data import Example, encode
from runtime.engine import ProgramEngine
from runtime.evaluate import load_tokenizer
from runtime.executorch import runtime


class TeacherError(UserError):
    """The teacher bundle cannot label this device's data; the message says why."""


@dataclass(frozen=True)
class Labelling:
    logits: np.ndarray  # [N, C] float32, one row per example, in the examples' order
    sha256: str  # the teacher program's, as a task names it
    peak_bytes: int  # the phase's high-water mark of resident memory
    rss_before_bytes: int  # before the teacher was loaded
    rss_after_bytes: int  # after it was freed
    seconds: float


def check_teacher(teacher: Bundle, student: Bundle) -> None:
    """The teacher must be a classifier over the student's classes."""
    t, s = teacher.manifest, student.manifest
    if t.task != SEQ_CLS or s.task != SEQ_CLS:
        raise TeacherError(f"distillation needs two classifiers; the teacher is {t.task}, the student {s.task}")
    if t.model.num_labels != s.model.num_labels:
        raise TeacherError(f"the teacher has {t.model.num_labels} classes, the student "
                           f"{s.model.num_labels}")


def return_freed_memory() -> None:
    """Hand freed heap back to the kernel (glibc keeps it otherwise), so the RSS after shows the release."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def label(teacher: Bundle, examples: list[Example]) -> Labelling:
    """The teacher's logits of `examples`, its program loaded for this call only and freed before return."""
    import time

    m = teacher.manifest
    started = time.perf_counter()
    runtime()  # the ExecuTorch libraries stay loaded for the student: not the teacher's to free
    before = current_rss()
    try:
        reset_peak()  # the phase's peak its own, where the kernel allows it
    except OSError:
        pass
    batches = encode(load_tokenizer(teacher), examples, m.task, m.inputs.batch_size, m.inputs.seq_len)
    engine = ProgramEngine.for_bundle(teacher)
    adapter = teacher.initial_adapter()  # a teacher is trained whole: its adapter is the identity (or its head)
    rows = [engine.logits(b, adapter)[: b.num_examples] for b in batches]
    logits = np.concatenate(rows).astype(np.float32)
    peak = peak_rss()
    engine.release()
    del engine, batches
    gc.collect()
    return_freed_memory()
    return Labelling(logits=logits, sha256=m.program.sha256, peak_bytes=peak, rss_before_bytes=before,
                     rss_after_bytes=current_rss(), seconds=time.perf_counter() - started)
