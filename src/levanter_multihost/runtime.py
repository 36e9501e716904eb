"""Process start-up on every host: logging, JAX settings, ``jax.distributed``, and this host's place in the job.

Covers joining the distributed job (Levanter's ``DistributedConfig``, filled from the local launcher's
environment when it set one), the JAX options and compilation cache from ``trainer``, and a per-host phase clock.
Leaves out everything that touches the model or other hosts' data.
"""

import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import jax
from levanter.trainer import TrainerConfig

ENV_COORDINATOR = "LEVANTER_MULTIHOST_COORDINATOR"
ENV_NUM_PROCESSES = "LEVANTER_MULTIHOST_NUM_PROCESSES"
ENV_PROCESS_ID = "LEVANTER_MULTIHOST_PROCESS_ID"
NOISY_LOGGERS = ("levanter.inference", "levanter.compat", "jax._src", "absl")

logger = logging.getLogger("levanter_multihost")


@dataclass
class HostContext:
    """This host's place in the job and its phase clock."""

    host: int
    """``jax.process_index()``."""
    num_hosts: int
    """``jax.process_count()``."""
    started_at: float
    """``time.time()`` when the process was created (before Python imported anything)."""
    phases: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Phase name -> (start, end) in seconds since ``started_at``."""

    @property
    def is_leader(self) -> bool:
        return self.host == 0

    def phase(self, name: str):
        return _Phase(self, name)

    def seconds(self, name: str) -> float:
        start, end = self.phases.get(name, (0.0, 0.0))
        return end - start


class _Phase:
    def __init__(self, ctx: HostContext, name: str):
        self.ctx, self.name = ctx, name

    def __enter__(self):
        self.start = time.time() - self.ctx.started_at
        return self

    def __exit__(self, *exc):
        self.ctx.phases[self.name] = (self.start, time.time() - self.ctx.started_at)
        return False


def distributed_from_env(trainer: TrainerConfig) -> TrainerConfig:
    """Fill ``trainer.distributed`` from the local launcher's environment, unless the config already sets it."""
    dist = trainer.distributed
    if ENV_COORDINATOR not in os.environ or dist.coordinator_address is not None:
        return trainer
    dist = dataclasses.replace(
        dist,
        coordinator_address=os.environ[ENV_COORDINATOR],
        num_processes=int(os.environ[ENV_NUM_PROCESSES]),
        process_id=int(os.environ[ENV_PROCESS_ID]),
    )
    return dataclasses.replace(trainer, distributed=dist)


def start(trainer: TrainerConfig) -> HostContext:
    """Set up logging and JAX, join the distributed job, and return this host's context."""
    started_at = process_started_at()
    ctx_startup = (0.0, time.time() - started_at)
    setup_logging(os.environ.get(ENV_PROCESS_ID, "?"))
    for key, value in trainer.jax_config.items():
        jax.config.update(key, value)
    if trainer.jax_compilation_cache_dir is not None:
        jax.config.update("jax_compilation_cache_dir", trainer.jax_compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    # Host-data-parallel runs no cross-process collective. Without a CPU collectives backend, one that slipped in
    # fails loudly instead of running, and each emulated host's devices talk in-process instead of over TCP.
    jax.config.update("jax_cpu_collectives_implementation", None)
    ctx = HostContext(host=0, num_hosts=1, started_at=started_at, phases={"startup": ctx_startup})
    with ctx.phase("distributed_init"):
        distributed_from_env(trainer).distributed.initialize()
        ctx.host, ctx.num_hosts = jax.process_index(), jax.process_count()
    if jax.config.jax_compilation_cache_dir and ctx.num_hosts > 1:  # from the trainer or JAX's own env variable
        let_every_host_write_compilation_cache()
    setup_logging(str(ctx.host))
    logger.info(
        "host %d of %d (pid %d), %d local devices", ctx.host, ctx.num_hosts, os.getpid(), jax.local_device_count()
    )
    return ctx


def let_every_host_write_compilation_cache() -> bool:
    """Let this host write its own entries to JAX's persistent compilation cache; True if it now does.

    JAX (0.10.2) writes entries from process 0 only, which suits SPMD programs that every process compiles alike.
    Host-data-parallel programs are host-local and their cache keys hold the host's own device ids, so without
    this the other hosts never find an entry and compile the engine on every run (docs/benchmarks.md, section 4).
    Keys differ per host, so no two hosts write the same file, whether the directory is per host or shared.
    Wraps JAX's private ``compiler._cache_write``; does nothing (and says so) if that has moved.
    """
    from jax._src import compiler, distributed

    write = getattr(compiler, "_cache_write", None)
    if write is None or not hasattr(distributed.global_state, "process_id"):
        logger.warning("JAX's compilation-cache writer has moved: only host 0 will write cache entries.")
        return False
    if getattr(write, "every_host", False):
        return True

    def cache_write(*args, **kwargs):
        saved = distributed.global_state.process_id
        distributed.global_state.process_id = 0  # the writer's only check on who writes
        try:
            return write(*args, **kwargs)
        finally:
            distributed.global_state.process_id = saved

    cache_write.every_host = True
    compiler._cache_write = cache_write
    return True


def setup_logging(host: str) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s host {host} %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def exit_now(code: int) -> None:
    """Exit without JAX's shutdown barrier, which waits for every host (up to minutes) when one is dead."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def process_started_at(pid: int | str = "self") -> float:
    """Wall-clock time process ``pid`` (this one by default) was created, to 10 ms (Linux ``/proc``); now, where
    that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()
