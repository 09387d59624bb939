import numpy as np
import pytest

from export.layout import AdapterLayout


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
