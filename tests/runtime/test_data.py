import json
from collections import Counter

import numpy as np
import pytest

from fwdfed.bundle.tasks import CAUSAL_LM, IGNORE_INDEX, SEQ_CLS
from fwdfed.directions import words
from fwdfed.model.base_model import byte_level_tokenizer
from runtime.data import (DataError, DataSpec, Partition, encode, labelled, partition, read_examples, shard, shuffled,
                          split)
from tests.conftest import SHARED

AG_NEWS = SHARED / "data" / "ag_news" / "train_8000.csv"


def test_reads_the_shipped_formats():
    stories = read_examples(SHARED / "data" / "tinystories" / "train_head.txt")
    assert len(stories) > 1000 and stories[0].label is None
    ag = read_examples(AG_NEWS, DataSpec(num_labels=4))
    assert len(ag) == 8000 and Counter(e.label for e in ag) == {0: 2000, 1: 2000, 2: 2000, 3: 2000}
    sst = read_examples(SHARED / "data" / "sst2" / "dev.tsv")
    assert len(sst) == 872 and {e.label for e in sst} == {0, 1}


def test_the_shuffle_is_the_documented_permutation_and_mixes_a_sorted_file():
    items = list(range(50))
    assert shuffled(items, 7) == [int(i) for i in np.argsort(words(7, 0, 50))]
    assert shuffled(items, None) == items and shuffled(items, 7) != shuffled(items, 8)
    heldout = split(read_examples(AG_NEWS, DataSpec(num_labels=4)), "heldout")  # the file is sorted by label
    assert set(Counter(e.label for e in heldout).values()) != {0} and len(Counter(e.label for e in heldout)) == 4


def test_heldout_and_train_are_disjoint_and_shards_cover_train():
    examples = read_examples(SHARED / "data" / "sst2" / "dev.tsv")
    train, heldout = split(examples, "train"), split(examples, "heldout")
    assert len(train) + len(heldout) == len(examples)
    assert not {id(e) for e in train} & {id(e) for e in heldout}
    shards = [shard(train, i, 3) for i in range(3)]
    assert sum(map(len, shards)) == len(train)


@pytest.mark.parametrize("how", [Partition(), Partition("iid", size_skew=1.0), Partition("dirichlet", alpha=0.5),
                                 Partition("dirichlet", alpha=100.0)])
def test_partitions_are_disjoint_and_cover_the_training_examples(how):
    train = split(read_examples(AG_NEWS, DataSpec(num_labels=4)), "train")
    shards = partition(train, 5, how)
    assert sorted(id(e) for s in shards for e in s) == sorted(id(e) for e in train)
    assert partition(train, 5, how) == shards  # the same seed deals the same shards


def test_dirichlet_with_a_small_alpha_skews_the_classes_and_a_large_one_does_not():
    train = split(read_examples(AG_NEWS, DataSpec(num_labels=4)), "train")

    def top_share(alpha):  # the largest class's share of a device, averaged over devices
        shards = partition(train, 5, Partition("dirichlet", alpha=alpha))
        return np.mean([max(Counter(e.label for e in s).values()) / len(s) for s in shards if s])

    assert top_share(0.1) > 0.5 and top_share(100.0) < 0.35  # IID: 0.25


def test_columns_labels_and_offsets(tmp_path):
    csv_file = tmp_path / "news.csv"
    csv_file.write_text('label,title,description\n1,"Hello, world",A long text\n4,Title,"More, text"\n')
    both = read_examples(csv_file, DataSpec(num_labels=4, seed=None))
    assert [(e.text, e.label) for e in both] == [("Hello, world A long text", 0), ("Title More, text", 3)]
    titles = read_examples(csv_file, DataSpec(text_columns=("title",), label_offset=0, num_labels=5, seed=None))
    assert [(e.text, e.label) for e in titles] == [("Hello, world", 1), ("Title", 4)]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"sentiment": s, "text": t}) for s, t in [("neg", "bad"), ("pos", "good")]))
    named = read_examples(jsonl, DataSpec(label_column="sentiment", labels=("neg", "pos"), seed=None))
    assert [(e.text, e.label) for e in named] == [("bad", 0), ("good", 1)]


def test_an_empty_label_cell_is_an_unlabelled_row(tmp_path):
    tsv = tmp_path / "some.tsv"
    tsv.write_text("label\tsentence\n1\tgood\n\tno label\n0\tbad\n")
    rows = read_examples(tsv, DataSpec(num_labels=2, seed=None))
    assert [(e.text, e.label) for e in rows] == [("good", 1), ("no label", None), ("bad", 0)]
    assert labelled(rows, "x") == [rows[0], rows[2]]
    batch = encode(byte_level_tokenizer(), rows, SEQ_CLS, batch_size=4, seq_len=8)[0]
    assert batch.labels.tolist() == [1, IGNORE_INDEX, 0, 0] and batch.weights.tolist() == [1, 1, 1, 0]
    with pytest.raises(DataError, match="the shard has no labelled rows"):
        labelled(rows[1:2], "the shard")


@pytest.mark.parametrize("content, suffix, spec, reason", [
    ("label,content\nx,hello\n", ".csv", DataSpec(), "label 'x' is not an integer"),
    ("text\nhello\n", ".csv", DataSpec(), "header row"),
    ("label,content\n1,a\n", ".csv", DataSpec(text_columns=("body",)), r"no column 'body' \(its columns: label, content\)"),
    ("label\tsentence\n1\n", ".tsv", DataSpec(), "expected 2 columns, got 1"),
    ("label,content\n7,a\n", ".csv", DataSpec(num_labels=4), "label 7 is not a class of this model"),
    ('{"label": "meh", "text": "x"}\n', ".jsonl", DataSpec(labels=("neg", "pos")), "'meh' is not one of neg, pos"),
    ("[1, 2]\n", ".jsonl", DataSpec(), "expected a JSON object"),
    ("", ".txt", DataSpec(), "no examples"),
    ("hello", ".json", DataSpec(), "unknown data format"),
])
def test_bad_files_get_a_clear_error(tmp_path, content, suffix, spec, reason):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=reason):
        read_examples(path, spec)
    with pytest.raises(DataError, match="does not exist"):
        read_examples(tmp_path / "missing.txt")


def test_encode_pads_and_masks_fixed_batches():
    tok = byte_level_tokenizer()
    examples = read_examples(SHARED / "data" / "sst2" / "dev.tsv")[:5]
    batches = encode(tok, examples, SEQ_CLS, batch_size=4, seq_len=16)
    assert [b.num_examples for b in batches] == [4, 1]
    assert tuple(batches[1].input_ids.shape) == (4, 16) and batches[1].labels.shape == (4,)
    lm = encode(tok, examples, CAUSAL_LM, batch_size=4, seq_len=16)[1]
    assert (lm.labels[1:] == IGNORE_INDEX).all() and (lm.labels[0][lm.attention_mask[0] == 0] == IGNORE_INDEX).all()
