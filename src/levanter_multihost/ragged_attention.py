"""Knobs of the TPU ragged paged-attention kernel used by Levanter's paged decode, and the seam that applies them.

Levanter's ``levanter.layers.attention.ragged_paged_attention`` runs JAX's Pallas kernel (imported there as the
module global ``tpu_ragged_paged_attention``) when the backend is TPU and that global is not None, and
``default_ragged_paged_attention`` (the reference implementation) otherwise. Levanter passes the kernel only
``sm_scale`` and ``soft_cap``, so block sizes and the VMEM limit stay at the kernel's defaults, which run out of
VMEM in ragged prefill at ``page_size`` 128 (docs/tpu.md).

The seam is :func:`apply_ragged_attention`: it replaces that module global with the Pallas kernel bound to the
configured ``num_queries_per_block``, ``num_kv_pages_per_block`` and ``vmem_limit_bytes``, or with None when
``enabled`` is false, which makes Levanter take the reference path. :func:`check_levanter_seam` fails loudly if a
Levanter or JAX upgrade moves what the seam relies on. Leaves out everything else about attention.
"""

import functools
import importlib.metadata
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

LEVANTER_MODULE = "levanter.layers.attention"
KERNEL_GLOBAL = "tpu_ragged_paged_attention"
LEVANTER_FUNCTIONS = ("ragged_paged_attention", "_do_tpu_ragged_paged_attention", "default_ragged_paged_attention")
KERNEL_PARAMETERS = ("sm_scale", "soft_cap", "num_queries_per_block", "num_kv_pages_per_block", "vmem_limit_bytes")


@dataclass(frozen=True)
class RaggedAttentionConfig:
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


class LevanterSeamError(RuntimeError):
    """What the seam relies on in Levanter or JAX is gone; the message names the symbol and the versions."""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _seam_error(what: str) -> LevanterSeamError:
    return LevanterSeamError(
        f"levanter_multihost.ragged_attention cannot apply the ragged-kernel knobs: {what} "
        f"(levanter {_version('levanter')}, jax {_version('jax')}). Pin the versions in pyproject.toml "
        "or update this seam to the new layout."
    )


def _global_names(code) -> set[str]:
    """Global names used by ``code`` and the functions nested in it."""
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _global_names(const)
    return names


def pallas_kernel() -> Callable:
    """JAX's Pallas ragged paged-attention kernel, unbound."""
    try:
        from jax.experimental.pallas.ops.tpu import ragged_paged_attention as pallas_module
    except ImportError as e:
        raise _seam_error(f"jax.experimental.pallas.ops.tpu.ragged_paged_attention does not import ({e})") from e
    kernel = getattr(pallas_module, "ragged_paged_attention", None)
    if kernel is None:
        raise _seam_error("jax.experimental.pallas.ops.tpu.ragged_paged_attention.ragged_paged_attention is gone")
    return kernel


def check_levanter_seam():
    """Check everything the seam relies on and return Levanter's attention module; raise LevanterSeamError if not."""
    from levanter.layers import attention

    if not hasattr(attention, KERNEL_GLOBAL):
        raise _seam_error(f"{LEVANTER_MODULE}.{KERNEL_GLOBAL} is gone")
    for name in LEVANTER_FUNCTIONS:
        if not callable(getattr(attention, name, None)):
            raise _seam_error(f"{LEVANTER_MODULE}.{name} is gone")
    for name in ("ragged_paged_attention", "_do_tpu_ragged_paged_attention"):
        fn = inspect.unwrap(getattr(attention, name))
        if KERNEL_GLOBAL not in _global_names(fn.__code__):
            raise _seam_error(f"{LEVANTER_MODULE}.{name} no longer reads the module global {KERNEL_GLOBAL}")
    parameters = inspect.signature(pallas_kernel()).parameters
    missing = [p for p in KERNEL_PARAMETERS if p not in parameters]
    if missing:
        raise _seam_error(f"the Pallas ragged_paged_attention kernel has no parameter(s) {', '.join(missing)}")
    return attention


def apply_ragged_attention(config: RaggedAttentionConfig) -> Callable | None:
    """Make Levanter's ragged paged attention use ``config``; return the kernel callable installed (None: reference).

    Sets ``levanter.layers.attention.tpu_ragged_paged_attention`` for the rest of the process. Idempotent: every
    call binds the knobs to the unbound Pallas kernel, so calls do not stack.
    """
    attention = check_levanter_seam()
    import jax

    backend = jax.default_backend()
    if not config.enabled:
        kernel = None
        logger.info("ragged_attention.enabled is false: Levanter's reference ragged paged attention runs.")
    else:
        kernel = functools.partial(pallas_kernel(), **config.kernel_kwargs())
        if backend == "tpu":
            logger.info("Ragged paged attention: Pallas kernel with %s.", config.kernel_kwargs() or "its defaults")
        else:
            logger.info(
                "Backend is %s, not TPU: Levanter's reference ragged paged attention runs; "
                "the ragged_attention knobs apply on TPU only.",
                backend,
            )
    setattr(attention, KERNEL_GLOBAL, kernel)
    return kernel
