"""Process start-up helpers: every host writes compilation-cache entries; the process start time."""

import subprocess
import time

import pytest
from jax._src import compiler, distributed

from levanter_multihost import runtime


@pytest.fixture
def recorded_cache_writes(monkeypatch):
    """JAX's cache writer replaced by one that records the process id it sees; this process posing as host 3."""
    seen = []
    monkeypatch.setattr(
        compiler, "_cache_write", lambda *args: seen.append((args, distributed.global_state.process_id))
    )
    monkeypatch.setattr(distributed.global_state, "process_id", 3)
    return seen


def test_every_host_writes_its_cache_entries_through_jax_own_writer(recorded_cache_writes):
    assert runtime.let_every_host_write_compilation_cache()
    compiler._cache_write("key", 1.5)
    assert recorded_cache_writes == [(("key", 1.5), 0)]  # JAX's writer sees the id it writes for
    assert distributed.global_state.process_id == 3  # and the host keeps its own


def test_every_host_writes_wraps_once(recorded_cache_writes):
    runtime.let_every_host_write_compilation_cache()
    wrapped = compiler._cache_write
    assert runtime.let_every_host_write_compilation_cache()
    assert compiler._cache_write is wrapped


def test_a_moved_cache_writer_is_left_alone(monkeypatch):
    monkeypatch.delattr(compiler, "_cache_write")
    assert not runtime.let_every_host_write_compilation_cache()
    assert not hasattr(compiler, "_cache_write")


def test_process_start_time_is_exact_to_the_clock_tick():
    before = time.time()
    child = subprocess.Popen(["sleep", "5"])
    try:
        started = runtime.process_started_at(child.pid)
        after = time.time()
    finally:
        child.kill()
        child.wait()
    assert before - 0.05 <= started <= after + 0.05
