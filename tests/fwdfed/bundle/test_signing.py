"""Signed bundles (fwdfed.bundle.signing): what a trust key lets through and what it refuses, each refusal one line,
on a bundle written by hand (its program a stand-in: nothing here loads one)."""

from __future__ import annotations

import json
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fwdfed.bundle.manifest import BundleError, load_bundle, sign_bundle
from fwdfed.bundle.signing import (
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    SIGNATURE,
    SigningError,
    generate_keys,
    load_private_key,
    load_public_key,
)
from tests.support.fake_bundle import write_fake_bundle


@pytest.fixture
def keys(tmp_path):
    private, public = generate_keys(tmp_path / "keys")
    return load_private_key(private), load_public_key(public)


@pytest.fixture
def signed(tmp_path, keys):
    folder = write_fake_bundle(tmp_path / "bundle")
    sign_bundle(folder, keys[0])
    return folder


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_replaces_one(tmp_path):
    private, public = generate_keys(tmp_path / "keys")
    assert (private.name, public.name) == (PRIVATE_KEY_FILE, PUBLIC_KEY_FILE)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    before = private.read_bytes()
    with pytest.raises(SigningError, match="already exists"):
        generate_keys(tmp_path / "keys")
    assert private.read_bytes() == before


def test_a_signed_bundle_loads_with_its_key_and_its_manifest_covers_every_other_file(signed, keys):
    manifest = json.loads((signed / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["adapter_init.f32", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]
    assert len((signed / SIGNATURE).read_bytes()) == 64
    assert load_bundle(signed, trust_key=keys[1]).manifest.files == manifest["files"]


def test_without_a_trust_key_an_unsigned_bundle_loads_as_before(tmp_path):
    load_bundle(write_fake_bundle(tmp_path / "bundle"))


def test_an_unsigned_bundle_is_refused_by_a_device_with_a_trust_key(tmp_path, keys):
    with pytest.raises(BundleError, match="is not signed"):
        load_bundle(write_fake_bundle(tmp_path / "bundle"), trust_key=keys[1])


def tamper_manifest(folder):
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text.replace('"batch_size": 2', '"batch_size": 3'))


def tamper_program_and_its_hash(folder):
    """What an attacker who can rewrite the bundle would do: a new program, its sha256 in the manifest."""
    from fwdfed.bundle.manifest import sha256_file

    (folder / "model.pte").write_bytes(b"ET12 another program")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["program"]["sha256"] = sha256_file(folder / "model.pte")
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def add_tokenizer_file(folder):
    (folder / "tokenizer" / "added_tokens.json").write_text("{}")


@pytest.mark.parametrize("tamper, refusal", [
    (tamper_manifest, "manifest.sig does not verify with the trusted key"),
    (tamper_program_and_its_hash, "manifest.sig does not verify with the trusted key"),
    (lambda f: flip_last_byte(f / "model.pte"), "model.pte does not match the manifest's sha256"),
    (lambda f: flip_last_byte(f / "tokenizer" / "tokenizer.json"), "tokenizer.json does not match the signed"),
    (lambda f: flip_last_byte(f / "adapter_init.f32"), "adapter_init.f32 does not match the signed"),
    (lambda f: (f / "tokenizer" / "tokenizer_config.json").unlink(), "tokenizer_config.json, which the signed"),
    (add_tokenizer_file, "added_tokens.json is not in the signed manifest"),
    (lambda f: flip_last_byte(f / SIGNATURE), "manifest.sig does not verify with the trusted key"),
    (lambda f: (f / SIGNATURE).write_bytes(b"\0" * 10), "manifest.sig is corrupt: 10 bytes"),
    (lambda f: (f / SIGNATURE).unlink(), "is not signed"),
])
def test_a_changed_signed_bundle_is_refused_in_one_line(signed, keys, tamper, refusal):
    load_bundle(signed, trust_key=keys[1])
    tamper(signed)
    with pytest.raises(BundleError, match=refusal) as refused:
        load_bundle(signed, trust_key=keys[1])
    assert "\n" not in str(refused.value)


def test_a_bundle_signed_by_another_key_is_refused(signed, tmp_path):
    _, other = generate_keys(tmp_path / "other")
    with pytest.raises(BundleError, match="does not verify with the trusted key .*or another key signed it"):
        load_bundle(signed, trust_key=load_public_key(other))


def test_signing_again_covers_the_files_as_they_are_now(signed, keys):
    add_tokenizer_file(signed)
    sign_bundle(signed, keys[0])
    assert "tokenizer/added_tokens.json" in load_bundle(signed, trust_key=keys[1]).manifest.files


def test_a_damaged_bundle_or_a_link_in_it_is_not_signed(tmp_path, keys):
    damaged = write_fake_bundle(tmp_path / "damaged")
    flip_last_byte(damaged / "model.pte")
    with pytest.raises(BundleError, match="does not match the manifest's sha256"):
        sign_bundle(damaged, keys[0])
    linked = write_fake_bundle(tmp_path / "linked")
    os.symlink(linked / "adapter_init.f32", linked / "tokenizer" / "vocab.txt")
    with pytest.raises(SigningError, match="vocab.txt is a symbolic link"):
        sign_bundle(linked, keys[0])
    assert not (damaged / SIGNATURE).exists() and not (linked / SIGNATURE).exists()


def write_ec_keys(folder):
    key = ec.generate_private_key(ec.SECP256R1())
    (folder / "ec.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    (folder / "ec.pub.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


@pytest.mark.parametrize("load, name, refusal", [
    (load_private_key, "missing.pem", "signing key .*missing.pem does not exist"),
    (load_public_key, "missing.pem", "trust key .*missing.pem does not exist"),
    (load_private_key, "keys/trust_key.pem", "is a public key: sign with the private key"),
    (load_public_key, "keys/signing_key.pem", "is a private key: devices are given the public key"),
    (load_private_key, "ec.pem", "holds a key of type EC, not Ed25519"),
    (load_public_key, "ec.pub.pem", "holds a key of type EC, not Ed25519"),
    (load_private_key, "garbage.pem", "is not an unencrypted PEM private key"),
    (load_public_key, "garbage.pem", "is not a PEM public key"),
])
def test_a_key_that_cannot_be_used_is_refused_in_one_line(tmp_path, load, name, refusal):
    generate_keys(tmp_path / "keys")
    write_ec_keys(tmp_path)
    (tmp_path / "garbage.pem").write_bytes(b"not a key\n")
    with pytest.raises(SigningError, match=refusal) as refused:
        load(tmp_path / name)
    assert "\n" not in str(refused.value)
