"""The streamed export (`python -m export --stream`) and engine, on the tiny-llama preset.

One export at module scope: 2 decoder blocks, so 4 stage programs (each stage is a lowering of its own: two
blocks show a block released before the next is loaded as well as more would)."""

import re

import numpy as np
import pytest
import torch

from tests.conftest import TINYSTORIES, away_from_init

pytestmark = pytest.mark.slow
BLOCKS = 2  # tiny-llama's decoder blocks


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    from export.run import run_export
    from export.spec import ExportSpec

    out = tmp_path_factory.mktemp("stream") / "tiny-llama"
    run_export(ExportSpec(source="preset:tiny-llama", out=out, batch_size=2, seq_len=32, max_perturbations=4,
                          stream=True), log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def loaded(streamed):
    from fwdfed.bundle.manifest import load_bundle
    from runtime.data import encode, read_examples
    from runtime.engine import ProgramEngine
    from runtime.evaluate import load_tokenizer

    bundle = load_bundle(streamed)
    m = bundle.manifest
    batches = encode(load_tokenizer(bundle), read_examples(TINYSTORIES)[:4], m.task, m.inputs.batch_size,
                     m.inputs.seq_len)
    return bundle, ProgramEngine.for_bundle(bundle), batches


def test_streamed_losses_equal_the_unstreamed_peft_model(loaded):
    from fwdfed.model.peft_adapter import peft_model_with
    from fwdfed.model.program import peft_reference_loss
    from runtime.stream import StreamedEngine

    bundle, engine, batches = loaded
    assert isinstance(engine, StreamedEngine)
    m = bundle.manifest
    assert m.verification["peft_loss_max_abs_diff"] <= 1e-4  # the exporter's own check
    # Six adapter vectors: more than the program's P = 4, so the engine makes two calls per block.
    adapters = np.stack([away_from_init(bundle, seed) for seed in range(6)])
    streamed = engine.losses(batches[0], adapters)
    peft_model = peft_model_with(bundle, bundle.initial_adapter())
    batch = {"input_ids": batches[0].input_ids, "attention_mask": batches[0].attention_mask,
             "labels": batches[0].labels}
    reference = np.stack([peft_reference_loss(peft_model, m.layout, torch.from_numpy(a), batch, m.task).numpy()
                          for a in adapters])
    assert streamed.shape == (6, m.inputs.batch_size)
    np.testing.assert_allclose(streamed, reference, atol=2e-5)
    assert np.ptp(streamed[:, 0]) > 1e-3  # the adapters do change the loss: the slices reach the blocks


def test_each_block_is_released_before_the_next_is_loaded(loaded, streamed):
    bundle, engine, batches = loaded
    engine.trace.clear()
    engine.losses(batches[1], np.stack([away_from_init(bundle, s) for s in range(2)]))
    assert engine.max_live_programs == 1
    names = [r.name for r in engine.trace]
    assert names == ["embed", *(f"block.{k}" for k in range(BLOCKS)), "head"]
    # No stage file is still mapped into the process once the call is over.
    maps = open("/proc/self/maps").read()
    assert not re.search(re.escape(str(streamed / "stages")), maps)


def test_the_streamed_manifest_lists_stages_that_tile_the_adapter(streamed, loaded):
    from export.passes import attach_adapter
    from export.spec import AdapterSpec
    from fwdfed.bundle.manifest import BundleError, load_bundle
    from fwdfed.model.base_model import load_model

    bundle = loaded[0]
    m = bundle.manifest
    stages = m.program.stages
    assert m.streamed and [s.name for s in stages] == ["embed", *(f"block.{k}" for k in range(BLOCKS)), "head"]
    slices = [s.adapter for s in stages[1:-1]]
    assert slices[0][0] == 0 and slices[-1][1] == m.adapter_dim
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
    assert stages[0].adapter == stages[-1].adapter == (0, 0)
    # The layout and the initial adapter are those of the whole peft model (the unstreamed export's).
    model, _ = load_model(bundle.base_model_path, m.task, 2)
    _, layout, initial = attach_adapter(model, m.task, AdapterSpec())
    assert layout == m.layout
    np.testing.assert_array_equal(initial, bundle.initial_adapter())
    for s, (start, stop) in zip(stages[1:-1], slices):
        names = {t.name for t in m.layout.tensors if start <= t.offset < stop}
        assert names and all(f".layers.{s.name.split('.')[1]}." in n for n in names)
    assert m.program.bytes == sum(s.bytes for s in stages)
    assert m.program.largest_stage_bytes == max(s.bytes for s in stages)
    # A damaged stage file is refused when the bundle is read.
    victim = streamed / "stages" / "block.1.pte"
    original = victim.read_bytes()
    try:
        victim.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(BundleError, match="block.1.pte does not match"):
            load_bundle(streamed)
    finally:
        victim.write_bytes(original)


def test_the_memory_plan_counts_one_stage_at_a_time(loaded):
    from fwdfed.memory_plan import plan_memory

    bundle = loaded[0]
    p = bundle.manifest.program
    plan = plan_memory(bundle, 2**40, num_examples=0, directions=2, runtime=100)
    assert plan.weights == p.largest_stage_bytes < p.bytes
    b, length, h = 2, 32, 64
    assert p.hidden_bytes == 4 * 4 * b * length * h
    assert plan.activations == max(s.planned_memory_bytes for s in p.stages) + 2 * p.hidden_bytes
    assert plan.total == 100 + plan.weights + plan.activations + plan.workspace + plan.adapters + plan.data


def test_a_budget_the_streamed_plan_cannot_meet_is_refused_before_loading(streamed, monkeypatch):
    from device_sdk.client import Device, DeviceConfig
    from fwdfed.memory_plan import BudgetError
    from runtime.stream import StreamedEngine

    def must_not_load(*args, **kwargs):
        raise AssertionError("the program was loaded before the budget was checked")

    monkeypatch.setattr(StreamedEngine, "for_bundle", must_not_load)
    config = DeviceConfig(device_id="d", coordinator="ws://127.0.0.1:1", bundle=str(streamed), data=str(TINYSTORIES),
                          shard_index=0, shard_count=1, mem_budget_bytes=50 * 2**20)
    with pytest.raises(BudgetError, match="over. Would fit"):
        Device(config)


@pytest.mark.parametrize("method", ["mezo", "fwdgrad"])
def test_forward_only_methods_step_through_the_streamed_engine(loaded, method):
    """A step through the streamed programs makes the same (seed, coefficient) pairs as one through
    eager PyTorch (the reference engine) from the same random state."""
    from fwdfed import methods
    from runtime.eager import EagerEngine

    bundle, engine, batches = loaded
    m = methods.get(method)
    config = m.config.from_hparams({"lr": 1e-3, "eps": 1e-2, "directions": 2, "local_steps": 1})
    start = away_from_init(bundle, 7)
    runs = [m.make_optimizer(e, start, config, np.random.default_rng(3)).train(batches[:2], 2)
            for e in (engine, EagerEngine(bundle))]
    assert runs[0].pairs and [s for s, _ in runs[0].pairs] == [s for s, _ in runs[1].pairs]
    np.testing.assert_allclose([c for _, c in runs[0].pairs], [c for _, c in runs[1].pairs], rtol=2e-2, atol=2e-7)


def test_the_7b_preset_is_never_built_whole(tmp_path):
    from fwdfed.model.base_model import ModelLoadError, preset_config, write_preset

    with pytest.raises(ModelLoadError, match="--stream"):
        write_preset("llama-7b", tmp_path / "m", 2)
    config = preset_config("llama-7b")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size,
            config.vocab_size) == (32, 4096, 32, 11008, 32000)
