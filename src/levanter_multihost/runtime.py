"""Process start-up on every host: logging, JAX settings, ``jax.distributed``, and this host's clocks.

Covers joining the distributed job (Levanter's ``DistributedConfig``, filled from the local launcher's
environment when it set one), the JAX options and compilation cache from ``trainer``, emulated CPU devices for a
plain process, a per-host phase clock and a clock of the time JAX spends compiling. Leaves out everything that
touches the model or other hosts' data.
"""

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import jax
from levanter.trainer import TrainerConfig

from levanter_multihost import processes, seams
from levanter_multihost.errors import ConfigError
from levanter_multihost.launch_env import ENV_COORDINATOR, ENV_LAUNCHER, ENV_NUM_PROCESSES, ENV_PROCESS_ID

NOISY_LOGGERS = ("levanter.inference", "levanter.compat", "jax._src", "absl", "tqdm_loggable")
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
"""JAX's own duration events for tracing, lowering and compiling (or fetching from the persistent cache)."""

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
    phases: dict[str, list[list[float]]] = field(default_factory=dict)
    """Phase name -> its [start, end] spans in seconds since ``started_at`` (batch phases repeat)."""

    @property
    def is_leader(self) -> bool:
        return self.host == 0

    def now(self) -> float:
        return time.time() - self.started_at

    def add(self, name: str, start: float, end: float) -> None:
        self.phases.setdefault(name, []).append([start, end])

    @contextlib.contextmanager
    def phase(self, name: str):
        start = self.now()
        try:
            yield
        finally:
            self.add(name, start, self.now())

    def seconds(self, name: str) -> float:
        return sum(end - start for start, end in self.phases.get(name, []))


class Stopped(BaseException):
    """This host was asked to stop (SIGTERM, SIGINT); what it finished is durable."""

    def __init__(self, signum: int):
        super().__init__(
            f"Stopped by signal {signal.Signals(signum).name}: this host's finished batches are durable "
            "in the run directory; rerun with resume: true."
        )
        self.signum = signum


def stop_on_signals() -> None:
    """SIGTERM and SIGINT raise :class:`Stopped` in the main thread. ``jax.distributed`` installs a preemption
    notifier that swallows SIGTERM; this replaces it, so that a host asked to stop does (cleanly, between writes)."""

    def stop(signum, frame):
        raise Stopped(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


class CompileClock:
    """Seconds JAX has spent tracing, lowering and compiling in this process, from JAX's monitoring events.

    Events nest (tracing a jitted function traces the jitted functions it calls, and each reports its own
    duration), so the clock counts the union of their time spans, never a second twice.
    """

    spans: list[tuple[float, float]] = []
    _lock = threading.Lock()
    _installed = False

    @classmethod
    def install(cls) -> None:
        if not cls._installed:
            jax.monitoring.register_event_duration_secs_listener(cls._record)
            cls._installed = True

    @classmethod
    def _record(cls, event: str, duration: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:
            end = time.monotonic()
            with cls._lock:
                cls.spans.append((end - duration, end))

    @classmethod
    def seconds(cls) -> float:
        with cls._lock:
            spans = sorted(cls.spans)
        total, reached = 0.0, float("-inf")
        for start, end in spans:
            if end > reached:
                total += end - max(start, reached)
                reached = end
        return total


def distributed_from_env(trainer: TrainerConfig) -> TrainerConfig:
    """Fill ``trainer.distributed`` from the local launcher's environment, unless the config already sets it."""
    dist = trainer.distributed
    if ENV_COORDINATOR not in os.environ or dist.coordinator_address is not None:
        return trainer
    check_launched_here()
    dist = dataclasses.replace(
        dist,
        coordinator_address=os.environ[ENV_COORDINATOR],
        num_processes=int(os.environ[ENV_NUM_PROCESSES]),
        process_id=int(os.environ[ENV_PROCESS_ID]),
    )
    return dataclasses.replace(trainer, distributed=dist)


def check_launched_here() -> None:
    """The launcher's variables must come from a launcher this process runs under: left in a shell, they would
    make a plain process wait for a coordinator that is gone, silently."""
    pid, _, started = os.environ.get(ENV_LAUNCHER, "").partition(":")
    if pid.isdigit() and processes.runs_under(int(pid), int(started) if started.isdigit() else None):
        return
    names = [n for n in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID, ENV_LAUNCHER) if n in os.environ]
    raise ConfigError(
        f"{', '.join(names)} are set, but no running infra/launch.py started this process (launcher "
        f"{os.environ.get(ENV_LAUNCHER, 'not named')}): they are stale, left in the environment. Run "
        f"`unset {' '.join(names)}`, or start the job through infra/launch.py."
    )


def emulate_cpu_devices(count: int) -> None:
    """Give JAX's CPU backend ``count`` devices unless a device count is already set (the local launcher sets
    one per host); a plain process then runs a config written for a host of ``count`` chips. Must run before the
    backend starts; it has no effect on TPU or GPU devices."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def start(
    trainer: TrainerConfig, handle_signals: bool = False, engine_log: bool = False, cross_host_mesh: bool = False
) -> HostContext:
    """Set up logging and JAX, join the distributed job, and return this host's context; with ``handle_signals``
    (the command line), SIGTERM and SIGINT stop this host cleanly (:func:`stop_on_signals`); ``engine_log`` keeps
    Levanter's engine logging its decode rounds; ``cross_host_mesh`` (``hosts_per_replica`` other than 1) gives
    CPU devices collectives across processes."""
    started_at = process_started_at()
    startup = [0.0, time.time() - started_at]
    setup_logging(os.environ.get(ENV_PROCESS_ID, "?"))
    emulate_cpu_devices(trainer.model_axis_size)
    for key, value in trainer.jax_config.items():
        jax.config.update(key, value)
    if trainer.jax_compilation_cache_dir is not None:
        jax.config.update("jax_compilation_cache_dir", trainer.jax_compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    # Host-data-parallel runs no cross-process collective. Without a CPU collectives backend, one that slipped in
    # fails loudly instead of running, and each emulated host's devices talk in-process instead of over TCP. A
    # replica over several hosts needs them: gloo, over the distributed job's store (no effect on TPU or GPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo" if cross_host_mesh else None)
    CompileClock.install()
    ctx = HostContext(host=0, num_hosts=1, started_at=started_at, phases={"startup": [startup]})
    with ctx.phase("distributed_init"):
        distributed_from_env(trainer).distributed.initialize()
        ctx.host, ctx.num_hosts = jax.process_index(), jax.process_count()
    if handle_signals:
        stop_on_signals()  # after initialize(), whose preemption notifier this replaces
    if jax.config.jax_compilation_cache_dir and ctx.num_hosts > 1:  # from the trainer or JAX's own env variable
        seams.every_host_writes_compilation_cache()
    setup_logging(str(ctx.host))
    if engine_log:
        logging.getLogger("levanter.inference").setLevel(logging.INFO)
    logger.info(
        "host %d of %d (pid %d), %d local devices", ctx.host, ctx.num_hosts, os.getpid(), jax.local_device_count()
    )
    return ctx


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
    ticks = processes.start_ticks(pid)
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK") if ticks is not None else time.time()
