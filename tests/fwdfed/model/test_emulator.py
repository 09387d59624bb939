"""Which blocks the drop-layer emulator keeps, how its adapter names map to the full model's, and
the options it refuses (no export here: tests/export/test_emulator.py exports a pair)."""

import pytest

from fwdfed.bundle.layout import AdapterLayout
from fwdfed.model.emulator import DropLayers, EmulatorError, EmulatorRecord, full_layout, num_layers_of


@pytest.mark.parametrize("layers, plan, kept", [
    (5, DropLayers(1, 1, 0.5), [0, 2, 4]),  # 3 middle blocks, 2 dropped (1.5 rounded up), the middle one kept
    (5, DropLayers(1, 1, 0.0), [0, 1, 2, 3, 4]),
    (5, DropLayers(1, 1, 0.9), [0, 4]),
    (12, DropLayers(2, 2, 0.5), [0, 1, 2, 4, 7, 9, 10, 11]),  # 8 middle, 4 kept evenly, both ends included
    (12, DropLayers(0, 1, 0.25), [0, 1, 3, 4, 6, 7, 9, 10, 11]),  # 11 middle, 3 dropped
])
def test_kept_blocks_are_the_ends_and_an_even_spread_of_the_middle(layers, plan, kept):
    assert plan.kept_layers(layers) == kept
    adapter = plan.adapter_layers(layers)
    assert set(adapter) <= set(kept) and len(adapter) == plan.keep_first + plan.keep_last


@pytest.mark.parametrize("args, message", [
    ((1, 1, 1.0), "--drop-fraction must be in [0, 1)"),
    ((1, 1, -0.1), "--drop-fraction must be in [0, 1)"),
    ((0, 0, 0.5), "one of them at least 1"),
    ((-1, 2, 0.5), "at least 0"),
])
def test_bad_options_are_refused(args, message):
    with pytest.raises(EmulatorError, match=message.replace("[", r"\[").replace(")", r"\)")):
        DropLayers(*args)


def test_keep_counts_must_leave_middle_blocks():
    with pytest.raises(EmulatorError, match="leave none of the model's 5 blocks"):
        DropLayers(3, 2, 0.5).kept_layers(5)
    assert num_layers_of({"n_layers": 6}) == 6
    with pytest.raises(EmulatorError):
        num_layers_of({})


def test_layout_names_map_back_to_the_full_models_blocks():
    name = "base_model.model.model.layers.{}.self_attn.q_proj.lora_A.default.weight"
    record = EmulatorRecord("drop-layers", 1, 1, 0.5, "model.layers", 5, [0, 2, 4], [1, 3], [0, 4], {})
    layout = AdapterLayout.from_shapes([(name.format(0), (8, 64)), (name.format(2), (8, 64)),
                                        ("base_model.model.lm_head.lora_A.default.weight", (8, 64))])
    mapped = full_layout(record, layout)
    assert [t.name for t in mapped.tensors] == [name.format(0), name.format(4), layout.tensors[2].name]
    assert [(t.shape, t.offset) for t in mapped.tensors] == [(t.shape, t.offset) for t in layout.tensors]
