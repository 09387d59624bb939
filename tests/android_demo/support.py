"""Driving the Java core from pytest: compile it, run its tools, and replay a Java device's tasks
through the Python device to compare their updates.

The project-internal imports are kept here, at the top, so that a refactoring can rewrite them
in one place: the Python device (`device_sdk.client`) and the protocol (`fwdfed.protocol`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from device_sdk.client import Device, DeviceConfig
from fwdfed import protocol
from tests.conftest import ROOT

CORE = ROOT / "android_demo" / "core" / "src"
# Debian's jars (libmsgpack-java, libokhttp-java with libokio-java); .ci/run installs them.
JARS = [Path("/usr/share/java") / name for name in ("msgpack-core.jar", "okhttp.jar", "okio.jar")]
LOSS_HELPER = Path(__file__).with_name("loss_helper.py")
HELPER_COMMAND = f"{sys.executable} {LOSS_HELPER}"
MASK64 = (1 << 64) - 1


class JavaCore:
    """The compiled core (main and test sources) and a way to run its tools."""

    def __init__(self, classes: Path):
        self.classpath = os.pathsep.join([str(classes), *map(str, JARS)])

    def command(self, main: str, *args: str) -> list[str]:
        return ["java", "-Xmx512m", "-cp", self.classpath, f"org.fwdfed.core.{main}", *map(str, args)]

    def run(self, main: str, *args: str, timeout: float = 300, check: bool = True,
            stdin: bytes | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(self.command(main, *args), cwd=ROOT, capture_output=True, timeout=timeout, input=stdin,
                                check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{main} failed ({result.returncode}):\n{result.stdout.decode()[-3000:]}\n"
                                 f"{result.stderr.decode()[-3000:]}")
        return result

    def popen(self, main: str, *args: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(main, *args), cwd=ROOT, **kwargs)


def compile_core(out: Path) -> JavaCore:
    """javac --release 17 over every source of android_demo/core; the test sources see the main ones."""
    if not shutil.which("javac"):
        import pytest

        pytest.skip("no JDK here (javac); .ci/run installs openjdk-17-jdk-headless")
    missing = [str(j) for j in JARS if not j.is_file()]
    if missing:
        raise AssertionError(f"missing {', '.join(missing)}: apt-get install libmsgpack-java libokhttp-java "
                             "libokio-java (.ci/run does)")
    sources = sorted(str(p) for p in CORE.rglob("*.java"))
    subprocess.run(["javac", "--release", "17", "-Xlint:all", "-Werror", "-d", str(out), "-cp",
                    os.pathsep.join(map(str, JARS)), *sources], check=True, capture_output=True, text=True)
    return JavaCore(out)


# ---- the Java device's seeds, as android_demo/core's SeedStream draws them ----

def _mix64(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def java_seed_stream(device_seed: int, round_: int, wave: int, device_id: str):
    """The seeds a Java device draws for one task: SplitMix64 words keyed by (seed, round, wave,
    crc32(id)), each shifted right by one (SeedStream.java documents the formula)."""
    key = _mix64(device_seed & MASK64)
    key = _mix64(key ^ round_)
    key = _mix64(key ^ wave)
    key = _mix64(key ^ zlib.crc32(device_id.encode())) & ((1 << 63) - 1)
    i = 0
    while True:
        yield _mix64((key + (i + 1) * 0x9E3779B97F4A7C15) & MASK64) >> 1
        i += 1


class ReplayedSeeds:
    """Stands in for numpy's Generator where the Python methods draw seeds (`rng.integers(0, 2^63, size=n)`),
    or indices into a task's seed pool (`rng.integers(0, K, size=n)`: the Java device's SeedPool takes its
    stream's next seed mod K)."""

    def __init__(self, stream):
        self.stream = stream

    def integers(self, low, high, size, dtype=np.int64):
        return np.array([low + next(self.stream) % (high - low) for _ in range(int(size))], dtype=np.int64)


@contextmanager
def seeds_of_java_device(device_id: str, device_seed: int = 0):
    """While active, the Python device's generator for a task draws the Java device's seeds for it.
    The Python device seeds `np.random.default_rng([seed, round, wave, crc32(id)])`; the same
    (round, wave) key the Java stream."""
    original = np.random.default_rng

    def replaying(key=None, *args, **kwargs):
        if isinstance(key, (list, tuple)) and len(key) == 4:
            _, round_, wave, _ = (int(k) for k in key)
            return ReplayedSeeds(java_seed_stream(device_seed, round_, wave, device_id))
        return original(key, *args, **kwargs)

    np.random.default_rng = replaying
    try:
        yield
    finally:
        np.random.default_rng = original


def python_device(bundle: Path, data: Path, device_id: str, shard_index: int, shard_count: int) -> Device:
    """The Python device the Java one is compared with: same bundle, data, shard and id."""
    return Device(DeviceConfig(device_id=device_id, coordinator="ws://127.0.0.1:9", bundle=str(bundle),
                               data=str(data), shard_index=shard_index, shard_count=shard_count))


def replay(device: Device, task_frame: bytes) -> protocol.Update:
    """The Python device's update for this task frame, drawing the Java device's seeds. Frames are given in the
    order the Java device got them: a seed-form task (docs/protocol.md) is replayed onto the adapter the Python
    device kept from the one before, as the Java device replayed it."""
    task = device.task_adapter(protocol.decode(task_frame))
    with seeds_of_java_device(device.config.device_id, device.config.seed):
        update = device.train(task)
    device.keep(task)
    return update


def assert_same_update(java: protocol.Update, python: protocol.Update) -> int:
    """Same pairs (seeds exactly; coefficients within float tolerance), scale, examples and
    losses; returns how many coefficients were bit-identical."""
    assert java.task_id == python.task_id
    assert java.seeds == python.seeds, "the replay draws the Java device's seeds: they must be the same"
    # A coefficient is a difference of two losses over 2 eps: the float noise of a program called with
    # different numbers of adapter copies (the Java device asks for one direction a call, the Python
    # device for all at once) is magnified by 1/eps. The chunked causal-LM loss gave 4.5e-5 relative.
    np.testing.assert_allclose(java.coefs, python.coefs, rtol=1e-4, atol=1e-12)
    assert java.scale == pytest_approx(python.scale)
    assert java.num_examples == python.num_examples
    assert java.loss_before == pytest_approx(python.loss_before)
    assert java.loss_after == pytest_approx(python.loss_after)
    return int(np.sum(np.array(java.coefs) == np.array(python.coefs)))


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-6, abs=1e-9)


def decode(frame: bytes) -> protocol.Message:
    return protocol.decode(frame)
