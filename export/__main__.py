"""python -m export: lower a Hugging Face model with a peft adapter to an ExecuTorch bundle.

    python -m export --model ../shared/models/stories260K --out bundles/stories
    python -m export --preset tiny-distilbert --num-labels 2 --out bundles/tiny-distilbert

Offsite tuning (docs/offsite.md): devices train on an emulator with a share of the middle blocks
dropped, the server evaluates and exports on the full model; both bundles, one adapter layout:

    python -m export --model ../shared/models/stories260K --out bundles/stories-emu \
        --emulator drop-layers --keep-first 1 --keep-last 1 --drop-fraction 0.5 --full-out bundles/stories-full
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fwdfed.cli import quiet_libraries, run_main
from fwdfed.model.emulator import DROP_LAYERS


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
    parser.add_argument("--sign-key", type=Path, help="sign the bundle (and --full-out's) with this private key, "
                        "signing_key.pem from `python -m coordinator keygen`, as `coordinator sign` does")
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
    parser.add_argument("--adapter-blocks", default="all", metavar="all|top:K",
                        help="LoRA on every block (all, the default), or on the top K only (top:K; encoder "
                             "classifiers and LLaMA-family causal LMs): the program is then split into a frozen prefix the device runs once per "
                             "example and an adapted top every forward-only pass runs (docs/adapters.md)")
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
    parser.add_argument("--distillation", action="store_true",
                        help="classifiers: also export the logits method (logits of P adapter vectors in one call), "
                             "which the fedkd method's distillation loss is taken from")
    parser.add_argument("--inference-only", action="store_true",
                        help="export predict alone (a fedkd teacher's program: devices run it, never train it)")
    parser.add_argument("--tolerance", type=float,
                        help="max |loss diff| .pte vs eager (the eager quantized model with --quantize; logits "
                             "within 10x); default 1e-4, or 1e-2 with --quantize")
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
    offsite = parser.add_argument_group("offsite tuning (docs/offsite.md)")
    offsite.add_argument("--emulator", choices=(DROP_LAYERS,),
                         help="write --out as an emulator of the model for the devices to train on (the first and "
                              "last blocks kept, carrying the LoRA adapter; a share of the middle ones dropped), and "
                              "the full model's bundle, with the same adapter layout, to --full-out")
    offsite.add_argument("--keep-first", type=int, help="blocks kept at the start, with the adapter (default 1)")
    offsite.add_argument("--keep-last", type=int, help="blocks kept at the end, with the adapter (default 1)")
    offsite.add_argument("--drop-fraction", type=float,
                         help="share of the middle blocks dropped, in [0, 1); the rest kept evenly spread "
                              "(default 0.5)")
    offsite.add_argument("--full-out", type=Path, help="the full model's bundle (default: --out with -full appended)")
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
    args.top_blocks = None
    if args.adapter_blocks != "all":
        kind, _, count = args.adapter_blocks.partition(":")
        if kind != "top" or not count.isdigit() or int(count) < 1:
            parser.error(f"--adapter-blocks must be all or top:K with K >= 1, got {args.adapter_blocks!r}")
        args.top_blocks = int(count)
    if args.seq_len < 2:
        parser.error("--seq-len must be at least 2")
    if args.lora_alpha <= 0 or (args.tolerance is not None and args.tolerance <= 0):
        parser.error("--lora-alpha and --tolerance must be positive")
    if args.encoder_hidden_size is not None and args.encoder_hidden_size < 1:
        parser.error("--encoder-hidden-size must be at least 1")
    emulator_flags = {"--keep-first": args.keep_first, "--keep-last": args.keep_last,
                      "--drop-fraction": args.drop_fraction, "--full-out": args.full_out}
    if args.emulator is None:
        given = [flag for flag, value in emulator_flags.items() if value is not None]
        if given:
            parser.error(f"{given[0]} needs --emulator drop-layers")
    else:
        from fwdfed.model.emulator import DropLayers, EmulatorError

        try:
            args.drop_layers = DropLayers(1 if args.keep_first is None else args.keep_first,
                                          1 if args.keep_last is None else args.keep_last,
                                          0.5 if args.drop_fraction is None else args.drop_fraction)
        except EmulatorError as e:
            parser.error(str(e))
        args.full_out = args.full_out or args.out.with_name(args.out.name + "-full")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    from export.spec import AdapterSpec, ExportSpec
    from export.run import run_export

    sign_key = None
    if args.sign_key is not None:  # a key that cannot sign is refused before minutes of export, not after
        from fwdfed.bundle.signing import load_private_key

        sign_key = load_private_key(args.sign_key)
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
        distillation=args.distillation,
        inference_only=args.inference_only,
        stream=args.stream,
        top_blocks=args.top_blocks,
    )
    if args.emulator:
        from export.run import run_emulator_export

        full, manifest = run_emulator_export(spec, args.drop_layers, args.full_out)
        print(f"full model's bundle written: {args.full_out} (base {full.model.hash[:12]}, "
              f"{full.model.base_parameters:,} base parameters)")
        print(f"emulator: blocks {manifest.emulator.kept_layers} of {manifest.emulator.full_layers}, "
              f"{manifest.model.base_parameters:,} base parameters")
    else:
        manifest = run_export(spec)
    print(f"bundle written: {args.out} (base {manifest.model.hash[:12]}, adapter dim {manifest.adapter_dim:,}, "
          f"batch {manifest.inputs.batch_size}, seq {manifest.inputs.seq_len}, "
          f"P {manifest.inputs.max_perturbations}"
          + (f", {manifest.quantization.scheme} base" if manifest.quantization else "")
          + ")")
    if sign_key is not None:
        from fwdfed.bundle.manifest import sign_bundle
        from fwdfed.bundle.signing import fingerprint

        for folder in [args.out] + ([args.full_out] if args.emulator else []):
            sign_bundle(folder, sign_key)
            print(f"signed {folder} with key {fingerprint(sign_key.public_key())}")
    return 0


if __name__ == "__main__":
    quiet_libraries()
    run_main(main, also=(NotImplementedError, ValueError))
