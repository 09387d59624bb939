"""The Android app compiled against the real APIs and packaged with Debian's tools (issue 26).

`android_demo/app/build.sh` compiles the core, then the app with `javac -source 8 -target 8
-bootclasspath android.jar -Xlint:all -Werror` against Debian's API 23 android.jar and the
classes.jar of ExecuTorch that react-native-executorch 0.9.3 ships, links the resources and the
manifest with aapt2, adds ExecuTorch's JNI libraries, aligns (zipalign) and signs (apksigner).
Debian has no dexer, so the APKs are shells without classes.dex (android_demo/README.md).

The runtime in that package is not ExecuTorch 1.5.1 (android_demo/README.md): the last test
checks that what the bundle's program needs of a runtime is in the shipped libexecutorch.so for
both ABIs: the program format's identifier, every operator and every backend it delegates to.

The build is skipped, saying what is missing, only where a package or the npm download is
missing; .ci/run installs them.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

APP = ROOT / "android_demo" / "app"
ANDROID_JAR = Path("/usr/lib/android-sdk/platforms/android-23/android.jar")
EXECUTORCH = ROOT / "android_demo" / ".cache" / "react-native-executorch-0.9.3"
ABIS = ("arm64-v8a", "x86_64")
LIBRARIES = [f"lib/{abi}/libexecutorch.so" for abi in ABIS]
# aapt2's one remark about Debian's android.jar (its resources.arsc is deflated); nothing of ours.
AAPT2_JAR_REMARK = "resources.arsc in APK '" + str(ANDROID_JAR) + "' is compressed."
PAGE = 16384


def missing_packages() -> list[str]:
    """What the build needs that is not here, each with how to get it."""
    missing = [f"{tool} (apt-get install {package})" for tool, package in
               [("javac", "openjdk-17-jdk-headless"), ("aapt2", "aapt"), ("aapt", "aapt"), ("zipalign", "zipalign"),
                ("apksigner", "apksigner"), ("zip", "zip")] if shutil.which(tool) is None]
    if not ANDROID_JAR.is_file():
        missing.append(f"{ANDROID_JAR} (android-sdk-platform-23, from Debian unstable)")
    if not (EXECUTORCH / "android" / "libs" / "classes.jar").is_file():
        missing.append(f"ExecuTorch's classes.jar in {EXECUTORCH} (android_demo/app/fetch_executorch.sh)")
    return missing


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    missing = missing_packages()
    if missing:
        pytest.skip("the app's build needs " + "; ".join(missing) + " (.ci/run installs them)")
    out = tmp_path_factory.mktemp("app-build")
    result = subprocess.run(["bash", str(APP / "build.sh")], env={**os.environ, "OUT": str(out)}, cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def shipped_library(abi: str) -> Path:
    return EXECUTORCH / "third-party" / "android" / "libs" / "executorch" / abi / "libexecutorch.so"


def program_needs(pte: Path) -> tuple[bytes, set[str]]:
    """The program's flatbuffer identifier, and the names it looks up in a runtime's registries:
    its operators ("aten::add.out") and the backends of its delegates ("XnnpackBackend")."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    data = pte.read_bytes()
    program = deserialize_pte_binary(data).program
    names = set()
    for plan in program.execution_plan:
        names |= {f"{op.name}.{op.overload}" if op.overload else op.name for op in plan.operators}
        names |= {delegate.id for delegate in plan.delegates}
    return data[4:8], names


def registered(library: bytes, name: str) -> bool:
    """The name is in the library as a C string of its own: NUL-terminated and not the tail of a longer
    name (the linker packs strings: "XnnpackBackend" follows the delegate's 4-byte magic "XH00")."""
    needle = name.encode() + b"\0"
    start = library.find(needle)
    while start != -1:
        before = library[start - 1:start]
        if not (before.isalpha() or before in (b"_", b":", b".")):
            return True
        start = library.find(needle, start + 1)
    return False


def data_offset(apk: Path, info: zipfile.ZipInfo) -> int:
    """Where an entry's bytes start: after its local header (whose extra field may differ from the central one)."""
    with apk.open("rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


@pytest.mark.slow
def test_the_app_compiles_against_android_23_and_executorch_without_a_warning(build):
    out, result = build
    # javac -Xlint:all -Werror: a warning would have failed the build; none is printed either.
    remarks = [line for line in result.stderr.splitlines() if line.strip() and AAPT2_JAR_REMARK not in line]
    assert remarks == [], "\n".join(remarks)
    sources = sorted(p.stem for p in (APP / "src" / "main" / "java").rglob("*.java"))
    classes = {p.stem for p in (out / "classes").rglob("*.class")}
    assert set(sources) <= classes, set(sources) - classes
    assert "R" in classes  # aapt2 link wrote R.java from the resources, and the app compiled with it
    # The app reaches ExecuTorch only through its Module, EValue and Tensor, as ExecuTorchLossProgram does.
    listing = subprocess.run(["javap", "-c", "-p", "-cp", str(out / "classes"), "org.fwdfed.app.ExecuTorchLossProgram"],
                             capture_output=True, text=True, check=True).stdout
    for call in ("org/pytorch/executorch/Module.load:(Ljava/lang/String;I)",
                 "org/pytorch/executorch/Module.forward:([Lorg/pytorch/executorch/EValue;)",
                 "org/pytorch/executorch/Tensor.fromBlob:([J[J)", "org/pytorch/executorch/Tensor.fromBlob:([F[J)",
                 "org/pytorch/executorch/Tensor.getDataAsFloatArray:()[F"):
        assert call in listing, call
    # Isolated loading: the probe's process runs the program through that class, on the core's inputs; the job
    # binds it and asks in one synchronous transaction, whose failure (the process died) is the crash verdict.
    probe = javap(out, "org.fwdfed.app.ProbeService", "org.fwdfed.app.ServiceProbe",
                  "org.fwdfed.app.TrainingJobService")
    for call in ("org/fwdfed/app/ExecuTorchLossProgram.\"<init>\":(Ljava/lang/String;IZ)V",
                 "org/fwdfed/core/ProbeInputs.runOnce:(Lorg/fwdfed/core/LossProgram;)[[F",
                 "android/content/Context.bindService:(Landroid/content/Intent;Landroid/content/ServiceConnection;I)Z",
                 "android/os/IBinder.transact:(ILandroid/os/Parcel;Landroid/os/Parcel;I)Z",
                 "org/fwdfed/app/ServiceProbe.\"<init>\":(Landroid/content/Context;)V"):
        assert call in probe, call


def javap(out: Path, *classes: str) -> str:
    return subprocess.run(["javap", "-c", "-p", "-cp", str(out / "classes"), *classes], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.slow
def test_the_resources_link_and_both_apk_shells_are_aligned_and_the_signed_one_verifies(build):
    out, _ = build
    unsigned, signed = out / "app-unsigned.apk", out / "app-signed.apk"
    for apk in (unsigned, signed):
        names = zipfile.ZipFile(apk).namelist()
        for entry in ("AndroidManifest.xml", "resources.arsc", "res/layout/activity_main.xml", *LIBRARIES):
            assert entry in names, (apk.name, entry)
        assert not any(n.endswith(".dex") for n in names), "Debian has no dexer: the shell carries no code"
        # Stored and 16 KiB-aligned, so the system can map ExecuTorch's libraries from the APK.
        for info in zipfile.ZipFile(apk).infolist():
            if info.filename in LIBRARIES:
                assert info.compress_type == zipfile.ZIP_STORED, info.filename
                assert data_offset(apk, info) % PAGE == 0, (apk.name, info.filename)
        assert subprocess.run(["zipalign", "-c", "-p", "4", str(apk)], capture_output=True, check=False).returncode == 0
    # The libraries are the ones the npm package ships, byte for byte.
    with zipfile.ZipFile(signed) as z:
        for abi in ABIS:
            assert z.read(f"lib/{abi}/libexecutorch.so") == shipped_library(abi).read_bytes()

    verify = subprocess.run(["apksigner", "verify", "--verbose", str(signed)], capture_output=True, text=True,
                            check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "Verified using v2 scheme (APK Signature Scheme v2): true" in verify.stdout
    assert subprocess.run(["apksigner", "verify", str(unsigned)], capture_output=True, check=False).returncode != 0

    badging = subprocess.run(["aapt", "dump", "badging", str(signed)], capture_output=True, text=True,
                             check=True).stdout
    manifest = (APP / "src" / "main" / "AndroidManifest.xml").read_text()
    assert "package: name='org.fwdfed.app'" in badging
    assert 'android:minSdkVersion="26"' in manifest and "sdkVersion:'26'" in badging
    assert "launchable-activity: name='org.fwdfed.app.MainActivity'" in badging
    assert "native-code: 'arm64-v8a' 'x86_64'" in badging
    tree = subprocess.run(["aapt2", "dump", "xmltree", "--file", "AndroidManifest.xml", str(signed)],
                          capture_output=True, text=True, check=True).stdout
    # Only JobScheduler may bind the training job; no cleartext traffic; libraries mapped, not extracted.
    assert '"android.permission.BIND_JOB_SERVICE"' in tree
    # The program's probe: a service of its own process, which no other app may bind.
    probe = tree[tree.index('name(0x01010003)=".ProbeService"'):].split("E: ", 1)[0]
    assert 'process(0x01010011)=":probe"' in probe and "exported(0x01010010)=false" in probe, probe
    assert "usesCleartextTraffic(0x010104ec)=false" in tree
    assert "extractNativeLibs(0x010104ea)=false" in tree


@pytest.mark.slow
def test_the_shipped_runtime_has_what_the_bundles_program_needs(stories_bundle):
    if not shipped_library(ABIS[0]).is_file():
        pytest.skip(f"ExecuTorch's libexecutorch.so is not in {EXECUTORCH} (android_demo/app/fetch_executorch.sh)")
    identifier, names = program_needs(stories_bundle / "model.pte")
    assert "XnnpackBackend" in names and "aten::embedding.out" in names  # what the export lowers to
    for abi in ABIS:
        library = shipped_library(abi).read_bytes()
        assert identifier in library, (abi, identifier)  # the Program schema's file_identifier ("ET12")
        missing = sorted(n for n in names if not registered(library, n))
        assert missing == [], f"{abi}: libexecutorch.so lacks {missing}"
