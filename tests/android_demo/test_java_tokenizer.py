"""The Java tokenizer gives Hugging Face's ids on the committed golden text sets.

docs/golden/tokenizer_stories260k.json (LLaMA's sentencepiece-style BPE with byte fallback, as
a stories260K bundle holds it) and docs/golden/tokenizer_all-minilm-l6-v2.json (BERT WordPiece)
hold texts and the ids AutoTokenizer gave, whole and truncated to 64; the tokenizer folders
they were made from are committed in docs/golden/tokenizers/. The golden files are checked
against the installed Hugging Face tokenizer too, so a stale file shows.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT

GOLDEN = ROOT / "docs" / "golden"
NAMES = ["stories260k", "all-minilm-l6-v2"]


def java_ids(java_core, tmp_path, golden: dict, max_length: int) -> dict:
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(golden["texts"]))
    return json.loads(java_core.run("TokenizerDump", ROOT / golden["tokenizer"], texts, str(max_length)).stdout)


@pytest.mark.parametrize("name", NAMES)
def test_java_tokenizer_matches_the_golden_ids(java_core, tmp_path, name):
    golden = json.loads((GOLDEN / f"tokenizer_{name}.json").read_text())
    n = golden["max_length"]
    whole = java_ids(java_core, tmp_path, golden, 1 << 30)
    truncated = java_ids(java_core, tmp_path, golden, n)
    assert whole["pad_id"] == golden["pad_token_id"]
    assert whole["pad_left"] == (golden["padding_side"] == "left")
    wrong = [(t[:40], ours[:12], theirs[:12]) for t, ours, theirs in zip(golden["texts"], whole["ids"], golden["ids"])
             if ours != theirs]
    assert not wrong, f"{len(wrong)} of {len(golden['texts'])} texts differ: {wrong[:3]}"
    assert truncated["ids"] == golden[f"ids_truncated_{n}"]
    print(f"{name}: {len(golden['texts'])} texts, {sum(map(len, golden['ids']))} ids, all equal")


@pytest.mark.parametrize("name", NAMES)
def test_golden_ids_are_what_hugging_face_gives_now(name):
    from transformers import AutoTokenizer

    golden = json.loads((GOLDEN / f"tokenizer_{name}.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(ROOT / golden["tokenizer"], local_files_only=True)
    assert [tokenizer(t)["input_ids"] for t in golden["texts"]] == golden["ids"]
    assert tokenizer.padding_side == golden["padding_side"]
