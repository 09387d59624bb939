"""A bundle folder written by hand, with a stand-in program: for the tests of what is checked before a program
is loaded (signatures, hashes), which need no export. The tokenizer is stories260K's, so a device can be built on
it up to the point where it would load the program."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from fwdfed.bundle.files import INITIAL_ADAPTER, MANIFEST, PROGRAM, TOKENIZER_DIR, sha256_file
from fwdfed.bundle.layout import AdapterLayout
from fwdfed.bundle.schema import AdapterRecord, Inputs, Manifest, ModelRecord, Program
from tests.conftest import STORIES


def write_fake_bundle(folder: Path, program: bytes = b"ET12 not a real program", rank: int = 2) -> Path:
    if not STORIES.is_dir():
        import pytest

        pytest.skip(f"{STORIES} is not here")
    folder.mkdir(parents=True)
    (folder / PROGRAM).write_bytes(program)
    layout = AdapterLayout.from_shapes([("lora_A", (rank, 4)), ("lora_B", (4, rank))])  # d = 8 * rank
    np.zeros(layout.dim, dtype="<f4").tofile(folder / INITIAL_ADAPTER)
    (folder / TOKENIZER_DIR).mkdir()
    shutil.copy(STORIES / "tokenizer.json", folder / TOKENIZER_DIR / "tokenizer.json")
    config = json.loads((STORIES / "tokenizer_config.json").read_text())  # padded as export pads stories260K
    config.update(pad_token="<unk>", padding_side="left")
    (folder / TOKENIZER_DIR / "tokenizer_config.json").write_text(json.dumps(config))
    manifest = Manifest(task="causal-lm",
                        model=ModelRecord(source="fake", folder="base_model", hash="0" * 64, architecture="fake",
                                          vocab_size=512, base_parameters=0),
                        adapter=AdapterRecord(kind="lora", dim=layout.dim, initial=INITIAL_ADAPTER, peft_config=None),
                        layout=layout, tokenizer=TOKENIZER_DIR, inputs=Inputs(batch_size=2, seq_len=16, max_perturbations=2),
                        program=Program(file=PROGRAM, sha256=sha256_file(folder / PROGRAM), methods=("forward",),
                                        planned_memory_bytes={"forward": 1 << 20}, bytes=len(program)))
    (folder / MANIFEST).write_text(manifest.to_json())
    return folder
