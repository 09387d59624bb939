"""Base models: a local Hugging Face folder, or a named preset config with seeded random weights.

Presets are for tests and benchmarks. They carry a byte-level tokenizer built in code, so a
preset needs no file from anywhere. Every model is loaded from a folder in the end: a preset
is first written to one (inside the bundle), so that the bundle can rebuild its base model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          DistilBertConfig, LlamaConfig, PreTrainedTokenizerFast)

from fwdfed.bundle.tasks import CAUSAL_LM, SEQ_CLS
from fwdfed.errors import UserError, first_line


class ModelLoadError(UserError):
    """A model folder or preset that cannot be used; the message is meant for the user."""


@dataclass(frozen=True)
class Preset:
    task: str
    config: dict
    description: str
    whole: bool = True  # False: too big to build whole here; only the streamed export builds it, block by block


# LLaMA presets follow llama2.c's shapes; DistilBERT presets follow distilbert-base's layout.
PRESETS: dict[str, Preset] = {
    "tiny-llama": Preset(
        CAUSAL_LM,
        dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        "LLaMA decoder, 2 layers, hidden 64 (tests)",
    ),
    "tiny-distilbert": Preset(
        SEQ_CLS,
        dict(model_type="distilbert", dim=64, hidden_dim=128, n_layers=2, n_heads=4, max_position_embeddings=512),
        "DistilBERT encoder, 2 layers, dim 64 (tests)",
    ),
    "llama-25m": Preset(
        CAUSAL_LM,
        dict(model_type="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024),
        "LLaMA decoder, 8 layers, hidden 512, ~25M parameters (benchmarks)",
    ),
    "llama-110m": Preset(
        CAUSAL_LM,
        dict(model_type="llama", hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024, vocab_size=32000),
        "LLaMA decoder shaped like stories110M: 12 layers, hidden 768, 32,000-row vocabulary, 110M (benchmarks)",
    ),
    "llama-7b": Preset(
        CAUSAL_LM,
        dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048, vocab_size=32000),
        "LLaMA-7B shape: 32 layers, hidden 4096, 32 heads, 11008 MLP, 32,000 vocabulary; seeded random weights, "
        "built block by block (--stream only: the fp32 model is 27 GB)",
        whole=False,
    ),
    "distilbert-base": Preset(
        SEQ_CLS,
        dict(model_type="distilbert", dim=768, hidden_dim=3072, n_layers=6, n_heads=12, max_position_embeddings=512),
        "DistilBERT-base shape: 6 layers, dim 768, random weights (benchmarks)",
    ),
}

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per byte plus four specials: no training, no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        cls_token="<s>", sep_token="</s>",
    )


def preset_config(name: str) -> LlamaConfig:
    """A LLaMA preset's config as `write_preset` builds it (the byte-level tokenizer's special tokens),
    without weights."""
    if name not in PRESETS or PRESETS[name].config["model_type"] != "llama":
        raise ModelLoadError(f"{name!r} is not a LLaMA preset; LLaMA presets: "
                             f"{', '.join(n for n, p in PRESETS.items() if p.config['model_type'] == 'llama')}")
    tokenizer = byte_level_tokenizer()
    fields = {k: v for k, v in PRESETS[name].config.items() if k != "model_type"}
    fields["vocab_size"] = max(len(tokenizer), fields.get("vocab_size", 0))
    return LlamaConfig(**fields, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)


def write_preset(name: str, folder: Path, num_labels: int, seed: int = 0) -> None:
    """Write preset `name` with seeded random weights as a Hugging Face folder."""
    if name not in PRESETS:
        raise ModelLoadError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    preset = PRESETS[name]
    if not preset.whole:
        raise ModelLoadError(f"preset {name} is not built whole (its fp32 weights would not fit in memory): "
                             "export it with --stream, which builds it block by block")
    tokenizer = byte_level_tokenizer()
    fields = dict(preset.config)
    model_type = fields.pop("model_type")
    # A preset may size its embedding table like the real model's vocabulary (llama-110m: 32,000
    # rows, as stories110M); the byte-level tokenizer then uses only the first rows.
    common = dict(vocab_size=max(len(tokenizer), fields.pop("vocab_size", 0)), pad_token_id=tokenizer.pad_token_id)
    if model_type == "llama":
        config = LlamaConfig(**fields, **common, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    else:
        config = DistilBertConfig(**fields, **common, num_labels=num_labels)
    torch.manual_seed(seed)
    model_cls = AutoModelForCausalLM if preset.task == CAUSAL_LM else AutoModelForSequenceClassification
    model = model_cls.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def model_hash(folder: Path) -> str:
    """sha256 over the config and weight files, in name order: the base model's identity."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def infer_task(folder: Path) -> str:
    config = read_config(folder)
    archs = config.get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return CAUSAL_LM
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return SEQ_CLS
    raise ModelLoadError(f"cannot tell the task of {folder} from its architectures {archs}; pass --task")


def read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    try:
        return json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{config_path} is not valid JSON: {e}") from None


def load_model(folder: Path, task: str, num_labels: int):
    """Load the base model and its tokenizer from a local folder, offline."""
    read_config(folder)
    try:
        AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad config
        raise ModelLoadError(f"cannot read the model config in {folder}: {first_line(e)}") from None
    try:
        if task == CAUSAL_LM:
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, local_files_only=True, num_labels=num_labels, dtype=torch.float32
            )
    except Exception as e:
        raise ModelLoadError(f"cannot load the model weights in {folder}: {first_line(e)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, add_bos_token=True)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer in {folder}: {first_line(e)}") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked and ignored by the loss, so any existing token will do.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    model.config._attn_implementation = "sdpa"
    return model.eval(), tokenizer
