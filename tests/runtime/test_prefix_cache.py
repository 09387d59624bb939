"""The device's prefix states: computed once into a float16 memory-mapped file, read by every pass."""

import numpy as np

from fwdfed.bundle.manifest import load_bundle
from fwdfed.memory_plan import plan_memory, prefix_state_bytes
from runtime.engine import ProgramEngine
from runtime.prefix_cache import cache_prefix_states
from tests.conftest import away_from_init
from tests.export.test_split import real_batches


def test_the_states_are_written_once_and_every_pass_then_runs_the_top(tmp_path, split_bundle):
    bundle = load_bundle(split_bundle)
    engine = ProgramEngine.for_bundle(bundle)
    batches = real_batches(bundle, count=10)  # 3 batches of 4, the last padded
    adapter = away_from_init(bundle)
    whole = [engine.losses(b, adapter) for b in batches]
    cache = cache_prefix_states(engine, batches, tmp_path)
    assert cache.passes == 3 and cache.path.is_file()
    stored = np.load(cache.path, mmap_mode="r")
    assert stored.shape == (3, 4, 32, 64) and stored.dtype == np.float16 and cache.bytes == stored.nbytes
    assert cache.bytes == prefix_state_bytes(bundle.manifest, 10)
    for batch, loss in zip(batches, whole):
        assert isinstance(batch.prefix_states, np.memmap)
        np.testing.assert_allclose(engine.losses(batch, adapter), loss, atol=5e-3)


def test_the_memory_plan_counts_the_states(split_bundle):
    bundle = load_bundle(split_bundle)
    plan = plan_memory(bundle, 2**40, 1000, 2, runtime=0)
    assert plan.prefix_states == 1000 * 32 * 64 * 2 and "prefix states" in plan.describe()
    assert plan_memory(bundle, 2**40, 1000, 1, runtime=0, method=None).prefix_states == 0  # inference keeps none
