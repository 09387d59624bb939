"""The Java core's signed bundles (BundleSignature, Manifest.load with a trust key; docs/security.md): bundles the
Python side signed (`coordinator sign`'s sign_bundle), each accepted or refused by the Java device with the very
line the Python device gives, and BundleDevice refusing an unsigned bundle before it opens the program."""

from __future__ import annotations

import shutil

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fwdfed.bundle.manifest import BundleError, load_bundle, sign_bundle
from fwdfed.bundle.signing import SIGNATURE, fingerprint, generate_keys, load_private_key, load_public_key
from tests.conftest import TINYSTORIES
from tests.support.fake_bundle import write_fake_bundle


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


CHANGES = {
    "signed": lambda b: None,
    "manifest": lambda b: (b / "manifest.json").write_text(
        (b / "manifest.json").read_text().replace('"batch_size": 2', '"batch_size": 3')),
    "program": lambda b: flip_last_byte(b / "model.pte"),
    "tokenizer": lambda b: flip_last_byte(b / "tokenizer" / "tokenizer.json"),
    "added file": lambda b: (b / "tokenizer" / "added_tokens.json").write_text("{}"),
    "removed file": lambda b: (b / "adapter_init.f32").unlink(),
    "corrupt signature": lambda b: (b / SIGNATURE).write_bytes(b"\0" * 10),
    "flipped signature": lambda b: flip_last_byte(b / SIGNATURE),
    "unsigned": lambda b: (b / SIGNATURE).unlink(),
}


@pytest.fixture
def keys(tmp_path):
    private, public = generate_keys(tmp_path / "keys")
    return private, public


def test_the_java_device_accepts_and_refuses_what_the_python_device_does_in_the_same_words(java_core, tmp_path, keys):
    private, public = keys
    original = write_fake_bundle(tmp_path / "original")
    sign_bundle(original, load_private_key(private))
    bundles = {}
    for name, change in CHANGES.items():
        bundles[name] = shutil.copytree(original, tmp_path / name.replace(" ", "-"))
        change(bundles[name])
    _, other = generate_keys(tmp_path / "other")
    bundles["another key"] = bundles["signed"]  # checked below with the other key
    python = {}
    for name, bundle in bundles.items():
        key = load_public_key(other if name == "another key" else public)
        try:
            load_bundle(bundle, trust_key=key)
            python[name] = f"ok {bundle}"
        except BundleError as e:
            python[name] = f"error {bundle}: {e}"
    names = [n for n in bundles if n != "another key"]
    lines = java_core.run("SignatureCheck", public, *(bundles[n] for n in names)).stdout.decode().splitlines()
    lines += java_core.run("SignatureCheck", other, bundles["another key"]).stdout.decode().splitlines()
    java = dict(zip([*names, "another key"], lines, strict=True))
    assert java["signed"].startswith("ok ") and all(java[n].startswith("error ") for n in java if n != "signed"), java
    assert java == python


def write_ec_key(path):
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    path.write_bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


@pytest.mark.parametrize("key, refusal", [
    ("keys/signing_key.pem", "is a private key: devices are given the public key (trust_key.pem)"),
    ("ec.pem", "is not an Ed25519 public key"),
])
def test_a_trust_key_that_cannot_be_used_is_one_line(java_core, tmp_path, keys, key, refusal):
    write_ec_key(tmp_path / "ec.pem")
    result = java_core.run("SignatureCheck", tmp_path / key, tmp_path, check=False)
    assert result.returncode == 1
    assert result.stdout.decode().splitlines() == [f"key error: {tmp_path / key} {refusal}"]


def test_bundle_device_opens_a_signed_bundle_and_refuses_an_unsigned_one_before_opening_it(java_core, tmp_path, keys):
    private, public = keys
    signed = write_fake_bundle(tmp_path / "signed")
    sign_bundle(signed, load_private_key(private))
    unsigned = write_fake_bundle(tmp_path / "unsigned")
    lines = java_core.run("BundleDeviceCheck", "--trust-key", public, signed, TINYSTORIES, "phone-0", "none",
                          check=False).stdout.decode().splitlines()
    assert f"opened {signed / 'model.pte'} 2 false" in lines, lines
    result = java_core.run("BundleDeviceCheck", "--trust-key", public, unsigned, TINYSTORIES, "phone-0", "none",
                           check=False)
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 1 and "opener calls 0" in lines, lines
    refusal = (f"error: bundle {unsigned} is not signed (it has no manifest.sig) and this device trusts only bundles "
               f"signed by key {fingerprint(load_public_key(public))}: sign it with `python -m coordinator sign`")
    assert [line for line in lines if line.startswith("error: ")] == [refusal]
