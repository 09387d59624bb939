import pytest

from device_sdk.data import DataError, encode, read_examples, shard, split
from fwdfed.bundle.tasks import CAUSAL_LM, IGNORE_INDEX, SEQ_CLS
from fwdfed.model.base_model import byte_level_tokenizer
from tests.conftest import SHARED


def test_reads_the_shipped_formats():
    stories = read_examples(SHARED / "data" / "tinystories" / "train_head.txt")
    assert len(stories) > 1000 and stories[0].label is None
    ag = read_examples(SHARED / "data" / "ag_news" / "train_8000.csv")
    assert len(ag) == 8000 and {e.label for e in ag} == {0, 1, 2, 3}
    sst = read_examples(SHARED / "data" / "sst2" / "dev.tsv")
    assert len(sst) == 872 and {e.label for e in sst} == {0, 1}


def test_heldout_and_train_are_disjoint_and_shards_cover_train():
    examples = read_examples(SHARED / "data" / "sst2" / "dev.tsv")
    train, heldout = split(examples, "train"), split(examples, "heldout")
    assert len(train) + len(heldout) == len(examples)
    assert not {id(e) for e in train} & {id(e) for e in heldout}
    shards = [shard(train, i, 3) for i in range(3)]
    assert sum(map(len, shards)) == len(train)


@pytest.mark.parametrize("content, suffix, reason", [
    ("label,content\nx,hello\n", ".csv", "not an integer"),
    ("text,label\n1,a\n", ".csv", "header"),
    ("label\tsentence\n1\n", ".tsv", "2 columns"),
    ("", ".txt", "no examples"),
    ("hello", ".json", "unknown data format"),
])
def test_bad_files_get_a_clear_error(tmp_path, content, suffix, reason):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=reason):
        read_examples(path)
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
