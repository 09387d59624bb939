"""The method registry: every method module found by name, and what each declares is what it does."""

import numpy as np
import pytest

from fwdfed import methods
from fwdfed.batch import Batch
from fwdfed.methods.onesided import OneSided, OneSidedConfig


def test_every_method_module_is_found_and_mezo_comes_first():
    assert methods.names()[0] == "mezo"
    assert {"mezo", "fwdgrad", "backprop", "onesided"} <= set(methods.names())
    with pytest.raises(ValueError, match="unknown method 'sgd'; known methods: mezo"):
        methods.get("sgd")


@pytest.mark.parametrize("name", methods.names(selectable_only=True))
def test_each_method_checks_its_task_hyperparameters(name):
    method = methods.get(name)
    good = {"lr": 1e-3, "eps": 1e-2, "local_steps": 2, "directions": method.default_directions,
            "kind": method.default_kind} | {h.name: h.default for h in method.hparams}
    if method.needs_teacher:  # the job names its teacher's program (coordinator serve --teacher-bundle)
        good["teacher_sha256"] = "0" * 64
    if method.layout_hparams:  # what the coordinator computes from the layout (hybrid: where the head lies)
        good |= {"num_classes": 2, "feature_dim": 4, "head_start": 10, "block_start": 0, "block_end": 10}
    method.config.from_hparams(good)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        method.config.from_hparams(good | {"lr": -1.0})
    assert method.adapter_copies(4) >= 1
    low, high = method.scale_range(good)
    assert 0 <= low <= high <= 1


class Quadratic:
    """An engine whose loss is 0.5 ||w - target||^2 for every example: the estimators' ground truth."""

    def __init__(self, target):
        self.target = target

    def losses(self, batch, adapters):
        adapters = np.atleast_2d(adapters).astype(np.float64)
        loss = 0.5 * ((adapters - self.target) ** 2).sum(axis=1)
        return np.repeat(loss[:, None], len(batch.weights), axis=1)


def test_onesided_steps_downhill_and_its_pairs_replay_its_adapter():
    d = 50
    engine, batch = Quadratic(np.ones(d)), Batch(None, None, None, np.ones(2, np.float32))
    start = np.zeros(d, np.float32)
    optimizer = OneSided(engine, start, OneSidedConfig(lr=0.01, eps=1e-3, directions=4), np.random.default_rng(0))
    run = optimizer.train([batch], steps=200)
    before, after = engine.losses(batch, start)[0, 0], engine.losses(batch, optimizer.adapter)[0, 0]
    assert after < 0.5 * before
    assert len(run.pairs) == 800
    np.testing.assert_allclose(run.update.apply(start, "rademacher"), optimizer.adapter, atol=1e-4)


def test_the_worked_example_in_docs_methods_md_is_the_module_as_it_is():
    """docs/methods.md shows onesided.py whole, as the diff that adds it: that diff must apply and give the file."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    doc = (root / "docs" / "methods.md").read_text()
    header = "+++ b/fwdfed/methods/onesided.py\n"
    hunk = doc[doc.index(header) + len(header):]
    first, body = hunk.split("\n", 1)
    added = [line[1:] for line in body[: body.index("```")].splitlines()]
    module = (root / "fwdfed" / "methods" / "onesided.py").read_text().splitlines()
    assert added == module
    assert first == f"@@ -0,0 +1,{len(module)} @@"
