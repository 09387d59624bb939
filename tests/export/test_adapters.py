"""Adapters beyond plain LoRA: BitFit, LoRA with biases, and clear refusals for the rest (prompt
learning: test_prompt_learning.py)."""

import numpy as np
import pytest

from fwdfed.bundle.manifest import load_bundle
from fwdfed.model.peft_adapter import save_peft_adapter
from tests.conftest import export_bundle, run_command
from tests.support.checks import assert_peft_folder_matches_program


@pytest.fixture(params=["bitfit", "lora"])
def bias_bundle(request, tmp_path):
    """(bundle, adapter kind): BitFit's own export, and LoRA with its biases (peft's bias="all"), which is
    the shared classifier bundle (tests/conftest.py's distilbert_bundle)."""
    if request.param == "lora":
        return request.getfixturevalue("distilbert_bundle"), "lora"
    return export_bundle(tmp_path / "bundle", "--preset", "tiny-distilbert", "--seq-len", "32", "--adapter",
                         "bitfit"), "bitfit"


def test_bias_adapters_export_verify_and_write_back(tmp_path, bias_bundle):
    out, kind = bias_bundle
    bundle = load_bundle(out)
    names = [t.name for t in bundle.manifest.layout.tensors]
    assert bundle.manifest.adapter.kind == kind and bundle.manifest.verification["loss_max_abs_diff"] < 1e-4
    assert any(n.endswith("sa_layer_norm.bias") for n in names)  # LayerNorm biases are trained too
    if kind == "bitfit":
        assert all(n.endswith(".bias") or "classifier" in n for n in names)
    vector = (bundle.initial_adapter() + 0.1 * np.random.default_rng(0).standard_normal(bundle.manifest.adapter_dim)
              ).astype(np.float32)
    assert_peft_folder_matches_program(out, save_peft_adapter(bundle, vector, tmp_path / "adapter"), vector)


@pytest.mark.parametrize("adapter, reason", [("ia3", "batched path"), ("dora", "unknown adapter")])
def test_unsupported_adapters_are_refused_with_the_reason(tmp_path, adapter, reason):
    result = run_command("export", "--preset", "tiny-llama", "--adapter", adapter, "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert reason in result.stderr
    assert "supported: lora, bitfit, prompt-tuning, p-tuning, prefix-tuning" in result.stderr
    assert not (tmp_path / "b").exists()


def test_bitfit_on_a_model_without_biases_is_refused(tmp_path):
    result = run_command("export", "--preset", "tiny-llama", "--adapter", "bitfit", "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and "has no biases to tune" in result.stderr
