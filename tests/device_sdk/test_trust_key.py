"""A device given a trust key (DeviceConfig.trust_key, emulate --trust-key) refuses a bundle or teacher its key did
not sign before any program is loaded, and builds on one it did sign; on bundles written by hand."""

from __future__ import annotations

import pytest

from device_sdk import emulate
from device_sdk.client import Device, DeviceConfig
from fwdfed.bundle.manifest import BundleError, sign_bundle
from fwdfed.bundle.signing import generate_keys, load_private_key
from fwdfed.cli import run_main
from runtime.engine import ProgramEngine
from tests.conftest import TINYSTORIES
from tests.support.fake_bundle import write_fake_bundle


class Loaded(Exception):
    """Raised where the device would load a program: the test stops there."""


@pytest.fixture
def loads(monkeypatch):
    """The programs the device tried to load (none is: the stand-in program would not run)."""
    tried = []

    def load(self, program, max_perturbations):
        tried.append(str(program))
        raise Loaded

    monkeypatch.setattr(ProgramEngine, "__init__", load)
    return tried


@pytest.fixture
def setup(tmp_path):
    private, public = generate_keys(tmp_path / "keys")
    signed = write_fake_bundle(tmp_path / "signed")
    sign_bundle(signed, load_private_key(private))
    return signed, public


def config(bundle, trust_key, teacher=None) -> DeviceConfig:
    return DeviceConfig(device_id="trusting-0", coordinator="ws://127.0.0.1:9", bundle=str(bundle),
                        data=str(TINYSTORIES), shard_index=0, shard_count=1, trust_key=str(trust_key),
                        teacher_bundle=str(teacher) if teacher else None,
                        # the load counted here is the device's own: a forked child's would count in the child
                        isolate_load=False)


def test_a_device_loads_the_program_of_a_bundle_signed_by_its_key(setup, loads):
    signed, public = setup
    with pytest.raises(Loaded):
        Device(config(signed, public))
    assert loads == [str(signed / "model.pte")]


@pytest.mark.parametrize("change", ["unsigned", "program"])
def test_a_device_refuses_an_unsigned_or_changed_bundle_before_loading_its_program(tmp_path, setup, loads, change):
    signed, public = setup
    if change == "unsigned":
        bundle = write_fake_bundle(tmp_path / "unsigned")
    else:
        bundle = signed
        (bundle / "model.pte").write_bytes(b"ET12 a program the key's holder never signed")
    with pytest.raises(BundleError, match="is not signed" if change == "unsigned" else "does not match"):
        Device(config(bundle, public))
    assert loads == []


def test_a_device_refuses_an_unsigned_teacher_before_loading_any_program(tmp_path, setup, loads):
    signed, public = setup
    with pytest.raises(BundleError, match="teacher.* is not signed"):
        Device(config(signed, public, teacher=write_fake_bundle(tmp_path / "teacher")))
    assert loads == []


def test_the_emulator_refuses_an_unsigned_bundle_or_a_bad_trust_key_in_one_line(tmp_path, setup, capsys):
    """As `python -m device_sdk.emulate` runs it (run_main): exit status 2, one line, before any device starts."""
    signed, public = setup
    unsigned = write_fake_bundle(tmp_path / "unsigned")
    common = ["--mem", "1GB", "--coordinator", "ws://127.0.0.1:9", "--data", str(TINYSTORIES)]
    for bundle, key, refusal in ((unsigned, public, f"bundle {unsigned} is not signed"),
                                 (signed, tmp_path / "keys" / "signing_key.pem", "is a private key")):
        with pytest.raises(SystemExit) as exited:
            run_main(emulate.main, [*common, "--bundle", str(bundle), "--trust-key", str(key)])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.startswith("error: ") and refusal in err
        assert len(err.strip().splitlines()) == 1, err
