"""benchmarks.compare: the arms' training flags."""

from pathlib import Path

from benchmarks.compare import Task, arm_flags


def flag(flags: list[str], name: str) -> str:
    return flags[flags.index(name) + 1]


def test_an_arm_takes_the_tasks_lr_scale_unless_the_lr_and_local_steps_are_given():
    lm = Task(model=Path("m"), export_flags=[], data=Path("d"), test=None, lr_scale=10.0)
    own = arm_flags(lm, "fzoo")
    assert (flag(own, "--lr"), flag(own, "--local-steps"), flag(own, "--directions")) == ("0.01", "20", "8")
    chosen = arm_flags(lm, "fzoo", lr=3e-2, local_steps=150)
    assert (flag(chosen, "--lr"), flag(chosen, "--local-steps"), flag(chosen, "--directions")) == ("0.03", "150", "8")
    classifier = Task(model=Path("m"), export_flags=[], data=Path("d"), test=None, num_labels=2)
    assert flag(arm_flags(classifier, "mezo"), "--lr") == "1e-4"  # the arm's own, as written
