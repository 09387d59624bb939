"""A bundle folder's files: their names, how one is hashed and written, and the error a bad one raises.

The lowest floor of fwdfed.bundle: the manifest (fwdfed.bundle.manifest) and the signatures
(fwdfed.bundle.signing) both stand on it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fwdfed.errors import UserError

MANIFEST = "manifest.json"
PROGRAM = "model.pte"
STAGES_DIR = "stages"  # a streamed bundle's programs, one per stage (fwdfed.model.stages)
INITIAL_ADAPTER = "adapter_init.f32"
TOKENIZER_DIR = "tokenizer"
BASE_MODEL_DIR = "base_model"


class BundleError(UserError):
    """A bundle that is missing, corrupt or inconsistent; the message is meant for the user."""


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_whole(path: Path, data: bytes) -> None:
    """Written whole or not at all: a reader never sees half a manifest or signature."""
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_bytes(data)
    os.replace(scratch, path)
