"""The causal-LM loss over chunks: the lowered program matches eager peft, and its planned
arena does not grow with P by the vocabulary."""

import pytest
import torch

from export.loss_chunks import order_depth_first
from export.passes import attach_adapter, example_inputs, lower, verify
from export.spec import AdapterSpec, ExportSpec
from fwdfed.bundle.tasks import CAUSAL_LM
from fwdfed.model.program import build_programs

# A vocabulary wide against the hidden size, as a real LLaMA's (32,000 x 768) is. One decoder block: the
# claims are the loss's chunks after the last block, and each block adds to every lowering's time.
VOCAB, HIDDEN, BATCH, LENGTH = 8192, 32, 2, 16


def lowered(targets: list[str] | None, max_perturbations: int) -> tuple[dict, dict]:
    """(planned bytes per method, verification against eager peft) of a tiny wide-vocabulary LLaMA."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=True,
                         pad_token_id=0)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    peft_model, layout, initial = attach_adapter(model, CAUSAL_LM, AdapterSpec(target_modules=targets))
    loss_program, predict_program, _ = build_programs(peft_model, layout, CAUSAL_LM)
    spec = ExportSpec(source="test", out=None, batch_size=BATCH, seq_len=LENGTH, max_perturbations=max_perturbations)
    batch = example_inputs(spec, CAUSAL_LM, VOCAB, pad_id=0)
    pte, planned = lower(loss_program, predict_program, batch, layout.dim, max_perturbations)
    return planned, verify(pte, peft_model, layout, initial, batch, CAUSAL_LM, max_perturbations, tolerance=1e-4)


@pytest.mark.slow
def test_the_planned_arena_grows_with_p_by_far_less_than_the_logits():
    at_one, verified_one = lowered(None, 1)
    at_four, verified_four = lowered(None, 4)
    logits_per_copy = BATCH * (LENGTH - 1) * VOCAB * 4
    # At P = 1: the logits of one batch and their log-softmax, little else (the decoder is tiny).
    assert at_one["forward"] < 2.2 * logits_per_copy
    # Whole logits would add 3 more copies of both; the chunks add a few of the decoder's outputs.
    assert at_four["forward"] - at_one["forward"] < 0.1 * 3 * logits_per_copy
    assert verified_one["loss_max_abs_diff"] < 1e-4 and verified_four["loss_max_abs_diff"] < 1e-4


@pytest.mark.slow
def test_a_lora_on_the_lm_head_is_chunked_with_it():
    planned, verified = lowered(["q_proj", "v_proj", "lm_head"], 4)
    assert verified["loss_max_abs_diff"] < 1e-4
    # A chunk holds a few more vocabulary-wide buffers (the LoRA's B slice, its delta, the sum), not P times more.
    whole_logits = 2 * 4 * BATCH * (LENGTH - 1) * VOCAB * 4
    assert planned["forward"] < 0.5 * whole_logits


def test_the_graph_runs_one_chain_after_another():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    heads = [graph.call_function(torch.neg, (x,)) for _ in range(3)]  # breadth-first, as lowering leaves it
    picks = [graph.call_function(torch.exp, (h,)) for h in heads]
    graph.output(graph.call_function(torch.cat, (picks,)))
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    order_depth_first(module)
    order = [n for n in module.graph.nodes if n.op == "call_function"]
    assert order[:-1] == [heads[0], picks[0], heads[1], picks[1], heads[2], picks[2]]
    assert torch.equal(module(torch.ones(2)), torch.exp(-torch.ones(6)))
