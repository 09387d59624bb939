"""`python -m coordinator keygen|sign|verify`, as the command runs them (run_main): the round trip, and each bad
input refused with one line and exit status 2, nothing written."""

from __future__ import annotations

import pytest

from coordinator.__main__ import main
from fwdfed.cli import run_main
from tests.coordinator.test_without_torch import coordinator_without_torch
from tests.support.fake_bundle import write_fake_bundle


def command(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        run_main(main, list(argv))
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err


@pytest.fixture
def keys(tmp_path, capsys):
    code, out, _ = command(capsys, "keygen", "--out", str(tmp_path / "keys"))
    assert code == 0 and "trust_key.pem" in out
    return tmp_path / "keys" / "signing_key.pem", tmp_path / "keys" / "trust_key.pem"


def test_keygen_sign_verify(tmp_path, keys, capsys):
    private, public = keys
    bundles = [write_fake_bundle(tmp_path / "student"), write_fake_bundle(tmp_path / "teacher")]
    code, out, _ = command(capsys, "sign", "--key", str(private), *map(str, bundles))
    assert code == 0 and out.count("signed ") == 2 and "3 other files covered" in out
    code, out, _ = command(capsys, "verify", "--trust-key", str(public), *map(str, bundles))
    assert code == 0 and out.count("every file intact") == 2


def test_sign_needs_no_torch(tmp_path, keys):
    bundle = write_fake_bundle(tmp_path / "bundle")
    result = coordinator_without_torch("sign", "--key", str(keys[0]), str(bundle))
    assert result.returncode == 0, result.stderr
    assert (bundle / "manifest.sig").is_file()


@pytest.mark.parametrize("argv, refusal", [
    (["keygen", "--out", "{keys}"], "signing_key.pem already exists"),
    (["sign", "--key", "{tmp}/nowhere.pem", "{bundle}"], "signing key {tmp}/nowhere.pem does not exist"),
    (["sign", "--key", "{keys}/trust_key.pem", "{bundle}"], "is a public key: sign with the private key"),
    (["sign", "--key", "{keys}/signing_key.pem", "{tmp}/nothing"], "bundle folder {tmp}/nothing does not exist"),
    (["verify", "--trust-key", "{keys}/signing_key.pem", "{bundle}"], "is a private key"),
    (["verify", "--trust-key", "{keys}/trust_key.pem", "{bundle}"], "is not signed"),
    (["verify", "--trust-key", "{other}/trust_key.pem", "{signed}"], "does not verify with the trusted key"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, keys, capsys, argv, refusal):
    bundle = write_fake_bundle(tmp_path / "bundle")
    signed = write_fake_bundle(tmp_path / "signed")
    assert command(capsys, "sign", "--key", str(keys[0]), str(signed))[0] == 0
    assert command(capsys, "keygen", "--out", str(tmp_path / "other"))[0] == 0
    names = {"tmp": tmp_path, "keys": tmp_path / "keys", "other": tmp_path / "other", "bundle": bundle, "signed": signed}
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, _, err = command(capsys, *(a.format(**names) for a in argv))
    assert code == 2 and err.startswith("error: ") and refusal.format(**names) in err
    assert len(err.strip().splitlines()) == 1, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
