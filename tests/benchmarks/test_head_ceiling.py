import re

import numpy as np
import pytest

from benchmarks.head_ceiling import class_stats, exact_head_step, log_softmax, main, score


def test_the_exact_head_step_is_minus_lr_times_the_softmax_regressions_gradient():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 5)), rng.integers(0, 3, 20)
    w, b = rng.standard_normal((3, 5)), rng.standard_normal(3)
    new_w, new_b = exact_head_step(w, b, x, y, lr=1.0)
    h, i, j = 1e-6, 1, 2
    bumped = w.copy()
    bumped[i, j] += h
    numeric = (score(bumped, b, x, y)["loss"] - score(w, b, x, y)["loss"]) / h
    assert abs((w - new_w)[i, j] - numeric) < 1e-4
    bumped_b = b.copy()
    bumped_b[0] += h
    assert abs((b - new_b)[0] - (score(w, bumped_b, x, y)["loss"] - score(w, b, x, y)["loss"]) / h) < 1e-4
    assert np.allclose(np.exp(log_softmax(w, b, x)).sum(axis=1), 1.0)


def test_class_stats_are_the_rounds_payload_layout():
    x, y = np.arange(6.0).reshape(3, 2), np.array([0, 1, 1])
    payload = class_stats(x, y, 2)
    assert payload[:4].tolist() == [0, 1, 6, 8] and payload[4:6].tolist() == [1, 2]
    assert np.array_equal(payload[6:].reshape(2, 2), x.T @ x)


@pytest.mark.parametrize("argv, message", [
    (["--head-steps", "0"], "--head-steps must be at least 1"),
    (["--head-lr", "nan"], "every --head-lr positive"),
    (["--shrinkage", "2"], "--shrinkage must be in [0, 1]"),
])
def test_bad_options_get_one_line(tmp_path, argv, message):
    from fwdfed.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        main(["--bundle", str(tmp_path), "--data", str(tmp_path / "d.csv"), *argv])
