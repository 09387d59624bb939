"""The operator's bundle-signing commands: `keygen`, `sign` and `verify` (fwdfed.bundle.signing; docs/security.md).

    python -m coordinator keygen --out keys
    python -m coordinator sign --key keys/signing_key.pem bundles/stories
    python -m coordinator verify --trust-key keys/trust_key.pem bundles/stories

They need no torch: the signing host may be one that never runs a program.
"""

from __future__ import annotations

from pathlib import Path


def add_commands(commands) -> None:
    k = commands.add_parser("keygen", help="make the operator's Ed25519 bundle-signing key pair")
    k.add_argument("--out", type=Path, required=True,
                   help="folder for signing_key.pem (private, mode 0600) and trust_key.pem (for the devices)")
    s = commands.add_parser("sign", help="cover every file of bundles in their manifests and sign the manifests")
    s.add_argument("--key", type=Path, required=True, help="the private key (signing_key.pem from keygen)")
    s.add_argument("bundle", type=Path, nargs="+", help="bundle folders (a student, its teacher, ...)")
    v = commands.add_parser("verify", help="check bundles as a device given --trust-key does, loading no program")
    v.add_argument("--trust-key", type=Path, required=True, help="the public key (trust_key.pem from keygen)")
    v.add_argument("bundle", type=Path, nargs="+")


def keygen(args) -> int:
    from fwdfed.bundle.signing import fingerprint, generate_keys, load_public_key

    private, public = generate_keys(args.out)
    print(f"wrote {private} (keep it secret) and {public} (key {fingerprint(load_public_key(public))}: "
          "give it to the devices, --trust-key)")
    return 0


def sign(args) -> int:
    from fwdfed.bundle.manifest import sign_bundle
    from fwdfed.bundle.signing import SIGNATURE, fingerprint, load_private_key

    key = load_private_key(args.key)  # a bad key is refused before any bundle is touched
    for folder in args.bundle:
        files = sign_bundle(folder, key)
        print(f"signed {folder} with key {fingerprint(key.public_key())}: {folder / SIGNATURE}, the program and "
              f"{len(files)} other files covered")
    return 0


def verify(args) -> int:
    from fwdfed.bundle.manifest import load_bundle
    from fwdfed.bundle.signing import fingerprint, load_public_key

    key = load_public_key(args.trust_key)
    for folder in args.bundle:
        load_bundle(folder, trust_key=key)
        print(f"{folder}: signed by {fingerprint(key)}, every file intact")
    return 0
