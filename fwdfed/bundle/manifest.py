"""The bundle: `model.pte` plus `manifest.json`, the initial adapter and the tokenizer.

The manifest (fwdfed.bundle.schema) is the contract between the exporter, the devices and the
coordinator: which base model (and its hash), how the adapter vector is laid out, what shapes the
program takes, and how much memory its plan needs. Reading a bundle checks it against itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fwdfed.bundle.files import MANIFEST, BundleError, sha256_file, write_whole
from fwdfed.bundle.schema import Manifest
from fwdfed.bundle.signing import SIGNATURE, check_files, check_signature, covered_files

@dataclass
class Bundle:
    folder: Path
    manifest: Manifest

    @property
    def program_path(self) -> Path:
        return self.folder / self.manifest.program.file

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / self.manifest.tokenizer

    @property
    def base_model_path(self) -> Path:
        folder = Path(self.manifest.model.folder or "")
        return folder if folder.is_absolute() else self.folder / folder

    def initial_adapter(self) -> np.ndarray:
        return read_adapter(self.folder / self.manifest.adapter.initial, self.manifest.adapter_dim)


def read_adapter(path: Path, dim: int) -> np.ndarray:
    raw = path.read_bytes()
    if len(raw) != 4 * dim:
        raise BundleError(f"{path} holds {len(raw)} bytes; an adapter of dimension {dim} needs {4 * dim}")
    return np.frombuffer(raw, dtype="<f4").copy()


# Bounds on the program's input shapes: what a phone can run, far above what an export makes. A
# manifest past them is damaged, and must be refused before its shapes size any allocation.
INPUT_LIMITS = {"batch_size": 4096, "seq_len": 1 << 16, "max_perturbations": 4096}


def check_inputs(manifest: Manifest, path: Path) -> None:
    for name, limit in INPUT_LIMITS.items():
        value = getattr(manifest.inputs, name)
        if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= limit):
            raise BundleError(f"{path}: inputs.{name} must be an integer in [1, {limit}], got {value!r}")


def check_stages(bundle: Bundle, manifest_path: Path) -> None:
    """Every stage program of a streamed bundle is present and intact, and the blocks' adapter slices
    tile the adapter vector in order."""
    stages = bundle.manifest.program.stages
    if len(stages) < 3:
        raise BundleError(f"{manifest_path}: a streamed program needs its stages (embedding, blocks, head)")
    expected = 0
    for stage in stages:
        start, stop = stage.adapter
        if start != stop and start != expected:
            raise BundleError(f"{manifest_path}: stage {stage.name}'s adapter slice [{start}, {stop}) does not "
                              "follow the previous stage's")
        expected = max(expected, stop)
        path = bundle.program_path / stage.file
        if not path.is_file():
            raise BundleError(f"bundle stage program {path} is missing")
        if path.stat().st_size != stage.bytes or sha256_file(path) != stage.sha256:
            raise BundleError(f"{path} does not match the manifest's sha256: the file is corrupt or from another "
                              "export")
    if expected != bundle.manifest.adapter_dim:
        raise BundleError(f"{manifest_path}: the stages' adapter slices cover {expected} of the adapter's "
                          f"{bundle.manifest.adapter_dim} entries")


def load_bundle(folder: str | Path, check_program: bool = True, trust_key=None) -> Bundle:
    """Read and check a bundle folder; raises BundleError with a one-line reason.

    With `trust_key` (an Ed25519 public key, fwdfed.bundle.signing.load_public_key) the manifest's
    signature is checked before the manifest is parsed, and every file against the signed manifest
    before the program's own hashes: an unsigned, wrongly signed or changed bundle is refused before
    any of its other files is read."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"bundle folder {folder} does not exist")
    if not manifest_path.is_file():
        raise BundleError(f"{folder} is not a bundle: it has no {MANIFEST}")
    raw = manifest_path.read_bytes()  # read once: the bytes checked are the bytes parsed
    if trust_key is not None:
        check_signature(folder, raw, trust_key)
    try:
        manifest = Manifest.from_json(raw.decode("utf-8"))
    except BundleError as e:
        raise BundleError(f"{manifest_path}: {e}") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError) as e:
        raise BundleError(f"{manifest_path} is not a valid manifest: {e}") from None
    if trust_key is not None:
        try:
            check_files(folder, manifest)
        except (KeyError, TypeError, AttributeError) as e:
            raise BundleError(f"{manifest_path}: its program or files are malformed ({e!r})") from None
    bundle = Bundle(folder, manifest)
    check_inputs(manifest, manifest_path)
    if manifest.adapter.dim != manifest.adapter_dim:
        raise BundleError(f"{manifest_path}: adapter dim {manifest.adapter.dim} disagrees with its layout")
    if check_program and manifest.streamed:
        try:
            check_stages(bundle, manifest_path)
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{manifest_path}: a stage of the streamed program is malformed ({e!r})") from None
    elif check_program:
        program = bundle.program_path
        if not program.is_file():
            raise BundleError(f"bundle program {program} is missing")
        if sha256_file(program) != manifest.program.sha256:
            raise BundleError(f"{program} does not match the manifest's sha256: the file is corrupt or from another export")
    initial = folder / manifest.adapter.initial
    if not initial.is_file():
        raise BundleError(f"bundle has no initial adapter ({initial.name})")
    bundle.initial_adapter()  # checks its size
    return bundle


def sign_bundle(folder: Path, key: Ed25519PrivateKey) -> dict[str, dict]:
    """Cover every file of the bundle in its manifest and sign the manifest. The bundle is checked first
    (`load_bundle`: the program's hashes, the adapter's size), so a damaged bundle is never signed.
    Returns the files covered besides the program."""
    folder = Path(folder)
    manifest = load_bundle(folder).manifest
    manifest = replace(manifest, files=covered_files(folder, manifest))
    text = (manifest.to_json() + "\n").encode()
    write_whole(folder / MANIFEST, text)
    write_whole(folder / SIGNATURE, key.sign(text))
    return manifest.files
