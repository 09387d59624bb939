"""Signed bundles: an Ed25519 signature of the manifest's exact bytes, and the manifest covering every file.

The operator makes a key pair once (`python -m coordinator keygen`), signs each bundle
(`python -m coordinator sign`), and provisions devices with the public key (`--trust-key`).
`sign_bundle` (in fwdfed.bundle.manifest, which reads and writes manifests) adds `files` to the
manifest, the sha256 and size of every file of the bundle that `program` does not already hash
(the initial adapter, the tokenizer, a preset's base model), and writes `manifest.sig`: the 64-byte signature (RFC 8032) of `manifest.json` as it is on disk. A
device given a trust key checks the signature before it parses the manifest, then every file
against it, and refuses a file the manifest does not list: so nothing it reads from the bundle,
the program least of all, is read before it is known to be what the key's holder signed.
docs/security.md describes the format for other device implementations.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fwdfed.bundle.files import MANIFEST, BundleError, sha256_file, write_whole
from fwdfed.cli import write_private

if TYPE_CHECKING:
    from fwdfed.bundle.schema import Manifest

SIGNATURE = "manifest.sig"
SIGNATURE_BYTES = 64
PRIVATE_KEY_FILE = "signing_key.pem"  # the operator's; mode 0600
PUBLIC_KEY_FILE = "trust_key.pem"  # what devices are provisioned with (`--trust-key`)


class SigningError(BundleError):
    """A key that cannot be used, or a bundle that cannot be signed; the message is meant for the user."""


def fingerprint(key: Ed25519PublicKey) -> str:
    """The public key's 32 raw bytes in hex, first 16 digits: enough to tell keys apart in a message."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()[:16]


def generate_keys(folder: Path) -> tuple[Path, Path]:
    """A new key pair in `folder`: the private key (PKCS#8 PEM, mode 0600) and the public key
    (SubjectPublicKeyInfo PEM). An existing key is never overwritten: bundles signed with it would be orphaned."""
    private_path, public_path = folder / PRIVATE_KEY_FILE, folder / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise SigningError(f"{path} already exists: move it away first (keygen never replaces a key)")
    folder.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_private(private_path, private.decode("ascii"))
    write_whole(public_path, public)
    return private_path, public_path


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SigningError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise SigningError(f"cannot read {what} {path}: {e.strerror or e}") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = _read_key_file(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        if b"PUBLIC KEY" in data:
            raise SigningError(f"{path} is a public key: sign with the private key ({PRIVATE_KEY_FILE} from "
                               "`python -m coordinator keygen`)") from None
        raise SigningError(f"{path} is not an unencrypted PEM private key (make one with "
                           "`python -m coordinator keygen`)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} holds a key of type {_kind(key)}, not Ed25519")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = _read_key_file(path, "trust key")
    if b"PRIVATE KEY" in data:
        # Said outright: a device must never hold the signing key, so this is refused, not derived from.
        raise SigningError(f"{path} is a private key: devices are given the public key ({PUBLIC_KEY_FILE})")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SigningError(f"{path} is not a PEM public key ({PUBLIC_KEY_FILE} from "
                           "`python -m coordinator keygen`)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path} holds a key of type {_kind(key)}, not Ed25519")
    return key


def _kind(key) -> str:
    """RSA, EC, Ed448, DSA, X25519, ...: the key class's name without its suffix."""
    return type(key).__name__.removesuffix("PrivateKey").removesuffix("PublicKey").lstrip("_")


def program_files(folder: Path, manifest: Manifest) -> set[str]:
    """The bundle paths (relative, '/'-separated) of the program files that `program` hashes itself."""
    program = manifest.program
    if program.streamed:
        return {f"{program.file}/{stage.file}" for stage in program.stages}
    return {program.file}


def bundle_files(folder: Path) -> list[str]:
    """Every regular file under `folder` (relative, '/'-separated, sorted); a link is refused: what it
    points at could change after signing without the bundle changing."""
    found = []
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(root) / name
            if path.is_symlink():
                raise SigningError(f"{path} is a symbolic link: a signed bundle holds its files themselves")
        found.extend((Path(root) / name).relative_to(folder).as_posix() for name in names)
    return sorted(found)


def covered_files(folder: Path, manifest: Manifest) -> dict[str, dict]:
    """The `files` entry for `folder`: sha256 and size of every file but the manifest, its signature and the
    program files `program` hashes."""
    skip = {MANIFEST, SIGNATURE} | program_files(folder, manifest)
    return {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
            for name in bundle_files(folder) if name not in skip}


def check_signature(folder: Path, manifest_bytes: bytes, key: Ed25519PublicKey) -> None:
    """`manifest_bytes` (the manifest as read, before it is parsed) are signed by `key` in `folder`'s manifest.sig."""
    path = folder / SIGNATURE
    if not path.is_file():
        raise BundleError(f"bundle {folder} is not signed (it has no {SIGNATURE}) and this device trusts only "
                          f"bundles signed by key {fingerprint(key)}: sign it with `python -m coordinator sign`")
    signature = path.read_bytes()
    if len(signature) != SIGNATURE_BYTES:
        raise BundleError(f"{path} is corrupt: {len(signature)} bytes, an Ed25519 signature has {SIGNATURE_BYTES}")
    try:
        key.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise BundleError(f"{path} does not verify with the trusted key {fingerprint(key)}: the manifest was changed "
                          "since it was signed, or another key signed it") from None


def check_files(folder: Path, manifest: Manifest) -> None:
    """Every file the signed manifest lists is there and intact, and the bundle holds no file it does not list
    (the program files are checked against `program` by `load_bundle`)."""
    files = manifest.files
    if not isinstance(files, dict):
        raise BundleError(f"{folder / MANIFEST} is signed but lists no files: sign it again with "
                          "`python -m coordinator sign`")
    known = {MANIFEST, SIGNATURE} | program_files(folder, manifest) | set(files)
    unlisted = [name for name in bundle_files(folder) if name not in known]
    if unlisted:
        raise BundleError(f"{folder / unlisted[0]} is not in the signed manifest"
                          + (f" (nor are {len(unlisted) - 1} more files)" if len(unlisted) > 1 else "")
                          + ": the bundle was changed since it was signed")
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{path}, which the signed manifest lists, is missing")
        if not isinstance(entry, dict) or path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
            raise BundleError(f"{path} does not match the signed manifest's sha256: the file was changed since the "
                              "bundle was signed")
