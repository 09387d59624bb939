"""Text data: read the formats we ship (and any file in those shapes), shuffle, split
train/held-out, deal the devices their shards, tokenize into fixed batches.

Formats:
- `.txt`: plain text, documents separated by blank lines (causal LM);
- `.csv`, `.tsv`: a header row naming the columns (AG News: `label,content`; SST-2:
  `label<TAB>sentence`);
- `.jsonl`: one JSON object per line.
For labelled data, `DataSpec` names the label column and the text columns (several are joined
with a space; by default every column but the label), and says how labels become class ids:
integers minus an offset, or strings looked up in a list of class names. A row whose label cell
is empty is unlabelled: a device without a teacher leaves it out, a device distilling from a
teacher (`fwdfed.methods.fedkd`) learns it from the teacher's distribution alone.

The order is shuffled with a seed before anything is cut (docs/data.md gives the exact
permutation, so that any implementation deals the same shards), then every 10th example is
held out for the coordinator's evaluation and the rest is dealt to the devices, IID or
Dirichlet non-IID (`partition`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fwdfed.batch import Batch
from fwdfed.bundle.tasks import IGNORE_INDEX, SEQ_CLS
from fwdfed.directions import words
from fwdfed.errors import UserError

HELDOUT_EVERY = 10
SPLITS = ("iid", "dirichlet")


class DataError(UserError):
    """A data file that cannot be read; the message is meant for the user."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int | None = None


@dataclass(frozen=True)
class DataSpec:
    """How a file becomes examples; the coordinator and every device must use the same one."""
    text_columns: tuple[str, ...] = ()  # joined with a space; () = every column but the label
    label_column: str = "label"
    labels: tuple[str, ...] = ()  # class names in class order: a label is its index here
    label_offset: int | None = None  # integer labels minus this; None: 1 if they run 1..num_labels, else 0
    num_labels: int | None = None  # when known (the bundle's), labels outside [0, num_labels) are refused
    seed: int | None = 0  # shuffle seed; None keeps the file's order


@dataclass(frozen=True)
class Partition:
    """How the training examples are dealt to the devices."""
    how: str = "iid"  # iid: every device a like sample; dirichlet: class shares ~ Dir(alpha) per class
    alpha: float = 0.5
    size_skew: float = 0.0  # iid: device sizes proportional to exp(size_skew * N(0, 1)); 0 = equal
    seed: int = 0

    def __post_init__(self):
        if self.how not in SPLITS:
            raise DataError(f"unknown split {self.how!r}; expected one of {', '.join(SPLITS)}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise DataError(f"the Dirichlet alpha must be a positive number, got {self.alpha!r}")
        if not (math.isfinite(self.size_skew) and self.size_skew >= 0):
            raise DataError(f"the size skew must be a number >= 0, got {self.size_skew!r}")


def read_examples(path: str | Path, spec: DataSpec = DataSpec()) -> list[Example]:
    """The file's examples, shuffled by `spec.seed`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    if path.suffix == ".txt":
        examples = [Example(doc.strip()) for doc in text.split("\n\n") if doc.strip()]
    elif path.suffix in (".csv", ".tsv", ".jsonl"):
        rows = _jsonl_rows(path, text) if path.suffix == ".jsonl" else _table_rows(path, text, path.suffix)
        examples = _labelled(path, rows, spec)
    else:
        raise DataError(f"{path}: unknown data format {path.suffix!r} (expected .txt, .csv, .tsv or .jsonl)")
    if not examples:
        raise DataError(f"{path} holds no examples")
    return shuffled(examples, spec.seed)


def shuffled(items: list, seed: int | None) -> list:
    """`items` in the order of their keys word(seed, i) (docs/directions.md): a permutation any
    implementation of the direction generator reproduces."""
    if seed is None:
        return list(items)
    order = np.argsort(words(seed, 0, len(items)), kind="stable")
    return [items[i] for i in order]


def _table_rows(path: Path, text: str, suffix: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    delimiter = "," if suffix == ".csv" else "\t"
    quoting = csv.QUOTE_MINIMAL if suffix == ".csv" else csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    header = [h.strip() for h in next(reader, [])]
    if len(header) < 2:
        raise DataError(f"{path}: expected a header row naming at least a label and a text column, got {header}")
    rows = []
    for row in reader:
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{reader.line_num}: expected {len(header)} columns, got {len(row)}")
        rows.append((reader.line_num, row))
    return header, rows


def _jsonl_rows(path: Path, text: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    objects = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: not a JSON object: {e.msg}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
        objects.append((line_no, obj))
    header = list(dict.fromkeys(k for _, obj in objects for k in obj))
    rows = []
    for line_no, obj in objects:
        missing = [k for k in header if k not in obj]
        if missing:
            raise DataError(f"{path}:{line_no}: no {missing[0]!r} (other lines have it)")
        rows.append((line_no, ["" if obj[k] is None else str(obj[k]) for k in header]))
    return header, rows


def _labelled(path: Path, table, spec: DataSpec) -> list[Example]:
    header, rows = table
    for column in (spec.label_column, *spec.text_columns):
        if column not in header:
            raise DataError(f"{path}: no column {column!r} (its columns: {', '.join(header)})")
    text_columns = spec.text_columns or tuple(c for c in header if c != spec.label_column)
    label_at, text_at = header.index(spec.label_column), [header.index(c) for c in text_columns]
    raw = [(line_no, row[label_at].strip(), " ".join(row[i].strip() for i in text_at)) for line_no, row in rows]
    # An empty label cell is an unlabelled row: only a teacher (fwdfed.methods.fedkd) can learn from it.
    labels = iter(_class_ids(path, [(n, label) for n, label, _ in raw if label], spec))
    return [Example(text, next(labels) if label else None) for _, label, text in raw]


def _class_ids(path: Path, raw: list[tuple[int, str]], spec: DataSpec) -> list[int]:
    if spec.labels:
        index = {name: i for i, name in enumerate(spec.labels)}
        for line_no, label in raw:
            if label not in index:
                raise DataError(f"{path}:{line_no}: label {label!r} is not one of {', '.join(spec.labels)}")
        return [index[label] for _, label in raw]
    values = []
    for line_no, label in raw:
        try:
            values.append(int(label))
        except ValueError:
            raise DataError(f"{path}:{line_no}: label {label!r} is not an integer (name the classes with "
                            "--labels to read text labels)") from None
    offset = spec.label_offset
    if offset is None:  # AG News counts its classes from 1: 1..K, with K the model's number of labels
        k = spec.num_labels
        offset = 1 if values and min(values) >= 1 and k is not None and max(values) == k else 0
    ids = [v - offset for v in values]
    k = spec.num_labels
    for (line_no, label), i in zip(raw, ids):
        if i < 0 or (k is not None and i >= k):
            raise DataError(f"{path}:{line_no}: label {label} is not a class of this model "
                            f"(label offset {offset}, {k if k is not None else 'unknown'} classes)")
    return ids


def labelled(examples: list[Example], what: str) -> list[Example]:
    """The examples that carry a label; `what` names them in the error when none does."""
    kept = [e for e in examples if e.label is not None]
    if not kept:
        raise DataError(f"{what} has no labelled rows (a classifier's data is a .csv, .tsv or .jsonl file with a "
                        "label column; an empty label cell is an unlabelled row)")
    return kept


def split(examples: list[Example], part: str) -> list[Example]:
    if part == "heldout":
        return examples[::HELDOUT_EVERY]
    if part == "train":
        return [e for i, e in enumerate(examples) if i % HELDOUT_EVERY]
    raise ValueError(part)


def shard(examples: list[Example], index: int, count: int) -> list[Example]:
    """Device `index` of `count` takes every count-th example: disjoint, near-equal shards."""
    return examples[index::count]


def partition(examples: list[Example], count: int, how: Partition = Partition()) -> list[list[Example]]:
    """The devices' shards: disjoint, covering `examples`.

    iid: every count-th example (sizes equal), or with a size skew, contiguous runs of sizes
    proportional to exp(skew * g_i); dirichlet (FederatedScope's LDA splitter): for every class,
    its examples are dealt in shares drawn from Dir(alpha, ..., alpha), so a small alpha gives
    each device a few classes."""
    rng = np.random.default_rng(how.seed)
    if how.how == "iid":
        if how.size_skew == 0:
            return [shard(examples, i, count) for i in range(count)]
        shares = np.exp(how.size_skew * rng.standard_normal(count))
        cuts = np.round(np.cumsum(shares / shares.sum()) * len(examples)).astype(int)
        starts = np.concatenate([[0], cuts[:-1]])
        return [examples[a:b] for a, b in zip(starts, cuts)]
    by_class: dict[int | None, list[Example]] = {}
    for e in examples:
        by_class.setdefault(e.label, []).append(e)
    shards: list[list[Example]] = [[] for _ in range(count)]
    for label in sorted(by_class, key=lambda x: (x is None, x)):
        members = by_class[label]
        cuts = np.round(np.cumsum(rng.dirichlet([how.alpha] * count)) * len(members)).astype(int)
        for i, (a, b) in enumerate(zip(np.concatenate([[0], cuts[:-1]]), cuts)):
            shards[i].extend(members[a:b])
    return [shuffled(s, how.seed + 1) for s in shards]  # classes interleaved within a shard


def encode(tokenizer, examples: list[Example], task: str, batch_size: int, seq_len: int) -> list[Batch]:
    """Tokenize into fixed [batch_size, seq_len] batches (the program's static shapes)."""
    import torch  # here: the data flags and the reader serve commands that run without torch

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
            labels[: len(chunk)] = [IGNORE_INDEX if e.label is None else e.label for e in chunk]
        else:
            labels = np.where(mask == 1, ids, IGNORE_INDEX)
            labels[len(chunk) :] = IGNORE_INDEX
        batches.append(Batch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels), weights))
    return batches


def add_data_arguments(parser, what: str) -> None:
    """The flags that say how a labelled file is read (`what`: whose data, for the help)."""
    g = parser.add_argument_group(f"{what} (.csv, .tsv, .jsonl)")
    g.add_argument("--text-column", action="append", default=[],
                   help="a column holding text; repeat to join several (default: every column but the label)")
    g.add_argument("--label-column", default="label")
    g.add_argument("--labels", help="class names in class order, comma-separated, for text labels")
    g.add_argument("--label-offset", type=int,
                   help="subtract this from integer labels (default: 1 when they run 1..classes, else 0)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the shuffle before the held-out slice and the "
                   "shards are cut; -1 keeps the file's order")


def data_spec(args, num_labels: int | None) -> DataSpec:
    labels = tuple(x.strip() for x in args.labels.split(",")) if args.labels else ()
    if labels and num_labels is not None and len(labels) != num_labels:
        raise DataError(f"--labels names {len(labels)} classes; the model has {num_labels}")
    return DataSpec(text_columns=tuple(args.text_column), label_column=args.label_column, labels=labels,
                    label_offset=args.label_offset, num_labels=num_labels,
                    seed=None if args.data_seed == -1 else args.data_seed)


def add_partition_arguments(parser) -> None:
    g = parser.add_argument_group("how the training examples are dealt to the devices")
    g.add_argument("--split", choices=SPLITS, default="iid")
    g.add_argument("--alpha", type=float, default=0.5, help="dirichlet: the concentration (small: few classes each)")
    g.add_argument("--size-skew", type=float, default=0.0,
                   help="iid: device sizes proportional to exp(skew x N(0,1)); 0 = equal")


def partition_of(args) -> Partition:
    seed = 0 if args.data_seed == -1 else args.data_seed
    return Partition(how=args.split, alpha=args.alpha, size_skew=args.size_skew, seed=seed)
