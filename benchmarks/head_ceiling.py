"""python -m benchmarks.head_ceiling --bundle B --data D: how far a better head alone can go.

ElasticZO's lever trains the last layer with its exact gradient (closed form from the forward
pass's features: no backward pass) and the layers below zeroth-order. Whether the first half can
pay is a question about the features alone: with the encoder frozen at the bundle's initial
adapter, this fits on the training rows' features

- the class-statistics round's LDA head (fwdfed.methods.class_stats, the job's round 1);
- softmax regression by exact-gradient descent from that head, as a device would run it
  (full batch, `--head-steps` steps at each `--head-lr`);

and scores each on the held-out rows (every 10th, as the coordinator splits them). When no head
beats LDA by more than the held-out slice's noise, the head is not where forward-only rounds can
gain: only changing the features can.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fwdfed.cli import quiet_libraries, run_main
from fwdfed.errors import UserError
from fwdfed.methods.class_stats import DEFAULT_SHRINKAGE


def features_of(bundle, engine, examples) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, H], labels [N]) at the bundle's initial adapter; through the top when the bundle is split."""
    from dataclasses import replace

    from runtime.data import encode
    from runtime.evaluate import load_tokenizer

    m, adapter = bundle.manifest, bundle.initial_adapter()
    feats, labels = [], []
    for batch in encode(load_tokenizer(bundle), examples, m.task, m.inputs.batch_size, m.inputs.seq_len):
        if engine.has_split:
            batch = replace(batch, prefix_states=engine.prefix_states(batch).astype(np.float16))
        real = batch.weights > 0
        feats.append(engine.features(batch, adapter)[real].astype(np.float64))
        labels.append(np.asarray(batch.labels)[real])
    return np.concatenate(feats), np.concatenate(labels)


def class_stats(x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """The class-statistics round's payload for these rows (one device holding them all)."""
    q = np.eye(num_classes)[y]
    return np.concatenate([(q.T @ x).ravel(), q.sum(axis=0), (x.T @ x).ravel()])


def log_softmax(w: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    z = x @ w.T + b
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def score(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict:
    lp = log_softmax(w, b, x)
    return {"loss": float(-lp[np.arange(len(y)), y].mean()), "accuracy": float((lp.argmax(axis=1) == y).mean())}


def exact_head_step(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, lr: float):
    """One step of softmax regression's exact gradient: (p - onehot)^T x / N for W, mean(p - onehot) for b."""
    residual = np.exp(log_softmax(w, b, x))
    residual[np.arange(len(y)), y] -= 1.0
    return w - lr * residual.T @ x / len(y), b - lr * residual.mean(axis=0)


def measure(bundle_dir: Path, data: Path, head_lrs: list[float], head_steps: int, shrinkage: float) -> dict:
    from fwdfed.bundle.manifest import load_bundle
    from fwdfed.methods.class_stats import lda_head
    from runtime.data import DataSpec, read_examples, split
    from runtime.engine import ProgramEngine

    bundle = load_bundle(bundle_dir)
    num_classes = bundle.manifest.model.num_labels
    if not num_classes:
        raise UserError(f"{bundle_dir} is not a classifier")
    engine = ProgramEngine.for_bundle(bundle)
    examples = read_examples(data, DataSpec(num_labels=num_classes))
    x, y = features_of(bundle, engine, split(examples, "train"))
    x_held, y_held = features_of(bundle, engine, split(examples, "heldout"))
    w, b, _ = lda_head([class_stats(x, y, num_classes)], num_classes, x.shape[1], shrinkage)
    figures = {"bundle": str(bundle_dir), "data": str(data), "train_rows": len(y), "heldout_rows": len(y_held),
               "lda": {"train": score(w, b, x, y), "heldout": score(w, b, x_held, y_held)}, "exact_gradient": []}
    for lr in head_lrs:
        wk, bk = w.copy(), b.copy()
        for _ in range(head_steps):
            wk, bk = exact_head_step(wk, bk, x, y, lr)
        figures["exact_gradient"].append({"lr": lr, "steps": head_steps, "train": score(wk, bk, x, y),
                                          "heldout": score(wk, bk, x_held, y_held)})
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.head_ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="a classifier bundle with a features method")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--head-lr", type=float, nargs="+", default=[1e-2, 1e-1])
    parser.add_argument("--head-steps", type=int, default=1000)
    parser.add_argument("--shrinkage", type=float, default=DEFAULT_SHRINKAGE, help="the LDA head's (serve --lda-shrinkage)")
    parser.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    args = parser.parse_args(argv)
    quiet_libraries()
    if args.head_steps < 1 or not all(0 < lr < float("inf") for lr in args.head_lr):
        raise UserError("--head-steps must be at least 1 and every --head-lr positive and finite")
    if not 0 <= args.shrinkage <= 1:
        raise UserError("--shrinkage must be in [0, 1]")
    figures = measure(args.bundle, args.data, args.head_lr, args.head_steps, args.shrinkage)
    lda = figures["lda"]["heldout"]
    print(f"{figures['train_rows']} training rows, {figures['heldout_rows']} held out; frozen features")
    print(f"  LDA head (round 1):        held-out accuracy {lda['accuracy']:.2%}, loss {lda['loss']:.4f}")
    for run in figures["exact_gradient"]:
        held = run["heldout"]
        print(f"  exact gradient lr {run['lr']:g} x {run['steps']}: held-out accuracy {held['accuracy']:.2%}, "
              f"loss {held['loss']:.4f}")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
