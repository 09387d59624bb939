"""FedKD's mixed loss against torch's, its hyperparameter checks, and its MeZO steps on that loss."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fwdfed import methods
from fwdfed.batch import Batch
from fwdfed.methods.fedkd import FedKD, FedKDConfig, distillation_loss

TEACHER = "ab" * 32


def torch_reference(student, labels, teacher, weight, temperature):
    """(1 - a) CE + a T^2 KL(teacher_T || student_T) per example, with torch's own losses."""
    s, t, y = torch.from_numpy(student), torch.from_numpy(teacher), torch.from_numpy(labels)
    rows = []
    for p in range(s.shape[0]):
        ce = F.cross_entropy(s[p], y, reduction="none")
        kl = F.kl_div(F.log_softmax(s[p] / temperature, -1), F.log_softmax(t / temperature, -1), reduction="none",
                      log_target=True).sum(-1)
        rows.append((1 - weight) * ce + weight * temperature**2 * kl)
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("weight,temperature", [(0.0, 1.0), (0.5, 2.0), (1.0, 4.0), (0.3, 0.5)])
def test_the_mixed_loss_is_torchs_cross_entropy_and_kl_divergence(weight, temperature):
    g = np.random.default_rng(0)
    student = 3 * g.standard_normal((3, 5, 4))  # P = 3 adapter vectors, B = 5 examples, C = 4 classes
    teacher, labels = 3 * g.standard_normal((5, 4)), g.integers(0, 4, 5)
    ours = distillation_loss(student, labels, teacher, weight, temperature)
    assert ours.shape == (3, 5)
    np.testing.assert_allclose(ours, torch_reference(student, labels, teacher, weight, temperature), rtol=1e-10,
                               atol=1e-12)


def test_an_unlabelled_example_is_learnt_from_the_teacher_alone():
    from fwdfed.bundle.tasks import IGNORE_INDEX

    g = np.random.default_rng(1)
    student, teacher = 3 * g.standard_normal((2, 3, 4)), 3 * g.standard_normal((3, 4))
    labels = np.array([2, IGNORE_INDEX, 0])
    ours = distillation_loss(student, labels, teacher, 0.4, 2.0)
    mixed = torch_reference(student, np.array([2, 0, 0]), teacher, 0.4, 2.0)
    kl_alone = torch_reference(student, np.array([2, 0, 0]), teacher, 1.0, 2.0)
    np.testing.assert_allclose(ours[:, [0, 2]], mixed[:, [0, 2]], rtol=1e-10)
    np.testing.assert_allclose(ours[:, 1], kl_alone[:, 1], rtol=1e-10)


def test_the_kl_part_vanishes_when_the_student_is_the_teacher():
    logits = np.array([[2.0, -1.0], [0.3, 0.1]])
    ce = distillation_loss(logits[None], np.array([0, 1]), logits, 0.0, 2.0)
    mixed = distillation_loss(logits[None], np.array([0, 1]), logits, 0.5, 2.0)
    np.testing.assert_allclose(mixed, 0.5 * ce, atol=1e-12)


@pytest.mark.parametrize("change,message", [
    ({"kd_weight": 1.5}, "kd_weight must be in \\[0, 1\\]"), ({"kd_weight": -0.1}, "kd_weight must be in"),
    ({"kd_weight": float("nan")}, "kd_weight must be in"), ({"kd_temperature": 0.0}, "kd_temperature must be in"),
    ({"kd_temperature": -2.0}, "kd_temperature must be in"), ({"kd_temperature": 1e6}, "kd_temperature must be in"),
    ({"kd_temperature": "hot"}, "kd_temperature must be a number"),
    ({"teacher_sha256": "abc"}, "teacher_sha256 must be a program's sha256"),
])
def test_bad_weight_temperature_or_teacher_hash_is_refused(change, message):
    good = {"lr": 1e-3, "eps": 1e-2, "local_steps": 2, "teacher_sha256": TEACHER}
    FedKDConfig.from_hparams(good)
    with pytest.raises(ValueError, match=message):
        FedKDConfig.from_hparams(good | change)


def test_a_task_without_a_teacher_is_refused():
    with pytest.raises(ValueError, match="teacher_sha256 is missing"):
        FedKDConfig.from_hparams({"lr": 1e-3, "eps": 1e-2, "local_steps": 2})


def test_it_is_a_registered_method_that_needs_a_teacher():
    method = methods.get("fedkd")
    assert method.needs_teacher and method.selectable
    assert {h.name for h in method.hparams} == {"kd_weight", "kd_temperature"}


class LinearClassifier:
    """An engine whose logits are x @ W for an adapter W [H, C]: distillation's ground truth, in closed form."""

    def __init__(self, features, classes):
        self.features, self.classes = features, classes

    def batched_logits(self, batch, adapters):
        w = np.atleast_2d(adapters).reshape(-1, self.features.shape[1], self.classes)
        return np.einsum("bh,phc->pbc", self.features, w)


def test_mezo_steps_on_the_mixed_loss_move_the_student_towards_the_teacher_and_replay_exactly():
    g = np.random.default_rng(1)
    h, c, b = 6, 3, 32
    x = g.standard_normal((b, h))
    teacher_w = g.standard_normal((h, c))
    teacher = x @ teacher_w
    batch = Batch(None, None, torch.from_numpy(teacher.argmax(-1)), np.ones(b, np.float32),
                  teacher_logits=teacher.astype(np.float32))
    engine, start = LinearClassifier(x, c), np.zeros(h * c, np.float32)
    config = FedKDConfig(teacher_sha256=TEACHER, lr=0.05, eps=1e-3, directions=4, kd_weight=0.8, kd_temperature=2.0)
    optimizer = FedKD(engine, start, config, np.random.default_rng(0))
    run = optimizer.train([batch], steps=150)

    def loss(w):
        return distillation_loss(engine.batched_logits(batch, w), batch.labels.numpy(), teacher, 0.8, 2.0).mean()

    assert loss(optimizer.adapter) < 0.5 * loss(start)
    agreement = (engine.batched_logits(batch, optimizer.adapter)[0].argmax(-1) == teacher.argmax(-1)).mean()
    assert agreement > 0.8
    assert len(run.pairs) == 600  # MeZO's upload: one pair per direction per step
    np.testing.assert_allclose(run.update.apply(start, "rademacher"), optimizer.adapter, atol=1e-4)


def test_a_batch_without_teacher_logits_is_refused():
    x = np.ones((2, 3))
    batch = Batch(None, None, torch.zeros(2, dtype=torch.long), np.ones(2, np.float32))
    optimizer = FedKD(LinearClassifier(x, 2), np.zeros(6, np.float32), FedKDConfig(teacher_sha256=TEACHER),
                      np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs the teacher's logits"):
        optimizer.train([batch], steps=1)
