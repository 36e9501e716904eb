"""Every place this project reaches into a dependency's private internals, each behind a guard.

:func:`install` runs at the start of ``sample_lm_multihost.main`` (so the command line and a direct call of
``main`` run the same engine), and again, idempotently, wherever an engine is built; nothing here acts at import
time. Each seam says what upstream lacks, the version it was checked against and when
it can go; each guard raises :class:`SeamError` naming the symbol and the installed versions when the internals it
relies on have moved, instead of silently doing nothing. Checked against levanter 1.2.dev1644, jax 0.10.2,
equinox 0.13.8 (``PINNED``).

- :func:`checks_as_nan`: Levanter's engine guards its bookkeeping with Equinox's ``error_if``, which compiles to a
  host callback, and JAX never writes a program with host callbacks to the persistent compilation cache, so the
  engine would compile on every run. As NaN poisoning the checks still run and the programs can be cached; the
  sampler checks the engine's state after every batch instead (`generation.check_engine_state`). Can go
  when JAX caches programs with host callbacks. ``EQX_ON_ERROR`` in the environment wins.
- :func:`every_host_writes_compilation_cache`: JAX writes cache entries from process 0 only, which suits SPMD
  programs; host-data-parallel programs are host-local with the host's device ids in their keys, so the other
  hosts never found an entry (docs/benchmarks.md). Can go when JAX lets every process write.
- :func:`distributed_client`: JAX exposes its key-value store client only as ``jax._src.distributed``'s global.
  Can go when JAX makes it public.
- :mod:`levanter_multihost.seams.decode_step`: Levanter's decode bookkeeping runs as serial loops (a trip per
  token, per sequence and per layer), which a TPU runs one after another; replaced by whole-array operations,
  with stop sequences matched within the generation only. Installed by every engine build
  (``generation.build_engine``) and by :func:`install`. Can go when Levanter's scheduler is vectorized upstream.
- :func:`apply_ragged_attention`: Levanter passes the TPU ragged paged-attention kernel only ``sm_scale`` and
  ``soft_cap``, so block sizes and VMEM stay at defaults that run out of VMEM at page_size 128 (docs/tpu.md). Can
  go when Levanter takes the kernel's block sizes in its config.
- :mod:`levanter_multihost.seams.engine_state`: every read of a built engine's private state (progress during
  ``generate``, pages and slots held after it), its attributes checked on every engine the sampler builds.
- :mod:`levanter_multihost.seams.sampler`: top-k, top-p and min-p per sequence inside the engine's sampling step.
"""

import functools
import importlib.metadata
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

PINNED = {"levanter": "1.2.dev1644", "jax": "0.10.2", "equinox": "0.13.8"}
"""The versions every seam was checked against; others are allowed only while the guards pass."""


class SeamError(RuntimeError):
    """What a seam relies on in a dependency is gone; the message names the symbol and the versions."""


def install() -> None:
    """Install the seams that need no config (idempotent); ``sample_lm_multihost.main`` calls it first."""
    from levanter_multihost.seams import decode_step, sampler

    checks_as_nan()
    check_ragged_attention_seam()
    decode_step.install()
    sampler.check_sampler_seam()  # top-k, top-p, min-p


def checks_as_nan() -> str:
    """Make Equinox's runtime checks poison their values with NaN (unless ``EQX_ON_ERROR`` is set); return the
    mode in effect."""
    from equinox import _errors

    if not hasattr(_errors, "EQX_ON_ERROR") or "EQX_ON_ERROR" not in global_names(
        inspect.unwrap(_errors.branched_error_if_impl).__code__
    ):
        raise _error("equinox._errors.branched_error_if_impl no longer reads the module global EQX_ON_ERROR")
    # read at trace time, so this must run before any engine program is traced; the environment wins
    _errors.EQX_ON_ERROR = os.environ.get("EQX_ON_ERROR", "nan")
    return _errors.EQX_ON_ERROR


def every_host_writes_compilation_cache() -> None:
    """Let this host write its own entries to JAX's persistent compilation cache (idempotent)."""
    from jax._src import compiler, distributed

    write = getattr(compiler, "_cache_write", None)
    if write is None or not hasattr(distributed.global_state, "process_id"):
        raise _error("jax._src.compiler._cache_write or jax._src.distributed.global_state.process_id is gone")
    if getattr(write, "every_host", False):
        return

    def cache_write(*args, **kwargs):
        saved = distributed.global_state.process_id
        distributed.global_state.process_id = 0  # the writer's only check on who writes
        try:
            return write(*args, **kwargs)
        finally:
            distributed.global_state.process_id = saved

    cache_write.every_host = True
    compiler._cache_write = cache_write


def distributed_client():
    """JAX's distributed key-value store client, or None when ``jax.distributed`` is not initialized."""
    from jax._src import distributed

    if not hasattr(distributed, "global_state") or not hasattr(distributed.global_state, "client"):
        raise _error("jax._src.distributed.global_state.client is gone")
    return distributed.global_state.client


@dataclass(frozen=True)
class RaggedAttentionConfig:
    """Knobs of the TPU ragged paged-attention kernel under Levanter's paged decode."""

    enabled: bool = True
    """Use the TPU ragged Pallas kernel when on TPU. False forces Levanter's reference implementation."""
    q_block_size: int | None = None
    """Queries per kernel block (Pallas ``num_queries_per_block``); None keeps the kernel's default."""
    kv_block_pages: int | None = None
    """KV pages per kernel block (Pallas ``num_kv_pages_per_block``); None keeps the kernel's default."""
    vmem_limit_bytes: int | None = None
    """Scoped VMEM limit for the kernel; None keeps the kernel's default."""

    def __post_init__(self):
        for name in ("q_block_size", "kv_block_pages", "vmem_limit_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(
                    f"ragged_attention.{name} is {value!r}; it must be a positive integer or null "
                    "(null keeps the Pallas kernel's default)."
                )

    def kernel_kwargs(self) -> dict[str, int]:
        """The Pallas keyword arguments these knobs set (unset knobs are left out)."""
        kwargs = {
            "num_queries_per_block": self.q_block_size,
            "num_kv_pages_per_block": self.kv_block_pages,
            "vmem_limit_bytes": self.vmem_limit_bytes,
        }
        return {k: v for k, v in kwargs.items() if v is not None}


LEVANTER_ATTENTION = "levanter.layers.attention"
KERNEL_GLOBAL = "tpu_ragged_paged_attention"
LEVANTER_FUNCTIONS = ("ragged_paged_attention", "_do_tpu_ragged_paged_attention", "default_ragged_paged_attention")
KERNEL_PARAMETERS = ("sm_scale", "soft_cap", "num_queries_per_block", "num_kv_pages_per_block", "vmem_limit_bytes")


def pallas_kernel() -> Callable:
    """JAX's Pallas ragged paged-attention kernel, unbound."""
    try:
        from jax.experimental.pallas.ops.tpu import ragged_paged_attention as pallas_module
    except ImportError as e:
        raise _error(f"jax.experimental.pallas.ops.tpu.ragged_paged_attention does not import ({e})") from e
    kernel = getattr(pallas_module, "ragged_paged_attention", None)
    if kernel is None:
        raise _error("jax.experimental.pallas.ops.tpu.ragged_paged_attention.ragged_paged_attention is gone")
    return kernel


def check_ragged_attention_seam():
    """Check everything the ragged-attention seam relies on; return Levanter's attention module."""
    from levanter.layers import attention

    if not hasattr(attention, KERNEL_GLOBAL):
        raise _error(f"{LEVANTER_ATTENTION}.{KERNEL_GLOBAL} is gone")
    for name in LEVANTER_FUNCTIONS:
        if not callable(getattr(attention, name, None)):
            raise _error(f"{LEVANTER_ATTENTION}.{name} is gone")
    for name in ("ragged_paged_attention", "_do_tpu_ragged_paged_attention"):
        fn = inspect.unwrap(getattr(attention, name))
        if KERNEL_GLOBAL not in global_names(fn.__code__):
            raise _error(f"{LEVANTER_ATTENTION}.{name} no longer reads the module global {KERNEL_GLOBAL}")
    parameters = inspect.signature(pallas_kernel()).parameters
    missing = [p for p in KERNEL_PARAMETERS if p not in parameters]
    if missing:
        raise _error(f"the Pallas ragged_paged_attention kernel has no parameter(s) {', '.join(missing)}")
    return attention


def apply_ragged_attention(config: RaggedAttentionConfig, announce: bool = True) -> Callable | None:
    """Make Levanter's ragged paged attention use ``config``; return the kernel installed (None: the reference).

    Sets ``levanter.layers.attention.tpu_ragged_paged_attention`` for the rest of the process. Idempotent: every
    call binds the knobs to the unbound Pallas kernel, so calls do not stack. ``announce`` logs which runs (one
    host is enough).
    """
    attention = check_ragged_attention_seam()
    import jax

    say = logger.info if announce else logger.debug
    if not config.enabled:
        kernel = None
        say("ragged_attention.enabled is false: Levanter's reference ragged paged attention runs.")
    else:
        kernel = functools.partial(pallas_kernel(), **config.kernel_kwargs())
        backend = jax.default_backend()
        if backend == "tpu":
            say("Ragged paged attention: Pallas kernel with %s.", config.kernel_kwargs() or "its defaults")
        else:
            say(
                "Backend is %s, not TPU: Levanter's reference ragged paged attention runs; the ragged_attention "
                "knobs apply on TPU only.",
                backend,
            )
    setattr(attention, KERNEL_GLOBAL, kernel)
    return kernel


def global_names(code) -> set[str]:
    """Global names used by ``code`` and the functions nested in it."""
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= global_names(const)
    return names


def versions() -> dict[str, str]:
    """Installed versions of the pinned dependencies."""
    out = {}
    for dist in PINNED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _error(what: str) -> SeamError:
    installed = ", ".join(f"{k} {v}" for k, v in versions().items())
    pinned = ", ".join(f"{k} {v}" for k, v in PINNED.items())
    return SeamError(
        f"levanter_multihost.seams: {what} (installed: {installed}; checked against: {pinned}). Pin the versions "
        "in pyproject.toml or update this seam to the new layout."
    )
