import json

from tests.conftest import run_command


def test_profile_measures_each_mode_in_a_fresh_process_and_writes_the_report(tmp_path, tiny_llama_bundle):
    out = tmp_path / "report"
    result = run_command("device_sdk.profile", "--bundle", str(tiny_llama_bundle), "--modes", "inference", "mezo",
                         "--repeats", "1", "--out", str(out), check=True)
    assert "wrote" in result.stdout
    rows = {r["mode"]: r for r in json.loads((out / "report.json").read_text())}
    assert set(rows) == {"inference", "mezo"}
    for r in rows.values():
        assert r["peak_bytes"] >= r["runtime_bytes"] + r["weights_bytes"] > 100 * 2**20 and r["step_seconds"] > 0
        # the ExecuTorch runtime library is told apart from the program it loads
        assert 10 * 2**20 < r["libraries_bytes"] < r["weights_bytes"]
    assert rows["mezo"]["peak_bytes"] < 1.1 * rows["inference"]["peak_bytes"]  # the same program's memory
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 1 and "peak / inference" in html


def test_profile_needs_inference_to_compare_against(tmp_path, tiny_llama_bundle):
    result = run_command("device_sdk.profile", "--bundle", str(tiny_llama_bundle), "--modes", "mezo",
                         "--out", str(tmp_path))
    assert result.returncode == 2 and "must include inference" in result.stderr


def test_profile_sets_an_emulator_beside_its_full_model(tmp_path, offsite_bundles):
    emulator, full = offsite_bundles
    out = tmp_path / "report"
    result = run_command("device_sdk.profile", "--bundle", str(emulator), "--bundle", str(full), "--modes",
                         "inference", "mezo", "--repeats", "1", "--out", str(out), check=True)
    rows = json.loads((out / "emulator.json").read_text())
    assert [r["mode"] for r in rows] == ["inference", "mezo"]
    measured = {(r["bundle"], r["mode"]): r for r in json.loads((out / "report.json").read_text())}
    for r in rows:
        assert r["kept_layers"] == [0, 2] and r["full_layers"] == 3
        assert r["emulator_peak_bytes"] == measured[str(emulator), r["mode"]]["peak_bytes"]
        assert r["full_step_seconds"] == measured[str(full), r["mode"]]["step_seconds"]
        assert r["peak_ratio"] == r["emulator_peak_bytes"] / r["full_peak_bytes"]
    assert "emulator (blocks [0, 2] of 3) vs full" in result.stdout
    assert "Offsite tuning: emulator vs full model" in (out / "report.html").read_text()
