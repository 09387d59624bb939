"""The manifest's typed records: read and written in one place, strict about their keys, and format 1 migrated."""

from __future__ import annotations

import json

import pytest

from fwdfed.bundle.files import MANIFEST
from fwdfed.bundle.manifest import BundleError, load_bundle
from fwdfed.bundle.schema import FORMAT_VERSION, Manifest, Quantization, Split, Stage
from tests.support.fake_bundle import write_fake_bundle


def manifest_json(**changes) -> dict:
    d = {
        "task": "seq-cls",
        "model": {"source": "m", "folder": "base_model", "hash": "a" * 64, "architecture": "BertForSequenceClassification",
                  "num_labels": 4, "vocab_size": 100, "base_parameters": 1000},
        "adapter": {"kind": "lora", "dim": 8, "initial": "adapter_init.f32", "peft_config": {"r": 2}},
        "layout": [{"name": "w", "shape": [2, 4], "offset": 0}],
        "tokenizer": "tokenizer",
        "inputs": {"batch_size": 4, "seq_len": 16, "max_perturbations": 4},
        "program": {"file": "model.pte", "sha256": "b" * 64, "methods": ["forward", "prefix", "top"],
                    "planned_memory_bytes": {"forward": 10, "top": 4}, "bytes": 123,
                    "split": {"frozen_blocks": 1, "adapted_blocks": 1, "hidden_size": 64, "states_dtype": "float16"},
                    "workspace_bytes": 7, "device_plan_bytes": 99},
        "verification": {"loss_max_abs_diff": 1e-6},
        "emulator": None,
        "format_version": FORMAT_VERSION,
    }
    for key, value in changes.items():
        d[key] = value
    return d


def test_a_manifest_reads_into_typed_records_and_writes_back_the_same_json():
    d = manifest_json(quantization={"scheme": "8da4w", "group_size": 32, "modules": ["a.b"]})
    m = Manifest.from_json(json.dumps(d))
    assert m.program.split == Split(frozen_blocks=1, adapted_blocks=1, hidden_size=64, states_dtype="float16")
    assert m.program.methods == ("forward", "prefix", "top") and "top" in m.program.methods and "logits" not in m.program.methods
    assert m.quantization == Quantization(scheme="8da4w", group_size=32, modules=("a.b",))
    assert (m.model.num_labels, m.inputs.seq_len, m.adapter_dim, m.base_model_hash) == (4, 16, 8, "a" * 64)
    again = Manifest.from_json(m.to_json())
    assert again == m
    written = json.loads(m.to_json())
    assert written["program"]["split"] == d["program"]["split"] and written["format_version"] == FORMAT_VERSION
    with pytest.raises(AttributeError):
        m.program = None  # frozen: an exporter builds a new record


def test_format_1_keeps_a_whole_exports_quantization_under_model_and_a_streamed_ones_under_program():
    d = manifest_json(format_version=1)
    d["model"]["quantization"] = {"scheme": "8da4w", "group_size": 32, "modules": ["x"], "left_fp32": {}}
    whole = Manifest.from_json(json.dumps(d))
    assert whole.quantization == Quantization(scheme="8da4w", group_size=32, modules=("x",))
    assert whole.format_version == FORMAT_VERSION and "quantization" not in json.loads(whole.to_json())["model"]

    stage = {"name": "embed", "file": "embed.pte", "sha256": "c" * 64, "bytes": 5, "adapter": [0, 0],
             "planned_memory_bytes": 3, "quantized": None}
    d = manifest_json(format_version=1, task="causal-lm")
    d["model"]["num_labels"] = None
    d["program"] = {"streamed": True, "file": "stages", "stages": [stage], "methods": ["forward"],
                    "planned_memory_bytes": {"forward": 3}, "bytes": 5, "largest_stage_bytes": 5,
                    "hidden_bytes": 64, "quantization": "8da8w", "mem_budget_bytes": None}
    streamed = Manifest.from_json(json.dumps(d))
    assert streamed.quantization == Quantization(scheme="8da8w")
    assert streamed.program.stages == (Stage(name="embed", file="embed.pte", sha256="c" * 64, bytes=5, adapter=(0, 0),
                                             planned_memory_bytes=3),)
    d["program"]["quantization"] = None
    assert Manifest.from_json(json.dumps(d)).quantization is None


@pytest.mark.parametrize("damage, message", [
    (lambda d: d["program"].update(sha265="x"), "manifest program has no field 'sha265'"),
    (lambda d: d["inputs"].pop("seq_len"), "manifest inputs lacks 'seq_len'"),
    (lambda d: d.update(model=[1]), "manifest model must be an object, got list"),
    (lambda d: d.update(extra=1), "manifest has no field 'extra'"),
    (lambda d: d["program"]["split"].pop("hidden_size"), "manifest program.split lacks 'hidden_size'"),
    (lambda d: d.update(format_version=3), r"manifest format 3 is not supported \(this reader takes 1, 2\)"),
])
def test_a_key_a_record_lacks_or_does_not_have_is_named(damage, message):
    d = manifest_json()
    damage(d)
    with pytest.raises(BundleError, match=f"^{message}"):
        Manifest.from_json(json.dumps(d))


def test_a_format_1_bundle_on_disk_loads_and_a_damaged_record_is_a_one_line_refusal(tmp_path):
    folder = write_fake_bundle(tmp_path / "b")
    d = json.loads((folder / MANIFEST).read_text())
    assert d["format_version"] == FORMAT_VERSION == 2 and d["quantization"] is None
    d["format_version"] = 1
    d["model"]["quantization"] = None
    (folder / MANIFEST).write_text(json.dumps(d))
    assert load_bundle(folder).manifest.quantization is None
    d["program"]["stages"] = ["nope"]
    (folder / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(BundleError, match=r"/manifest.json: manifest program.stages\[0\] must be an object, got str$"):
        load_bundle(folder)
