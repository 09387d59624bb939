"""The prefix/top split (export --adapter-blocks top:K): the frozen bottom once, the adapted top per pass."""

from dataclasses import replace

import numpy as np
import pytest

from fwdfed.bundle.manifest import load_bundle
from fwdfed.bundle.schema import Split
from fwdfed.memory_plan import plan_memory
from runtime.data import encode, read_examples
from runtime.engine import ProgramEngine
from runtime.evaluate import load_tokenizer
from runtime.prefix_cache import cache_prefix_states
from tests.conftest import SST2, TINYSTORIES, away_from_init, run_command


def real_batches(bundle, data=SST2, count=16):
    m = bundle.manifest
    return encode(load_tokenizer(bundle), read_examples(data)[:count], m.task, m.inputs.batch_size,
                  m.inputs.seq_len)


def test_the_manifest_records_the_split_and_export_verified_top_of_prefix_against_eager_peft(split_bundle):
    m = load_bundle(split_bundle).manifest
    assert m.program.split == Split(frozen_blocks=1, adapted_blocks=1, hidden_size=64, states_dtype="float16")
    assert {"prefix", "top", "forward", "predict", "features"} <= set(m.program.methods)
    assert m.verification["split_loss_max_abs_diff"] <= 1e-4
    # LoRA sits on the top block only (peft's layers_to_transform), beside the trained head
    lora = [t.name for t in m.layout.tensors if "lora" in t.name]
    assert lora and all(".layer.1." in name for name in lora)


def test_top_on_the_prefix_states_gives_the_whole_programs_losses(split_bundle):
    bundle = load_bundle(split_bundle)
    engine = ProgramEngine.for_bundle(bundle)
    rng = np.random.default_rng(0)
    adapters = np.stack([away_from_init(bundle, s) for s in range(3)]) + 0.01 * rng.standard_normal((3, 1))
    for batch in real_batches(bundle):
        whole = engine.losses(batch, adapters)
        states = engine.prefix_states(batch)
        assert states.shape == (4, 32, 64)
        np.testing.assert_allclose(engine.losses(replace(batch, prefix_states=states), adapters), whole, atol=1e-5)
        # what the device keeps: float16 states, a rounding the same for every adapter vector
        kept = engine.losses(replace(batch, prefix_states=states.astype(np.float16)), adapters)
        np.testing.assert_allclose(kept, whole, atol=5e-3)


@pytest.mark.parametrize("value, says", [("top:0", "must be all or top:K with K >= 1"),
                                         ("bottom:1", "must be all or top:K"),
                                         ("top:3", "the model has 2 blocks")])
def test_bad_adapter_blocks_get_one_clear_error(tmp_path, value, says):
    result = run_command("export", "--preset", "tiny-distilbert", "--out", str(tmp_path / "b"), "--adapter-blocks",
                         value)
    assert result.returncode != 0 and says in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args, says", [(["--preset", "tiny-llama", "--stream"], "does not combine with --stream"),
                                        (["--preset", "tiny-llama", "--adapter", "prompt-tuning"],
                                         "trains tensors below them"),
                                        (["--preset", "tiny-distilbert", "--adapter", "bitfit"],
                                         "trains tensors below them")])
def test_what_cannot_be_split_is_refused(tmp_path, args, says):
    result = run_command("export", *args, "--out", str(tmp_path / "b"), "--adapter-blocks", "top:1")
    assert result.returncode != 0 and says in result.stderr and "Traceback" not in result.stderr


def test_a_causal_lms_manifest_records_the_split_and_export_verified_top_of_prefix(stories_split_bundle):
    bundle = load_bundle(stories_split_bundle)
    m = bundle.manifest
    assert m.program.split == Split(frozen_blocks=3, adapted_blocks=2, hidden_size=64, states_dtype="float16")
    # no head statistics for a causal LM: no features, no top_features
    assert set(m.program.methods) == {"forward", "predict", "prefix", "top"}
    assert m.verification["split_loss_max_abs_diff"] <= 1e-4
    assert m.verification["split_fp16_states_loss_max_abs_diff"] <= 5e-3
    # LoRA on blocks 3 and 4 only (peft's layers_to_transform): q_proj and v_proj, A and B
    blocks = sorted({int(t.name.split(".layers.")[1].split(".")[0]) for t in m.layout.tensors})
    assert blocks == [3, 4] and len(m.layout.tensors) == 8
    # The device's plan counts its shard's prefix states: 5 examples are 3 batches of 2 x 32 x 64 float16
    plan = plan_memory(bundle, budget=2**40, num_examples=5, directions=2, runtime=0)
    assert plan.prefix_states == 3 * 2 * 32 * 64 * 2


def test_a_causal_lms_top_on_the_cached_prefix_states_gives_the_whole_programs_losses(stories_split_bundle,
                                                                                       tmp_path):
    """The device's path: the prefix over the shard once, kept float16 and memory-mapped; the top on it."""
    bundle = load_bundle(stories_split_bundle)
    engine = ProgramEngine.for_bundle(bundle)
    rng = np.random.default_rng(0)
    adapters = (bundle.initial_adapter()[None] + 0.05 * rng.standard_normal((3, bundle.manifest.adapter_dim)))
    adapters = adapters.astype(np.float32)
    batches = real_batches(bundle, TINYSTORIES, 8)
    whole = [engine.losses(b, adapters) for b in batches]
    cache = cache_prefix_states(engine, batches, tmp_path)
    assert cache.passes == 4 and cache.bytes == 4 * 2 * 32 * 64 * 2
    for batch, expected in zip(batches, whole):
        assert batch.prefix_states.shape == (2, 32, 64) and batch.prefix_states.dtype == np.float16
        np.testing.assert_allclose(engine.losses(batch, adapters), expected, atol=5e-3)
        exact = engine.prefix_states(replace(batch, prefix_states=None))
        np.testing.assert_allclose(engine.losses(replace(batch, prefix_states=exact), adapters), expected, atol=1e-5)
