"""What an export is asked for: the adapter (`AdapterSpec`), the program's source, shapes and options
(`ExportSpec`), and the smaller shapes a memory fit tries (`Shapes`). Each is checked when it is made,
so a pass never meets an impossible combination. The passes take a spec and never change it: a pass
that learns more (the model's own number of labels, the shapes that fit) makes a new one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, PeftConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

from fwdfed.bundle.tasks import CAUSAL_LM, SEQ_CLS
from fwdfed.model.emulator import DropLayers
from fwdfed.model.quantize import QUANTIZED_TOLERANCE, check_options
PEFT_TASK_TYPES = {CAUSAL_LM: "CAUSAL_LM", SEQ_CLS: "SEQ_CLS"}
# Architectures for which peft ships no default LoRA targets: the attention query and value,
# as peft does for the others.
EXTRA_DEFAULT_TARGETS = {"distilbert": ["q_lin", "v_lin"]}


# Prompt learning (fwdfed.model.virtual_tokens): the virtual tokens, P-tuning's prompt encoder or the
# prefix keys and values are the adapter vector.
PROMPT_LEARNING_ADAPTERS = ("prompt-tuning", "p-tuning", "prefix-tuning")
ADAPTERS = ("lora", "bitfit", *PROMPT_LEARNING_ADAPTERS)
# What the export path cannot take, and why.
UNSUPPORTED_ADAPTERS = {
    "ia3": "its scaling vectors would need their own batched path (not written yet)",
}
PROMPT_INITS = ("random", "text")
P_TUNING_ENCODERS = ("mlp", "lstm")
HEAD_MODULES = ("classifier", "score")  # trained whole for classification, as peft's modules_to_save


@dataclass
class AdapterSpec:
    kind: str = "lora"  # lora (peft), bitfit (all biases + the classification head), or prompt learning
    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] | None = None  # None: peft's default for the architecture
    bias: str = "none"  # peft LoRA's bias option: none, all, lora_only
    seed: int = 0
    # prompt learning
    num_virtual_tokens: int = 8
    prompt_init: str = "random"  # prompt tuning: random, or the embeddings of prompt_init_text's tokens
    prompt_init_text: str | None = None
    encoder: str = "mlp"  # P-tuning's prompt encoder: mlp (lstm is refused: it does not lower)
    encoder_hidden_size: int | None = None  # P-tuning's MLP width; None: the model's hidden size, as peft
    layers: list[int] | None = None  # LoRA on these blocks only (peft's layers_to_transform); None: every block

    def __post_init__(self):
        if self.kind in UNSUPPORTED_ADAPTERS:
            raise NotImplementedError(f"adapter {self.kind!r} is not supported by the ExecuTorch export path: "
                                      f"{UNSUPPORTED_ADAPTERS[self.kind]}; supported: {', '.join(ADAPTERS)}")
        if self.kind not in ADAPTERS:
            raise ValueError(f"unknown adapter {self.kind!r}; supported: {', '.join(ADAPTERS)}")
        if self.num_virtual_tokens < 1:
            raise ValueError("the number of virtual tokens must be at least 1")
        if self.prompt_init not in PROMPT_INITS:
            raise ValueError(f"unknown prompt init {self.prompt_init!r}; supported: {', '.join(PROMPT_INITS)}")
        if self.prompt_init == "text" and self.kind != "prompt-tuning":
            raise ValueError("a prompt initialised from text is for --adapter prompt-tuning only")
        if (self.prompt_init == "text") != bool(self.prompt_init_text):
            raise ValueError("--prompt-init text needs --prompt-init-text, and --prompt-init-text needs "
                             "--prompt-init text")
        if self.encoder not in P_TUNING_ENCODERS:
            raise ValueError(f"unknown prompt encoder {self.encoder!r}; supported: {', '.join(P_TUNING_ENCODERS)}")
        if self.encoder == "lstm":
            raise NotImplementedError("P-tuning's LSTM prompt encoder is not supported by the export path: its "
                                      "weights are adapter inputs, and no batched LSTM is written for them; use mlp")

    def lora_config(self, task: str, model_type: str) -> LoraConfig:
        targets = self.target_modules or EXTRA_DEFAULT_TARGETS.get(model_type)
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=targets, bias=self.bias,
                          lora_dropout=0.0, task_type=PEFT_TASK_TYPES[task], layers_to_transform=self.layers)

    def prompt_learning_config(self, task: str, model_config, tokenizer_folder: Path) -> PeftConfig:
        # The model's shape is passed explicitly: peft reads it from config.to_dict(), where some
        # architectures (DistilBERT: dim, n_layers, n_heads) have other names.
        shape = dict(num_virtual_tokens=self.num_virtual_tokens, task_type=PEFT_TASK_TYPES[task],
                     token_dim=model_config.hidden_size, num_layers=model_config.num_hidden_layers,
                     num_attention_heads=model_config.num_attention_heads)
        if self.kind == "prompt-tuning":
            text = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text=self.prompt_init_text,
                        tokenizer_name_or_path=str(tokenizer_folder)) if self.prompt_init == "text" else {}
            return PromptTuningConfig(**shape, **text)
        if self.kind == "p-tuning":
            return PromptEncoderConfig(**shape, encoder_reparameterization_type=self.encoder.upper(),
                                       encoder_hidden_size=self.encoder_hidden_size or model_config.hidden_size)
        # peft sizes the prefix of a grouped-query model by its key/value heads.
        return PrefixTuningConfig(**shape)


@dataclass
class ExportSpec:
    source: str  # a local folder, or "preset:NAME"
    out: Path
    task: str | None = None
    num_labels: int = 2
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    batch_size: int = 4
    seq_len: int = 64
    max_perturbations: int = 8
    tolerance: float | None = None  # None: 1e-4 for fp32, QUANTIZED_TOLERANCE for a quantized base
    quantize: str | None = None  # a fwdfed.model.quantize scheme for the frozen base linears (8da4w, 8da8w)
    group_size: int | None = None  # 8da4w's group of input features (default 32)
    mem_budget: int | None = None  # bytes a device may use: shrink P, then batch, then length to fit
    device_runtime: int = 256 * 2**20  # what the device's runtime holds before any model (Python SDK here)
    # A classifier's logits for P adapter vectors in one call (the `logits` method), for a loss the device
    # takes itself: the distillation loss of fwdfed.methods.fedkd.
    distillation: bool = False
    # predict only (a teacher's program: fedkd's devices run it for inference, never train it)
    inference_only: bool = False
    # Offsite tuning: the program is the emulator made from `source` (the full model's folder) by dropping
    # blocks; `full_bundle` is the identity of the full model's bundle, exported first (run_emulator_export).
    emulator: DropLayers | None = None
    full_bundle: dict | None = None
    stream: bool = False  # one program per stage (export.stream), run one at a time on the device
    # The adapter on the top K blocks only, and the program split into a frozen `prefix` the device runs
    # once per example and an adapted `top` every forward-only pass runs (fwdfed.model.split).
    top_blocks: int | None = None

    def __post_init__(self):
        if self.distillation and self.inference_only:
            raise ValueError("--distillation adds a training method; --inference-only exports predict alone")
        if self.inference_only:
            self.max_perturbations = 1  # predict takes one adapter vector
        if self.stream and (self.distillation or self.inference_only or self.emulator is not None):
            # A streamed bundle's stages compute the loss only: no logits, predict or emulator path.
            raise ValueError("--stream computes the loss only: it does not combine with --distillation, "
                             "--inference-only or --emulator")
        if self.top_blocks is not None:
            if self.top_blocks < 1:
                raise ValueError(f"--adapter-blocks top:K needs K >= 1, got {self.top_blocks}")
            if self.stream or self.emulator is not None or self.inference_only:
                raise ValueError("--adapter-blocks top:K splits a whole program: it does not combine with --stream, "
                                 "--emulator or --inference-only")
            if self.adapter.kind != "lora":
                raise ValueError(f"--adapter-blocks top:K puts LoRA on the top blocks; --adapter {self.adapter.kind} "
                                 "trains tensors below them")
        if self.quantize is not None:
            self.group_size = check_options(self.quantize, self.group_size)
        elif self.group_size is not None:
            raise ValueError("--group-size is for --quantize 8da4w")
        if self.tolerance is None:
            self.tolerance = FP32_TOLERANCE if self.quantize is None else QUANTIZED_TOLERANCE


FP32_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Shapes:
    batch_size: int
    seq_len: int
    max_perturbations: int

    def smaller(self, factor: float) -> "Shapes | None":
        """Shapes whose activations are about `factor` times these: P first (down to 2, both signs of
        one direction), then the batch (down to 1), then the sequence length (down to 16)."""
        p, b, length = self.max_perturbations, self.batch_size, self.seq_len
        if p > 2:
            return Shapes(b, length, max(2, min(p - 1, int(p * factor))))
        if b > 1:
            return Shapes(max(1, min(b - 1, int(b * factor))), length, p)
        if length > 16:
            return Shapes(b, max(16, min(length - 1, int(length * factor))), p)
        return None
