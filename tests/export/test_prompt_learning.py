"""Prompt tuning, P-tuning and prefix tuning: the `.pte` agrees with eager peft, the written peft folder
loads with `PeftModel.from_pretrained` and gives the program's loss, and MeZO through the program
learns on real data (more than random steps of the same length)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.prompt_learning import mezo_against_chance
from fwdfed.bundle.manifest import load_bundle
from fwdfed.model.peft_adapter import save_peft_adapter
from tests.conftest import STORIES, STORIES_PROMPT_FLAGS, export_bundle, run_command
from tests.support.checks import assert_peft_folder_matches_program

SMALL = ["--num-virtual-tokens", "4", "--batch-size", "2", "--seq-len", "32", "--max-perturbations", "2"]
# (source flags, adapter flags, MeZO's learning rate and directions per step for the signal check). Each
# adapter type runs once, and each model family once: prompt tuning (from text) and prefix tuning on the
# real stories260K, P-tuning on the BERT family; the other pairings share these code paths and cost
# an export each. The tiny-distilbert preset has random weights: what it can learn of SST-2 is mostly
# the label prior, which random steps find too, so it needs less noisy steps (more directions) to beat them.
CASES = {
    "llama-prompt-text": (["--model", str(STORIES)],
                          ["--adapter", "prompt-tuning", "--prompt-init", "text", "--prompt-init-text",
                           "Once upon a time"], 1e-2, 1),
    "llama-prefix": (["--model", str(STORIES)], ["--adapter", "prefix-tuning"], 1e-2, 1),
    "distilbert-p-tuning": (["--preset", "tiny-distilbert"], ["--adapter", "p-tuning", "--encoder-hidden-size", "16"],
                            3e-3, 8),
}


@pytest.fixture(scope="module", params=list(CASES))
def prompt_learning_bundle(request, tmp_path_factory):
    source, adapter, lr, directions = CASES[request.param]
    if str(STORIES) in source and not STORIES.is_dir():
        pytest.skip(f"{STORIES} is not here")
    if source == ["--model", str(STORIES)] and tuple(adapter) + tuple(SMALL) == STORIES_PROMPT_FLAGS:
        return request.getfixturevalue("stories_prompt_bundle"), (lr, directions)  # exported once per session
    out = export_bundle(tmp_path_factory.mktemp("bundles") / request.param, *source, *adapter, *SMALL)
    return out, (lr, directions)


def test_pte_agrees_with_eager_peft(prompt_learning_bundle):
    out, _ = prompt_learning_bundle
    m = load_bundle(out).manifest
    assert m.verification["loss_max_abs_diff"] < 1e-4
    names = [t.name for t in m.layout.tensors]
    assert "prompt_encoder.default.embedding.weight" in names
    if m.adapter.kind == "p-tuning":  # the MLP encoder runs inside the program on the P copies
        assert any(".mlp_head." in n for n in names)


def test_prompt_initialised_from_text_is_the_texts_embeddings(prompt_learning_bundle):
    out, _ = prompt_learning_bundle
    bundle = load_bundle(out)
    config = bundle.manifest.adapter.peft_config
    if config.get("prompt_tuning_init") != "TEXT":
        pytest.skip("not initialised from text")
    from transformers import AutoModel, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(bundle.base_model_path)(config["prompt_tuning_init_text"])["input_ids"]
    ids = (ids * 4)[:4]  # peft repeats (or cuts) the text to the number of virtual tokens
    embeddings = AutoModel.from_pretrained(bundle.base_model_path).get_input_embeddings().weight.detach().numpy()
    table = bundle.manifest.layout.unflatten(bundle.initial_adapter())["prompt_encoder.default.embedding.weight"]
    np.testing.assert_array_equal(table, embeddings[ids])


def test_written_peft_folder_loads_and_gives_the_programs_loss(prompt_learning_bundle, tmp_path):
    out, _ = prompt_learning_bundle
    bundle = load_bundle(out)
    vector = (bundle.initial_adapter() + 0.1 * np.random.default_rng(0).standard_normal(bundle.manifest.adapter_dim)
              ).astype(np.float32)
    folder = save_peft_adapter(bundle, vector, tmp_path / "adapter")
    assert (folder / "adapter_config.json").is_file()
    assert_peft_folder_matches_program(out, folder, vector)


def test_mezo_on_real_data_beats_random_steps(prompt_learning_bundle):
    out, (lr, directions) = prompt_learning_bundle
    r = mezo_against_chance(out, steps=30, lr=lr, directions=directions)
    bar = max(max(r["chance"]), float(np.mean(r["chance"]) + 3 * np.std(r["chance"])), 0.0)
    print(f"held-out loss {r['start']:.4f} -> {r['final']:.4f}; random steps: {np.round(r['chance'], 4).tolist()}")
    assert r["gain"] > bar, f"gain {r['gain']:.4f} is within chance (bar {bar:.4f})"


@pytest.mark.parametrize("flags, message", [
    (["--preset", "tiny-distilbert", "--adapter", "prefix-tuning"], "takes past keys and values"),
    (["--preset", "tiny-llama", "--adapter", "p-tuning", "--prompt-encoder", "lstm"], "no batched LSTM"),
    (["--preset", "tiny-llama", "--adapter", "prompt-tuning", "--prompt-init", "text"], "needs --prompt-init-text"),
    (["--preset", "tiny-llama", "--adapter", "p-tuning", "--prompt-init", "text", "--prompt-init-text", "hi"],
     "prompt-tuning only"),
    (["--preset", "tiny-llama", "--adapter", "prompt-tuning", "--seq-len", "510"], "past the model's 512 positions"),
])
def test_bad_prompt_learning_flags_are_refused_in_one_line(tmp_path, flags, message):
    result = run_command("export", *flags, "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr
    assert not (tmp_path / "b").exists()
