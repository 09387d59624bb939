import numpy as np
import pytest

from fwdfed.bundle.layout import AdapterLayout


def test_flatten_unflatten_round_trip():
    layout = AdapterLayout.from_shapes([("a", (2, 3)), ("b", (4,)), ("c", (1, 1, 2))])
    assert layout.dim == 12
    assert [t.offset for t in layout.tensors] == [0, 6, 10]
    vector = np.arange(12, dtype=np.float32)
    parts = layout.unflatten(vector)
    assert parts["b"].tolist() == [6, 7, 8, 9]
    np.testing.assert_array_equal(layout.flatten(parts), vector)
    assert AdapterLayout.from_json(layout.to_json()) == layout


def test_layout_rejects_wrong_sizes_and_gaps():
    layout = AdapterLayout.from_shapes([("a", (2, 3))])
    with pytest.raises(ValueError, match="shape"):
        layout.unflatten(np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match="missing"):
        layout.flatten({})
    with pytest.raises(ValueError, match="contiguous"):
        AdapterLayout.from_json([{"name": "a", "shape": [2], "offset": 1}])


def test_blocks_are_contiguous_whole_tensors_covering_the_vector():
    layout = AdapterLayout.from_shapes([(f"t{i}", (i % 3 + 1, 4)) for i in range(10)])
    for count in (1, 2, 3, 10):
        blocks = layout.blocks(count)
        assert len(blocks) == count and blocks[0][0] == 0 and blocks[-1][1] == layout.dim
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:])) and all(s < e for s, e in blocks)
        edges = {t.offset for t in layout.tensors} | {layout.dim}
        assert all(s in edges and e in edges for s, e in blocks)
    with pytest.raises(ValueError):
        layout.blocks(11)


def test_a_span_is_the_block_of_the_named_tensors_side_by_side():
    layout = AdapterLayout.from_shapes([("l0.lora_A", (2, 4)), ("l0.lora_B", (4, 2)), ("l1.lora_A", (2, 4)),
                                        ("classifier.weight", (2, 4)), ("classifier.bias", (2,))])
    assert layout.span("classifier") == (24, 34)
    assert layout.span("l0.") == (0, 16)
    with pytest.raises(ValueError, match="not side by side"):
        layout.span("lora_A")
    with pytest.raises(ValueError, match="no adapter tensor's name contains 'head'"):
        layout.span("head")
