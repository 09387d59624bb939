"""Text data: read the formats we ship, split train/held-out, shard, tokenize into fixed batches.

Formats (a user may bring any file in these shapes):
- `.txt`: plain text, documents separated by blank lines (causal LM);
- `.csv`: header `label,content` (AG News; labels 1..4 become 0..3);
- `.tsv`: header `label<TAB>sentence` (SST-2; labels 0/1).

The held-out split is fixed by example index (every 10th example), so the coordinator's
evaluation set and the devices' training shards never overlap.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fwdfed.batch import Batch
from fwdfed.bundle.tasks import IGNORE_INDEX, SEQ_CLS
from fwdfed.errors import UserError

HELDOUT_EVERY = 10


class DataError(UserError):
    """A data file that cannot be read; the message is meant for the user."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int | None = None


def read_examples(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    if path.suffix == ".txt":
        examples = [Example(doc.strip()) for doc in text.split("\n\n") if doc.strip()]
    elif path.suffix in (".csv", ".tsv"):
        examples = _read_labelled(path, text, delimiter="," if path.suffix == ".csv" else "\t")
    else:
        raise DataError(f"{path}: unknown data format {path.suffix!r} (expected .txt, .csv or .tsv)")
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def _read_labelled(path: Path, text: str, delimiter: str) -> list[Example]:
    rows = csv.reader(text.splitlines(), delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE)
    header = next(rows, None)
    if not header or header[0].strip() != "label" or len(header) < 2:
        raise DataError(f"{path}: expected a header 'label{delimiter}<text>', got {header}")
    raw = []
    for line_no, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) < 2:
            raise DataError(f"{path}:{line_no}: expected 2 columns, got {len(row)}")
        try:
            raw.append((int(row[0]), row[1]))
        except ValueError:
            raise DataError(f"{path}:{line_no}: label {row[0]!r} is not an integer") from None
    # AG News numbers its classes from 1; the model's classes are 0-based.
    base = min(label for label, _ in raw) if raw else 0
    return [Example(text, label - base) for label, text in raw]


def split(examples: list[Example], part: str) -> list[Example]:
    if part == "heldout":
        return examples[::HELDOUT_EVERY]
    if part == "train":
        return [e for i, e in enumerate(examples) if i % HELDOUT_EVERY]
    raise ValueError(part)


def shard(examples: list[Example], index: int, count: int) -> list[Example]:
    """Device `index` of `count` takes every count-th example: disjoint, near-equal shards."""
    return examples[index::count]


def encode(tokenizer, examples: list[Example], task: str, batch_size: int, seq_len: int) -> list[Batch]:
    """Tokenize into fixed [batch_size, seq_len] batches (the program's static shapes)."""
    if task == SEQ_CLS and any(e.label is None for e in examples):
        raise DataError("classification needs labelled data (.csv or .tsv)")
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        enc = tokenizer([e.text for e in chunk], padding="max_length", truncation=True, max_length=seq_len,
                        return_tensors="np")
        ids = np.full((batch_size, seq_len), tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((batch_size, seq_len), dtype=np.int64)
        ids[: len(chunk)], mask[: len(chunk)] = enc["input_ids"], enc["attention_mask"]
        mask[len(chunk) :, 0] = 1  # filler rows attend to one token so no softmax row is empty
        weights = np.zeros(batch_size, dtype=np.float32)
        weights[: len(chunk)] = 1.0
        if task == SEQ_CLS:
            labels = np.zeros(batch_size, dtype=np.int64)
            labels[: len(chunk)] = [e.label for e in chunk]
        else:
            labels = np.where(mask == 1, ids, IGNORE_INDEX)
            labels[len(chunk) :] = IGNORE_INDEX
        batches.append(Batch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels), weights))
    return batches
