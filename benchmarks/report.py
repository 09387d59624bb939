"""python -m benchmarks.report: the benchmark runs' figures as tables and plots in docs/BENCHMARKS.md.

    python -m benchmarks.report --compare runs/agnews runs/sst2 runs/tinystories \\
        --headline runs/headline-iid runs/headline-dirichlet --profile runs/profile-minilm --fedkd runs/fedkd \\
        --prompt-learning runs/prompt-learning --docs docs

reads each comparison's results.json (`python -m benchmarks.compare`), each headline's
report.json (`python -m benchmarks.agnews`) and a profile's report.json (`python -m
device_sdk.profile`), copies them to docs/benchmarks/ (the figures behind every number), draws
the plots there, and rewrites the part of docs/BENCHMARKS.md between the `generated` markers;
the text around them is kept.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
from pathlib import Path

from fwdfed.cli import run_main
from fwdfed.errors import UserError

START, END = "<!-- generated: python -m benchmarks.report -->", "<!-- end of generated -->"
MiB = 2**20


def read_json(folder: Path, name: str) -> dict | list:
    path = folder / name
    if not path.is_file():
        raise UserError(f"{path} does not exist: run the benchmark into {folder} first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not JSON ({e})") from None


def metric_of(rounds_or_start: dict) -> tuple[str, float | None]:
    for name in ("heldout_accuracy", "heldout_loss"):
        if name in rounds_or_start:
            return name, rounds_or_start[name]
    return "heldout_loss", None


def series(arm: dict) -> dict[str, list[float]]:
    """Per point (the start, then each round): the metric, cumulative forward passes, wall seconds
    and bytes per device."""
    name, start = metric_of(arm["start"])
    points = {"round": [0], "metric": [start], "passes": [0], "seconds": [0.0]}
    for r in arm["rounds"]:
        points["round"].append(r["round"])
        points["metric"].append(r.get(name))
        points["passes"].append(points["passes"][-1] + r["forward_passes"])
        points["seconds"].append(points["seconds"][-1] + r["seconds"])
    return points


def plot_comparison(name: str, results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    arms = results["arms"]
    metric = metric_of(next(iter(arms.values()))["start"])[0]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for arm, figures in arms.items():
        s = series(figures)
        for ax, x in zip(axes[:3], ("round", "passes", "seconds")):
            ax.plot(s[x], s["metric"], marker="o", label=arm)
    labels = ("round", "forward passes (all devices, cumulative)", "wall seconds (cumulative)")
    for ax, label in zip(axes[:3], labels):
        ax.set_xlabel(label)
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=8)
    names = list(arms)
    sent = [arms[a]["rounds"][-1]["sent_bytes_per_device"] for a in names]
    received = [arms[a]["rounds"][-1]["received_bytes_per_device"] for a in names]
    xs = range(len(names))
    axes[3].bar([x - 0.2 for x in xs], sent, width=0.4, label="sent (update)")
    axes[3].bar([x + 0.2 for x in xs], received, width=0.4, label="received (task)")
    axes[3].set_yscale("log")
    axes[3].set_xticks(list(xs), names, rotation=20, fontsize=8)
    axes[3].set_ylabel("bytes per device, last round")
    axes[3].legend(fontsize=8)
    fig.suptitle(f"{name}: {results['devices']} devices, split {results['split']}"
                 + (f" (alpha {results['alpha']})" if results["split"] == "dirichlet" else ""))
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def comparison_table(results: dict) -> str:
    arms = results["arms"]
    metric = metric_of(next(iter(arms.values()))["start"])[0]
    accuracy = metric == "heldout_accuracy"
    head = ["arm", "start", "best", "last"] + (["final adapter, peft"] if accuracy else ["best perplexity"]) + [
        "forward passes", "wall min", "sent B/device/round", "received B/device/round", "device peak MiB"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, f in arms.items():
        values = [r[metric] for r in f["rounds"] if metric in r]
        start = f["start"].get(metric)
        best = (max if accuracy else min)(values + [start])
        training = [r for r in f["rounds"] if r["method"] != "class-stats"] or f["rounds"]
        if accuracy:
            extra = f"{f['test_accuracy']:.4f} ({f['test_rows']} rows)" if "test_accuracy" in f else "-"
        else:
            extra = f"{math.exp(best):.3f}"
        rows.append("| " + " | ".join([
            arm, f"{start:.4f}", f"{best:.4f}", f"{values[-1]:.4f}", extra,
            f"{sum(r['forward_passes'] for r in f['rounds']):,}", f"{f['job_seconds'] / 60:.1f}",
            f"{max(r['sent_bytes_per_device'] for r in training):,}",
            f"{max(r['received_bytes_per_device'] for r in training):,}",
            f"{max(r['peak_rss_bytes'] for r in f['rounds']) / MiB:.0f}"]) + " |")
    flags = "\n".join(f"- `{arm}`: `{' '.join(f['flags'])}`" for arm, f in arms.items())
    return "\n".join(rows) + "\n\nTraining flags of each arm (`coordinator serve`):\n\n" + flags


def headline_table(reports: list[tuple[str, dict]]) -> str:
    rows = ["| run | held-out acc. per version (coordinator, 800 rows) | final adapter, peft | best version, peft "
            "| export min | job min | total min | command |", "|---|---|---|---|---|---|---|---|"]
    for name, r in reports:
        path = " → ".join(f"{x:.4f}" for x in [r["start"].get("heldout_accuracy", 0)]
                          + [x["heldout_accuracy"] for x in r["rounds"] if "heldout_accuracy" in x])
        s = r["seconds"]
        rows.append(f"| {name} | {path} | {r['peft_heldout_accuracy']:.4f} ({r['peft_heldout_rows']} rows) | "
                    f"{r['best_version_peft_heldout_accuracy']:.4f} (version {r['best_version']}) | "
                    f"{s['export'] / 60:.1f} | {s['job'] / 60:.1f} | {s['total'] / 60:.1f} | `{r['command']}` |")
    return "\n".join(rows)


def memory_table(profile: list[dict]) -> str:
    """Peaks per mode, whole and without the interpreter's share: Python, torch and the mode's own
    libraries (the ExecuTorch runtime; transformers + peft for backprop), which a phone's runtime
    does not carry in that form."""
    by_mode = {r["mode"]: r for r in profile}
    backprop = by_mode.get("backprop")

    def own(r):
        return r["peak_bytes"] - r["runtime_bytes"] - r["libraries_bytes"]

    rows = ["| mode | peak MiB | Python + torch MiB | its libraries MiB | model load MiB | step MiB | "
            "peak without the interpreter's share MiB | ÷ backprop (whole) | ÷ backprop (without) | s/step |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, r in by_mode.items():
        ratio = f"{r['peak_bytes'] / backprop['peak_bytes']:.2f}" if backprop else "-"
        own_ratio = f"{own(r) / own(backprop):.2f}" if backprop else "-"
        rows.append(f"| {mode} | {r['peak_bytes'] / MiB:.0f} | {r['runtime_bytes'] / MiB:.0f} | "
                    f"{r['libraries_bytes'] / MiB:.0f} | {(r['weights_bytes'] - r['libraries_bytes']) / MiB:.0f} | "
                    f"{r['work_bytes'] / MiB:.0f} | {own(r) / MiB:.0f} | {ratio} | {own_ratio} | "
                    f"{r['step_seconds']:.2f} |")
    first = profile[0]
    return (f"{first['architecture']}, {first['base_parameters']:,} parameters, adapter {first['adapter_dim']:,}, "
            f"batch {first['batch'][0]} × {first['batch'][1]}:\n\n" + "\n".join(rows))


def fedkd_section(results: dict) -> str:
    """The student with and without distillation (benchmarks.fedkd), the teacher, and the device's two phases."""
    t, memory = results["teacher"], results["memory"]
    teacher = (f"Teacher: all-MiniLM-L6-v2 fine-tuned whole with AdamW on {t['rows']:,} public rows "
               f"({t['epochs']} epoch(s), lr {t['lr']:g}, {t['train_seconds'] / 60:.1f} min), "
               f"{t['test_accuracy']:.4f} on GLUE dev ({t['test_rows']} rows); the devices hold "
               f"{results['device_rows']:,} other rows.")
    if results.get("labelled_training_rows") is not None:
        teacher += (f" Only {results['labelled_training_rows']:,} of their {results['training_rows']:,} training rows "
                    "keep a label (the coordinator's held-out rows keep theirs): `mezo` trains on those, `fedkd` on "
                    "every row, the unlabelled by the teacher's distribution alone.")
    rows = ["| phase (fresh process each) | peak MiB | s per batch |", "|---|---|---|",
            f"| teacher labelling (predict, P = 1) | {memory['teacher_labelling_peak_bytes'] / MiB:.0f} | "
            f"{memory['teacher']['step_seconds']:.2f} |"]
    for mode in memory.get("modes", []):
        rows.append(f"| student {mode['mode']} | {mode['peak_bytes'] / MiB:.0f} | {mode['step_seconds']:.2f} |")
    for student in memory["students"]:
        rows.append(f"| **device with distillation: max(teacher, student fedkd step)** | "
                    f"**{student['device_peak_bytes'] / MiB:.0f}** (the two peaks added: "
                    f"{student['sum_of_phases_bytes'] / MiB:.0f}, the interpreter counted twice) | |")
    passes = [f"`{arm}` {f['teacher_passes']:,} teacher passes (once)" for arm, f in results["arms"].items()
              if "teacher_passes" in f]
    head_rounds = {arm: sum(r["forward_passes"] for r in f["rounds"] if r["method"] == "class-stats")
                   for arm, f in results["arms"].items()}
    if any(head_rounds.values()):  # one pass per batch of the rows a device trains on: more rows, more passes
        passes.append("of the forward passes, the head round's (one per batch of the rows a device trains on): "
                      + ", ".join(f"`{arm}` {n:,}" for arm, n in head_rounds.items()))
    return (teacher + "\n\n" + comparison_table(results) + "\n\n" + ("Besides the forward passes above: "
            + "; ".join(passes) + ".\n\n" if passes else "") + "\n".join(rows) + "\n\nCommands: "
            + "; ".join(f"`{c}`" for c in results["commands"]))


def prompt_learning_section(results: dict) -> str:
    """Federated MeZO through each prompt-learning adapter (benchmarks.prompt_learning) against chance."""
    rows = ["| adapter | d | `.pte` vs eager peft, max \\|diff\\| loss, logits | held-out loss start → final | "
            "gain | random steps of the same length: gains | bar | rounds × devices × steps | job min | "
            "loads in peft as |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for case, c in results["cases"].items():
        s, f = c["scores"], c["figures"]
        steps = dict(zip(c["training"][::2], c["training"][1::2]))["--local-steps"]
        rows.append(f"| {case} | {c['adapter_dim']:,} | {c['verification']['loss_max_abs_diff']:.1e}, "
                    f"{c['verification']['logits_max_abs_diff']:.1e} | "
                    f"{s['heldout_loss_start']:.4f} → {s['heldout_loss_final']:.4f} | **{s['gain']:+.4f}** | "
                    f"{min(s['random_step_gains']):+.4f} … {max(s['random_step_gains']):+.4f} | "
                    f"{s['chance_bar']:.4f} | "
                    f"{len(f['rounds'])} × {f['rounds'][0]['updates'] if f['rounds'] else 0} × {steps} | "
                    f"{f['job_seconds'] / 60:.1f} | {c['peft_type']} |")
    flags = "; ".join(f"{case}: `{shlex.join(c['adapter_flags'] + c['shape'])}`, "
                      f"serve `{shlex.join(c['training'])}`" for case, c in results["cases"].items())
    return ("\n".join(rows) + "\n\nExport and training flags: " + flags + "\n\nCommands: "
            + "; ".join(f"`{c}`" for c in results["commands"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="folders of benchmarks.compare runs")
    parser.add_argument("--headline", type=Path, nargs="*", default=[], help="folders of benchmarks.agnews runs")
    parser.add_argument("--profile", type=Path, help="folder of a device_sdk.profile run")
    parser.add_argument("--fedkd", type=Path, nargs="*", default=[], help="folders of benchmarks.fedkd runs")
    parser.add_argument("--prompt-learning", type=Path, help="folder of a benchmarks.prompt_learning run")
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    doc = args.docs / "BENCHMARKS.md"
    figures = args.docs / "benchmarks"
    figures.mkdir(parents=True, exist_ok=True)
    parts = []
    if args.headline:
        reports = []
        for folder in args.headline:
            reports.append((folder.name, read_json(folder, "report.json")))
            name = folder.name if folder.name.startswith("headline") else f"headline-{folder.name}"
            shutil.copyfile(folder / "report.json", figures / f"{name}.json")
        parts.append("### The headline job (`python -m benchmarks.agnews`)\n\n" + headline_table(reports))
    for folder in args.compare:
        results = read_json(folder, "results.json")
        name = folder.name
        shutil.copyfile(folder / "results.json", figures / f"{name}.json")
        plot = plot_comparison(name, results, figures)
        title = name if name == results["task"] else f"{name} ({results['task']})"
        parts.append(f"### {title}: {results['devices']} devices, split {results['split']}\n\n"
                     + comparison_table(results) + f"\n\n![{name}](benchmarks/{plot.name})\n\nCommands: "
                     + "; ".join(f"`{c}`" for c in results.get("commands", [results.get("command")])))
    if args.profile:
        profile = read_json(args.profile, "report.json")
        shutil.copyfile(args.profile / "report.json", figures / "profile.json")
        parts.append("### Peak memory per method (`python -m device_sdk.profile`)\n\n" + memory_table(profile))
    for folder in args.fedkd:
        results = read_json(folder, "results.json")
        shutil.copyfile(folder / "results.json", figures / f"fedkd-{folder.name}.json")
        parts.append(f"### FedKD on SST-2 ({folder.name}): the student with and without distillation "
                     "(`python -m benchmarks.fedkd`)\n\n" + fedkd_section(results))
    if args.prompt_learning:
        results = read_json(args.prompt_learning, "results.json")
        shutil.copyfile(args.prompt_learning / "results.json", figures / "prompt-learning.json")
        parts.append("### Prompt learning on TinyStories (stories260K): federated MeZO against chance "
                     "(`python -m benchmarks.prompt_learning`)\n\n" + prompt_learning_section(results))
    generated = START + "\n" + "\n\n".join(parts) + "\n" + END
    text = doc.read_text() if doc.is_file() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        raise UserError(f"{doc} has no generated block ({START} ... {END}) to rewrite")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    doc.write_text(before + generated + after)
    print(f"wrote {doc} and {figures}/")
    return 0


if __name__ == "__main__":
    run_main(main)
