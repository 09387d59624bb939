"""Held-out evaluation of an adapter through the exported program."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from fwdfed.bundle.manifest import Bundle
from fwdfed.bundle.tasks import SEQ_CLS
from fwdfed.methods.estimate import mean_loss
from runtime.data import DataSpec, encode, labelled, read_examples, split
from runtime.engine import ProgramEngine


def load_tokenizer(bundle: Bundle):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundle.tokenizer_path, local_files_only=True)


class Evaluator:
    """Mean held-out loss (and accuracy, for classification) of any adapter vector."""

    def __init__(self, bundle: Bundle, data: str | Path, max_examples: int, engine: ProgramEngine | None = None,
                 spec: DataSpec | None = None):
        m = bundle.manifest
        spec = replace(spec or DataSpec(), num_labels=m.model.num_labels)
        examples = split(read_examples(data, spec), "heldout")
        if m.task == SEQ_CLS:  # accuracy and loss need a label: the unlabelled held-out rows are not scored
            examples = labelled(examples, f"the held-out slice of {data}")
        examples = examples[:max_examples]
        self.task = m.task
        self.batches = encode(load_tokenizer(bundle), examples, m.task, m.inputs.batch_size, m.inputs.seq_len)
        self.engine = engine or ProgramEngine.for_bundle(bundle)
        self.num_examples = len(examples)

    def __call__(self, adapter: np.ndarray) -> dict[str, float]:
        if self.task != SEQ_CLS:
            return {"heldout_loss": mean_loss(self.engine, self.batches, adapter)}
        # A classifier's loss is the cross-entropy of its logits: one predict call a batch gives both figures.
        loss = correct = 0.0
        for b in self.batches:
            logits = self.engine.logits(b, adapter).astype(np.float64)
            labels = b.labels.numpy()
            top = logits.max(axis=-1)
            nll = top + np.log(np.exp(logits - top[:, None]).sum(axis=-1)) - logits[np.arange(len(labels)), labels]
            loss += float((nll * b.weights).sum())
            correct += float(((logits.argmax(axis=-1) == labels) * b.weights).sum())
        return {"heldout_loss": loss / self.num_examples, "heldout_accuracy": correct / self.num_examples}
