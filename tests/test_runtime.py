"""Process start-up helpers: the process start time, emulated CPU devices, the compile clock."""

import os
import subprocess
import time

from levanter_multihost import runtime


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


def test_a_plain_process_gets_the_devices_its_config_asks_for(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1")
    runtime.emulate_cpu_devices(4)
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=4"
    runtime.emulate_cpu_devices(8)  # the launcher's (or the user's) own count wins
    assert os.environ["XLA_FLAGS"].count("device_count") == 1


def test_compile_clock_counts_compiling_not_running():
    import jax
    import jax.numpy as jnp

    runtime.CompileClock.install()
    f = jax.jit(lambda x: jnp.sin(x) * 3 + x**2)
    before = runtime.CompileClock.seconds()
    f(jnp.arange(7.0)).block_until_ready()
    compiled = runtime.CompileClock.seconds()
    f(jnp.arange(7.0)).block_until_ready()
    assert compiled > before
    assert runtime.CompileClock.seconds() == compiled


def test_the_engines_own_log_is_quiet_unless_asked_for():
    import logging

    from levanter.trainer import TrainerConfig

    runtime.start(TrainerConfig(model_axis_size=1))
    assert logging.getLogger("levanter.inference").getEffectiveLevel() == logging.WARNING
    runtime.start(TrainerConfig(model_axis_size=1), engine_log=True)
    assert logging.getLogger("levanter.inference").getEffectiveLevel() == logging.INFO
    runtime.setup_logging("0")


def test_compile_clock_counts_nested_spans_once(monkeypatch):
    monkeypatch.setattr(runtime.CompileClock, "spans", [(0.0, 10.0), (2.0, 5.0), (8.0, 12.0), (20.0, 21.0)])
    assert runtime.CompileClock.seconds() == 13.0
