"""quantize_base on a small peft model (no export): what it quantizes, what it keeps fp32, what it refuses."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from fwdfed.model.quantize import QuantizationError, check_adapter_fp32, check_options, quantize_base

LORA_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"


def peft_llama(intermediate: int = 128, tie: bool = False):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()


def quantized_type(model, path: str) -> type:
    return type(model.get_submodule(path).weight.data)


def test_base_linears_are_quantized_and_the_adapter_stays_fp32():
    model = peft_llama(intermediate=96, tie=True)
    ids = torch.randint(0, 96, (2, 12))
    before = model(input_ids=ids).logits
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    report = quantize_base(model, "8da4w", 32)
    # q/k/v/o, gate/up and the head; down_proj reads 96 features, which groups of 32 divide too.
    assert len(report.quantized) == 8 and not report.left_fp32
    assert not any("lora_" in path for path in report.quantized)
    assert quantized_type(model, "base_model.model.lm_head") is not torch.Tensor
    check_adapter_fp32(model, adapter)
    for name, p in model.named_parameters():
        if name in adapter:
            assert torch.equal(p, adapter[name]) and type(p.data) is torch.Tensor
    # The tied embedding table keeps its fp32 values; the head has its own quantized copy.
    assert type(model.get_submodule("base_model.model.model.embed_tokens").weight.data) is torch.Tensor
    after = model(input_ids=ids).logits
    assert 0 < (after - before).abs().max() < 0.1 * before.abs().max()
    assert report.weight_bytes_after < report.weight_bytes_before / 4


def test_a_layer_the_group_size_does_not_divide_stays_fp32_and_is_named():
    model = peft_llama(intermediate=172)  # stories260K's MLP width: down_proj reads 172 features
    report = quantize_base(model, "8da4w", 32)
    down = "base_model.model.model.layers.0.mlp.down_proj"
    assert down in report.left_fp32 and "172" in report.left_fp32[down] and down not in report.quantized
    assert quantized_type(model, down) is torch.Tensor
    assert report.to_manifest().left_fp32 == report.left_fp32


def test_8da8w_quantizes_every_width():
    report = quantize_base(peft_llama(intermediate=172), "8da8w")
    assert report.group_size is None and not report.left_fp32 and len(report.quantized) == 8


@pytest.mark.parametrize("scheme, group, message", [
    ("int4-weight-only", None, "unknown quantization scheme"),
    ("8da4w", 48, "multiple of 32"),
    ("8da4w", 0, "multiple of 32"),
    ("8da8w", 32, "8da4w only"),
])
def test_bad_options_are_refused(scheme, group, message):
    with pytest.raises(QuantizationError, match=message):
        check_options(scheme, group)


def test_a_group_size_that_divides_nothing_is_refused():
    model = peft_llama()
    with pytest.raises(QuantizationError, match="nothing to quantize.*does not divide"):
        quantize_base(model, "8da4w", 256)
    assert all(type(p.data) is torch.Tensor for p in model.parameters())  # untouched


def test_a_recorded_list_naming_an_adapter_module_is_refused():
    model = peft_llama()
    with pytest.raises(QuantizationError, match="not a frozen fp32 nn.Linear"):
        quantize_base(model, "8da4w", 32, only=[LORA_A])
    with pytest.raises(QuantizationError, match="no such module"):
        quantize_base(model, "8da4w", 32, only=["base_model.model.model.layers.9.mlp.up_proj"])


def test_an_adapter_tensor_that_was_quantized_is_caught():
    model = peft_llama()
    # A trained layer made to look frozen, as a hand-made filter could: the check after quantizing refuses it.
    head = model.get_submodule("base_model.model.lm_head")
    quantize_base(model, "8da4w", 32, only=["base_model.model.lm_head"])
    assert type(head.weight.data) is not torch.Tensor
    with pytest.raises(QuantizationError, match="cannot be kept out"):
        check_adapter_fp32(model, ["base_model.model.lm_head.weight"])
