"""`python -m export --sign-key`: the written bundle is signed as `coordinator sign` signs it, and a key that cannot
sign is refused in one line before any export work (the export itself is replaced by a bundle written by hand)."""

from __future__ import annotations

import json

import pytest

import export.run
from export.__main__ import main
from fwdfed.bundle.manifest import Manifest, load_bundle
from fwdfed.bundle.signing import generate_keys, load_public_key
from fwdfed.cli import run_main
from tests.support.fake_bundle import write_fake_bundle


@pytest.fixture
def exports(monkeypatch):
    """The specs the export ran for; each writes a bundle by hand."""
    ran = []

    def run_export(spec):
        ran.append(spec)
        write_fake_bundle(spec.out)
        return Manifest.from_json((spec.out / "manifest.json").read_text())

    monkeypatch.setattr(export.run, "run_export", run_export)
    return ran


def run(capsys, *argv):
    with pytest.raises(SystemExit) as exited:
        run_main(main, ["--preset", "tiny-llama", *argv])
    return exited.value.code, capsys.readouterr()


def test_the_exported_bundle_is_signed_with_the_key(tmp_path, exports, capsys):
    private, public = generate_keys(tmp_path / "keys")
    code, out = run(capsys, "--out", str(tmp_path / "bundle"), "--sign-key", str(private))
    assert code == 0 and len(exports) == 1 and f"signed {tmp_path / 'bundle'} with key" in out.out
    assert "files" in json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    load_bundle(tmp_path / "bundle", trust_key=load_public_key(public))


@pytest.mark.parametrize("key", ["nowhere.pem", "keys/trust_key.pem"])
def test_a_key_that_cannot_sign_is_refused_before_the_export(tmp_path, exports, capsys, key):
    generate_keys(tmp_path / "keys")
    code, out = run(capsys, "--out", str(tmp_path / "bundle"), "--sign-key", str(tmp_path / key))
    assert code == 2 and out.err.startswith("error: ") and len(out.err.strip().splitlines()) == 1, out.err
    assert exports == [] and not (tmp_path / "bundle").exists()
