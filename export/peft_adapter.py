"""Write an adapter vector as a peft adapter folder that `PeftModel.from_pretrained` loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

from export.manifest import Bundle, BundleError
from export.models import load_model, model_hash


def lora_config(manifest_config: dict) -> LoraConfig:
    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    return LoraConfig(**{k: v for k, v in manifest_config.items() if k in known})


def peft_model_with(bundle: Bundle, vector: np.ndarray):
    """The bundle's base model with its peft adapter set to `vector`."""
    m = bundle.manifest
    base = bundle.base_model_path
    if model_hash(base) != m.base_model_hash:
        raise BundleError(f"the base model in {base} is not the one this bundle was exported from (hash differs)")
    model, _ = load_model(base, m.task, m.model.get("num_labels") or 2)
    if m.adapter["kind"] == "lora":
        peft_model = get_peft_model(model, lora_config(m.adapter["peft_config"])).eval()
    else:
        peft_model = model  # bitfit: the layout names the model's own parameters
    tensors = m.layout.unflatten(np.asarray(vector, dtype=np.float32))
    params = dict(peft_model.named_parameters())
    missing = [name for name in tensors if name not in params]
    if missing:
        raise BundleError(f"the peft model has no parameter {missing[0]} named in the bundle's layout")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(torch.from_numpy(value))
    return peft_model


def save_peft_adapter(bundle: Bundle, vector: np.ndarray, out: str | Path) -> Path:
    """A peft folder for LoRA. peft has no BitFit type: a bitfit adapter is written as
    `bitfit.safetensors` (the trained tensors by parameter name), which
    `model.load_state_dict(safetensors.torch.load_file(path), strict=False)` applies."""
    out = Path(out)
    if bundle.manifest.adapter["kind"] == "lora":
        peft_model_with(bundle, vector).save_pretrained(out)
    else:
        from safetensors.numpy import save_file

        out.mkdir(parents=True, exist_ok=True)
        tensors = bundle.manifest.layout.unflatten(np.asarray(vector, dtype=np.float32))
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / "bitfit.safetensors"))
    return out
