"""python -m export: lower a Hugging Face model with a peft adapter to an ExecuTorch bundle.

    python -m export --model ../shared/models/stories260K --out bundles/stories
    python -m export --preset tiny-distilbert --num-labels 2 --out bundles/tiny-distilbert
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fwdfed.cli import quiet_libraries, run_main


def parse_args(argv):
    from fwdfed.bundle.tasks import TASKS
    from fwdfed.model.base_model import PRESETS
    from fwdfed.model.quantize import SCHEMES

    presets = "\n".join(f"  {name:18} {p.description}" for name, p in PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="python -m export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets:\n{presets}",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="local Hugging Face model folder (config.json + weights + tokenizer)")
    source.add_argument("--preset", help="named preset config with seeded random weights")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    parser.add_argument("--task", choices=TASKS, help="default: from the model's architecture")
    parser.add_argument("--num-labels", type=int, default=2, help="classes, for seq-cls (default 2)")
    parser.add_argument("--adapter", default="lora",
                        help="lora (peft), bitfit (biases + classification head), or peft's prompt learning: "
                             "prompt-tuning (virtual token embeddings), p-tuning (an MLP prompt encoder), "
                             "prefix-tuning (per-layer key/value prefixes; models that take past keys and values)")
    parser.add_argument("--lora-bias", choices=("none", "all", "lora_only"), default="none",
                        help="peft LoRA's bias option: also train biases")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--target-modules", help="comma-separated module names (default: peft's for the architecture)")
    parser.add_argument("--num-virtual-tokens", type=int, default=8,
                        help="prompt learning: virtual tokens prepended (or the prefix's length); default 8")
    parser.add_argument("--prompt-init", default="random",
                        help="prompt-tuning: random (default), or text: the embeddings of --prompt-init-text's tokens")
    parser.add_argument("--prompt-init-text", help="prompt-tuning with --prompt-init text: the text (repeated or cut "
                                                   "to --num-virtual-tokens tokens, as peft does)")
    parser.add_argument("--prompt-encoder", default="mlp", help="p-tuning's prompt encoder: mlp (lstm is refused)")
    parser.add_argument("--encoder-hidden-size", type=int,
                        help="p-tuning: the MLP encoder's width (default: the model's hidden size, as peft)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial adapter (and preset weights)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per program call")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per example")
    parser.add_argument("--max-perturbations", type=int, default=8, help="adapter vectors per call")
    parser.add_argument("--tolerance", type=float,
                        help="max |loss diff| .pte vs eager (the eager quantized model with --quantize; logits "
                             "within 10x); default 1e-4, or 5e-2 with --quantize")
    parser.add_argument("--quantize", choices=SCHEMES,
                        help="quantize the frozen base model's linear layers (never the adapter): 8da4w (int8 "
                             "dynamic activations, int4 weights in groups) or 8da8w (int8 weights per channel)")
    parser.add_argument("--group-size", type=int,
                        help="8da4w: input features per int4 group, a multiple of 32 (default 32); a layer it "
                             "does not divide stays fp32, and the log and manifest say so")
    parser.add_argument("--mem", help="memory budget of a device (e.g. 1.5GB): lower again at a smaller P, then "
                                      "batch, then sequence length until a training step's plan fits")
    parser.add_argument("--stream", action="store_true",
                        help="one program per stage (embedding, each decoder block, head), run one at a time on "
                             "the device; LLaMA-family causal LMs with LoRA inside the blocks (needed for --preset "
                             "llama-7b)")
    parser.add_argument("--device-runtime", default="256MiB",
                        help="what the device's runtime holds before any model (default 256MiB: this Python SDK)")
    args = parser.parse_args(argv)
    from fwdfed.memory import parse_size

    try:
        args.mem_bytes = parse_size(args.mem) if args.mem else None
        args.runtime_bytes = parse_size(args.device_runtime)
    except ValueError as e:
        parser.error(f"--mem / --device-runtime: {e}")
    for name in ("num_labels", "lora_rank", "batch_size", "max_perturbations", "num_virtual_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.seq_len < 2:
        parser.error("--seq-len must be at least 2")
    if args.lora_alpha <= 0 or (args.tolerance is not None and args.tolerance <= 0):
        parser.error("--lora-alpha and --tolerance must be positive")
    if args.encoder_hidden_size is not None and args.encoder_hidden_size < 1:
        parser.error("--encoder-hidden-size must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    from export.pipeline import AdapterSpec, ExportSpec, run_export

    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules else None
    spec = ExportSpec(
        source=f"preset:{args.preset}" if args.preset else str(args.model),
        out=args.out,
        task=args.task,
        num_labels=args.num_labels,
        adapter=AdapterSpec(kind=args.adapter, rank=args.lora_rank, alpha=args.lora_alpha, target_modules=targets,
                            bias=args.lora_bias, seed=args.seed, num_virtual_tokens=args.num_virtual_tokens,
                            prompt_init=args.prompt_init, prompt_init_text=args.prompt_init_text,
                            encoder=args.prompt_encoder, encoder_hidden_size=args.encoder_hidden_size),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        max_perturbations=args.max_perturbations,
        tolerance=args.tolerance,
        quantize=args.quantize,
        group_size=args.group_size,
        mem_budget=args.mem_bytes,
        device_runtime=args.runtime_bytes,
        stream=args.stream,
    )
    manifest = run_export(spec)
    print(f"bundle written: {args.out} (base {manifest.model['hash'][:12]}, adapter dim {manifest.adapter_dim:,}, "
          f"batch {manifest.inputs['batch_size']}, seq {manifest.inputs['seq_len']}, "
          f"P {manifest.inputs['max_perturbations']}"
          + (f", {manifest.model['quantization']['scheme']} base" if manifest.model.get("quantization") else "")
          + ")")
    return 0


if __name__ == "__main__":
    quiet_libraries()
    run_main(main, also=(NotImplementedError, ValueError))
