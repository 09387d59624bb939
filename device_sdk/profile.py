"""python -m device_sdk.profile: peak memory and time of a training step, method by method.

    python -m device_sdk.profile --bundle bundles/llama-110m --bundle bundles/distilbert-base --out reports/memory

For every bundle and every mode, a fresh process loads the same exported program, takes the
same batch, and measures (the kernel's own counters, /proc/self/status):
- runtime: resident memory after importing Python, torch and ExecuTorch, before any model;
- program load: what loading the program (or, for backprop, the eager model) added: its
  weights and the backend's initialisation;
- work: what the step added above that, at its peak (activations, planned buffers, adapter
  copies, optimizer state);
and the median time per step. Modes (`runtime.measure`): inference (one forward, P = 1),
one step of every training method in `fwdfed.methods` at its default directions (mezo: one
direction, P = 2; fwdgrad: 4 directions, P = 8; backprop: peft LoRA with AdamW in eager
PyTorch, the baseline), and batched (MeZO at the program's largest P). It writes report.json
and a self-contained report.html with the plots.

With `--teacher T` (fedkd), the teacher's labelling phase (its predict over a batch, P = 1) is
measured too, in a fresh process of its own, beside each bundle's fedkd step: a distilling
device runs one and then the other, so its peak is the larger of the two, which distillation.json
records with both phases.

Offsite tuning: given an emulator bundle and the full model's (`python -m export --emulator`), it
also sets the two side by side, mode by mode (peak memory and time per step, and their ratios).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

from fwdfed.cli import quiet_libraries, run_main
from runtime.measure import MODES, run_fresh


def breakdown(r: dict) -> dict[str, int]:
    """A record's peak split into parts. ExecuTorch allocates a method's planned buffers when it
    loads the method, so the program load holds them: load - plan is the weights and backend."""
    libraries = r.get("libraries_bytes", 0)  # not in reports made before it was measured
    planned = 0 if r["mode"] == "backprop" else min(r["planned_arena_bytes"], r["weights_bytes"] - libraries)
    copies = min(r["adapter_copies_bytes"], r["work_bytes"])
    return {"runtime (Python, torch)": r["runtime_bytes"],
            "libraries (ExecuTorch; backprop: transformers, peft)": libraries,
            "weights and backend": r["weights_bytes"] - libraries - planned,
            "planned buffers (memory plan)": planned,
            "adapter copies": copies,
            "other step memory (activations, optimizer)": r["work_bytes"] - copies}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def emulator_rows(results: list[dict], manifests: dict[str, object]) -> list[dict]:
    """Emulator against full model, mode by mode, for every profiled emulator whose full bundle was
    profiled too (the one its manifest names, by program hash)."""
    rows = []
    for emulator_dir, m in manifests.items():
        if m.emulator is None:
            continue
        full_dir = next((d for d, f in manifests.items()
                         if f.program.sha256 == m.emulator.full_bundle["program_sha256"]), None)
        if full_dir is None:
            continue
        for e in (r for r in results if r["bundle"] == emulator_dir):
            f = next((r for r in results if r["bundle"] == full_dir and r["mode"] == e["mode"]), None)
            if f is not None:
                rows.append({"mode": e["mode"], "emulator": emulator_dir, "full": full_dir,
                             "kept_layers": m.emulator.kept_layers, "full_layers": m.emulator.full_layers,
                             "emulator_peak_bytes": e["peak_bytes"], "full_peak_bytes": f["peak_bytes"],
                             "emulator_step_seconds": e["step_seconds"], "full_step_seconds": f["step_seconds"],
                             "peak_ratio": e["peak_bytes"] / f["peak_bytes"],
                             "time_ratio": e["step_seconds"] / f["step_seconds"]})
    return rows


def emulator_table(rows: list[dict]) -> str:
    mib = 2**20
    return "\n".join(f"{r['mode']:<10} emulator (blocks {r['kept_layers']} of {r['full_layers']}) vs full: peak "
                     f"{r['emulator_peak_bytes'] / mib:.0f} vs {r['full_peak_bytes'] / mib:.0f} MiB "
                     f"({r['peak_ratio']:.3f}x), {r['emulator_step_seconds'] * 1e3:.1f} vs "
                     f"{r['full_step_seconds'] * 1e3:.1f} ms per step ({r['time_ratio']:.3f}x)" for r in rows)


def write_report(results: list[dict], out: Path, emulator: list[dict] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(results, indent=2))
    if emulator:
        (out / "emulator.json").write_text(json.dumps(emulator, indent=2))
    models = list(dict.fromkeys(r["model"] for r in results))
    mib = 2**20
    figures, rows = [], []
    for model in models:
        rs = [r for r in results if r["model"] == model]
        inference = next(r for r in rs if r["mode"] == "inference")["peak_bytes"]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
        modes = [r["mode"] for r in rs]
        bottom = [0.0] * len(rs)
        parts = [breakdown(r) for r in rs]
        for label in parts[0]:
            values = [p[label] / mib for p in parts]
            ax1.bar(modes, values, bottom=bottom, label=label)
            bottom = [a + v for a, v in zip(bottom, values)]
        ax1.axhline(inference / mib * 1.1, color="k", ls="--", lw=1, label="inference peak + 10%")
        ax1.set_ylabel("peak resident memory (MiB)")
        ax1.legend(fontsize=7)
        ax2.bar(modes, [r["step_seconds"] * 1e3 for r in rs], color="tab:gray")
        ax2.set_ylabel("time per step (ms)")
        fig.suptitle(f"{model}: {rs[0]['base_parameters'] / 1e6:.1f}M base parameters, adapter {rs[0]['adapter_dim']:,}, "
                     f"batch {rs[0]['batch'][0]}x{rs[0]['batch'][1]}")
        figures.append(_png(fig))
        plt.close(fig)
        for r, p in zip(rs, parts):
            cells = "".join(f"<td>{v / mib:.0f}</td>" for v in p.values())
            rows.append(f"<tr><td>{model}</td><td>{r['mode']}</td>{cells}<td>{r['peak_bytes'] / mib:.0f}</td>"
                        f"<td>{r['peak_bytes'] / inference:.3f}</td><td>{r['step_seconds'] * 1e3:.1f}</td></tr>")
    images = "\n".join(f'<img alt="memory and time" src="data:image/png;base64,{p}">' for p in figures)
    html = f"""<!doctype html><html><head><meta charset="utf-8"><title>Memory of a training step</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:2px 8px;text-align:right}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f3f3f3}}</style></head><body>
<h1>Memory of a training step, method by method</h1>
<p>Each row is a fresh process on the same exported program and the same batch. Peak is the
kernel's high-water mark of resident memory (VmHWM). Ratio = the mode's peak / the inference peak.</p>
{images}
<p>Breakdown: the runtime is resident memory after the imports, before any model; the program
load is split into the planned buffers of ExecuTorch's memory plan (allocated when the method
loads, at the program's largest P) and the rest (weights, backend); a step adds the adapter
copies the method holds (computed from the adapter's size) and other memory (activations
outside the plan, optimizer state, allocator slack). Backprop runs in eager PyTorch: no plan.</p>
<table><tr><th>model</th><th>mode</th><th>runtime MiB</th><th>weights + backend MiB</th><th>planned buffers MiB</th>
<th>adapter copies MiB</th><th>other step MiB</th><th>peak MiB</th><th>peak / inference</th><th>ms per step</th></tr>
{''.join(rows)}</table>
{f"<h2>Offsite tuning: emulator vs full model</h2><pre>{emulator_table(emulator)}</pre>" if emulator else ""}
<p>Generated by <code>python -m device_sdk.profile</code>; numbers in report.json.</p></body></html>"""
    path = out / "report.html"
    path.write_text(html)
    return path


def teacher_phases(teacher: Path, results: list[dict], repeats: int) -> dict:
    """The teacher's labelling peak against each student's fedkd step peak: a device's peak is the larger."""
    labelling = run_fresh(teacher, "labelling", repeats)
    mib = 2**20
    print(f"teacher {labelling['model']:<28} labelling peak {labelling['peak_bytes'] / mib:7.0f} MiB "
          f"{labelling['step_seconds'] * 1e3:8.1f} ms per batch", flush=True)
    students = []
    for r in results:
        if r["mode"] != "fedkd":
            continue
        device_peak = max(labelling["peak_bytes"], r["peak_bytes"])
        students.append({"bundle": r["bundle"], "student_training_peak_bytes": r["peak_bytes"],
                         "device_peak_bytes": device_peak,
                         "sum_of_phases_bytes": labelling["peak_bytes"] + r["peak_bytes"]})
        print(f"student {r['model']:<28} fedkd step peak {r['peak_bytes'] / mib:7.0f} MiB: the device peaks at "
              f"max(teacher, student) = {device_peak / mib:.0f} MiB", flush=True)
    return {"teacher": labelling, "teacher_labelling_peak_bytes": labelling["peak_bytes"], "students": students}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m device_sdk.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, action="append", required=True, help="repeat for several models")
    parser.add_argument("--out", type=Path, help="report folder (report.html, report.json)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--teacher", type=Path, help="fedkd: a teacher's inference-only bundle; its labelling phase "
                        "is measured and compared with the student's fedkd step")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out is required")
    if "inference" not in args.modes:
        parser.error("--modes must include inference: every ratio is to its peak")
    from fwdfed.bundle.manifest import load_bundle

    bundles = {bundle: load_bundle(bundle) for bundle in args.bundle}  # a bad bundle is refused before anything runs
    if args.teacher is not None:
        load_bundle(args.teacher)
    manifests = {str(bundle): b.manifest for bundle, b in bundles.items()}
    results = []
    for bundle in args.bundle:
        has_logits = "logits" in bundles[bundle].manifest.program.methods
        for mode in args.modes:
            if mode == "fedkd" and not has_logits:  # a bundle exported without --distillation cannot run it
                print(f"{bundle}: no logits method (export --distillation): fedkd not measured", flush=True)
                continue
            if mode == "hybrid" and "features" not in bundles[bundle].manifest.program.methods:  # no classifier head
                print(f"{bundle}: no features method (not a classifier): hybrid not measured", flush=True)
                continue
            r = run_fresh(bundle, mode, args.repeats)
            results.append(r)
            print(f"{r['model']:<28} {mode:<10} peak {r['peak_bytes'] / 2**20:7.0f} MiB "
                  f"(runtime {r['runtime_bytes'] / 2**20:.0f}, load {r['weights_bytes'] / 2**20:.0f}, "
                  f"step {r['work_bytes'] / 2**20:.0f})  {r['step_seconds'] * 1e3:8.1f} ms", flush=True)
    emulator = emulator_rows(results, manifests)
    if emulator:
        print(emulator_table(emulator))
    print(f"wrote {write_report(results, args.out, emulator)}")
    if args.teacher is not None:
        distillation = teacher_phases(args.teacher, results, args.repeats)
        (args.out / "distillation.json").write_text(json.dumps(distillation, indent=2))
        print(f"wrote {args.out / 'distillation.json'}")
    return 0


if __name__ == "__main__":
    quiet_libraries()
    run_main(main)
