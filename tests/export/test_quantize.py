"""export --quantize: the .pte checked against the eager quantized model, the adapter an fp32 input, the
manifest's record rebuilding the same eager model, and bad options refused."""

import numpy as np
import pytest
import torch

from fwdfed.bundle.manifest import load_bundle
from fwdfed.model.quantize import QUANTIZED_TOLERANCE
from tests.conftest import export_bundle, program_and_batches, run_command


@pytest.fixture(scope="module")
def quantized_bundle(tmp_path_factory):
    return export_bundle(tmp_path_factory.mktemp("bundles") / "tiny-llama-8da4w", "--preset", "tiny-llama",
                         "--batch-size", "2", "--seq-len", "16", "--max-perturbations", "2", "--quantize", "8da4w")


@pytest.mark.slow
def test_the_manifest_records_the_quantization_and_its_verification(quantized_bundle):
    m = load_bundle(quantized_bundle).manifest
    q = m.quantization
    assert q.scheme == "8da4w" and q.group_size == 32 and not q.left_fp32
    # Every frozen linear of tiny-llama (hidden 64, MLP 128: groups of 32 divide all), the head too; no adapter.
    assert len(q.modules) == 2 * 7 + 1 and "base_model.model.lm_head" in q.modules
    assert not any("lora_" in path for path in q.modules)
    v = m.verification
    assert v["reference"] == "eager quantized peft model" and v["tolerance"] == QUANTIZED_TOLERANCE
    assert v["loss_max_abs_diff"] <= v["tolerance"]
    # The quantization itself changed the losses (it was not a no-op), and the report says by how much.
    assert v["quantized_vs_fp32_loss_max_abs_diff"] > 0 and v["fp32_mean_loss"] != v["quantized_mean_loss"]


@pytest.mark.slow
def test_the_adapter_is_an_fp32_input_and_the_rebuilt_eager_model_is_the_quantized_one(quantized_bundle):
    from fwdfed.model.peft_adapter import peft_model_with
    from fwdfed.model.program import build_programs
    from runtime.eager import EagerEngine
    from runtime.engine import ProgramEngine

    bundle, _, batches = program_and_batches(quantized_bundle, 2)
    engine = ProgramEngine.for_bundle(bundle)  # checks forward's adapters input is float32 [P, d]
    d = bundle.manifest.adapter_dim
    adapters = (bundle.initial_adapter() + 0.05 * np.random.default_rng(1).standard_normal((2, d))).astype(np.float32)
    pte = engine.losses(batches[0], adapters)
    assert abs(pte[0] - pte[1]).max() > 1e-3  # the adapter is read as an input, not baked in
    eager_quantized = EagerEngine(bundle).losses(batches[0], adapters)
    fp32_model = peft_model_with(bundle, bundle.initial_adapter(), quantized=False)
    fp32_program, _, _ = build_programs(fp32_model, bundle.manifest.layout, bundle.manifest.task)
    with torch.no_grad():
        b = batches[0]
        fp32 = fp32_program(b.input_ids, b.attention_mask, b.labels, torch.from_numpy(adapters)).numpy()
    tolerance = bundle.manifest.verification["tolerance"]
    assert np.abs(pte - eager_quantized).max() <= tolerance
    # Real text, not the export's random tokens: the rebuild is nearer the .pte than the fp32 model is.
    assert np.abs(pte - eager_quantized).max() < np.abs(pte - fp32).max()


@pytest.mark.slow
def test_the_peft_adapter_is_fp32_and_loads_on_the_fp32_base(quantized_bundle, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fwdfed.model.peft_adapter import save_peft_adapter

    bundle = load_bundle(quantized_bundle)
    vector = (bundle.initial_adapter() + 0.1).astype(np.float32)
    folder = save_peft_adapter(bundle, vector, tmp_path / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bundle.base_model_path), folder)
    params = dict(model.named_parameters())
    for t in bundle.manifest.layout.tensors:
        p = params[t.name]
        assert p.dtype == torch.float32 and type(p.data) is torch.Tensor
        np.testing.assert_array_equal(p.detach().numpy().ravel(), vector[t.offset:t.end])


@pytest.mark.parametrize("flags, message", [
    (["--quantize", "int4wo"], "invalid choice: 'int4wo'"),
    (["--quantize", "8da4w", "--group-size", "48"], "multiple of 32"),
])
def test_bad_quantization_options_are_refused_in_one_line(tmp_path, flags, message):
    result = run_command("export", "--preset", "tiny-llama", "--out", str(tmp_path / "b"), *flags)
    assert result.returncode == 2 and "Traceback" not in result.stderr and message in result.stderr
    assert not (tmp_path / "b").exists()
