"""A fenced seam: Levanter's per-token KV-cache write replaced by one scatter, for a benchmark run only.

    from decode_seam import kv_update_swapped
    with kv_update_swapped():          # every program traced inside uses the scatter
        engine.generate(requests)

What it replaces. ``levanter.layers.kv_cache.KvPageCache.update`` (called by ``Attention.paged_decode`` once per
layer, in prefill and in every decode iteration) writes the round's new keys/values through the module global
``kv_update_unified_prefix``, a ``lax.fori_loop`` over the round's ``K`` valid tokens, one
``dynamic_update_slice`` of one token's ``[2 * kv_heads, head_dim]`` row per iteration: L x K serial loop
iterations per decode iteration (L layers, K = sequences decoded). The replacement (variant ``scatter``,
:func:`make_kv_update_scatter`) writes all ``K`` rows with one scatter and has the same result for *every*
input, not only the engine's:

* a token ``i >= K`` writes nothing (the loop never reaches it): its destination is made out of range and the
  scatter drops it;
* ``dynamic_update_slice`` wraps a negative start index once and clamps every start index into range, so a
  token ``i < K`` whose destination is invalid (``INVALID`` = 2,000,000, e.g. a page that could not be
  allocated) lands on the last page's last slot; the scatter computes the same indices;
* when two of the first ``K`` tokens share a destination the loop's later write wins; the scatter keeps only
  the last writer of each destination (a stable sort of the destinations), so its indices are unique.

The engine itself never gives two valid tokens one destination (a sequence appears once per decode round, and
clones copy their partial last page to a fresh one before writing), so the variant ``scatter_plain`` (no
de-duplication) also gives the same cache there; it is kept to show what the de-duplication costs.

The fence. :func:`check_kv_update_seam` runs before every swap and raises :class:`DecodeSeamError`, naming what
moved, unless: the installed levanter is the pinned version; the module global is Levanter's own function (not
already swapped); its signature is ``(kv_pages, t_pages, t_slots, new_k, new_v, K)``; the SHA-256 of its source
(decorators included) is the pinned one; ``KvPageCache.update`` still reads that global; ``_interleave_kv``
(reused here, so that the written values are bit-identical) still exists. The swap clears JAX's caches on entry
and exit, since ``jax.jit`` caches traces by argument shapes, not by the module globals they read.

Nothing under ``src/`` uses this; it lives in ``bench/`` for ``bench/decode_step.py`` and its test.
"""

import contextlib
import functools
import hashlib
import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from levanter_multihost.seams import global_names

PINNED_LEVANTER = "1.2.dev1644"
MODULE = "levanter.layers.kv_cache"
GLOBAL = "kv_update_unified_prefix"
SIGNATURE = ("kv_pages", "t_pages", "t_slots", "new_k", "new_v", "K")
SOURCE_SHA256 = "f29c8bd46a6f2b3fb0c54140967e825a93c02d8ae26efbab290ca925cbb212cf"
"""sha256 of ``inspect.getsource`` of levanter 1.2.dev1644's ``kv_update_unified_prefix`` (decorators included)."""


class DecodeSeamError(RuntimeError):
    """What the seam relies on in Levanter moved; the message says what and which versions are installed."""


def _versions() -> str:
    out = []
    for dist in ("levanter", "jax"):
        try:
            out.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist} not installed")
    return ", ".join(out)


def _error(what: str) -> DecodeSeamError:
    return DecodeSeamError(
        f"bench/decode_seam.py cannot swap {MODULE}.{GLOBAL}: {what} ({_versions()}; the seam is written against "
        f"levanter {PINNED_LEVANTER}). Re-read the new {MODULE} and update the seam, or drop it."
    )


def check_kv_update_seam():
    """Check every assumption of the seam; return (module, original function) or raise DecodeSeamError."""
    version = importlib.metadata.version("levanter")
    if version != PINNED_LEVANTER:
        raise _error(f"levanter is {version}, not the pinned {PINNED_LEVANTER}")
    module = importlib.import_module(MODULE)
    original = getattr(module, GLOBAL, None)
    if original is None or not callable(original):
        raise _error(f"{MODULE}.{GLOBAL} is gone")
    if getattr(original, "_decode_seam_replacement", False):
        raise _error(f"{MODULE}.{GLOBAL} is already swapped (nested or leaked swap)")
    unwrapped = inspect.unwrap(original)
    if unwrapped.__module__ != MODULE:
        raise _error(f"{MODULE}.{GLOBAL} now comes from {unwrapped.__module__}")
    params = tuple(inspect.signature(unwrapped).parameters)
    if params != SIGNATURE:
        raise _error(f"its signature is {params}, not {SIGNATURE}")
    digest = hashlib.sha256(inspect.getsource(unwrapped).encode()).hexdigest()
    if digest != SOURCE_SHA256:
        raise _error(f"its source changed (sha256 {digest[:16]}..., pinned {SOURCE_SHA256[:16]}...)")
    cache_cls = getattr(module, "KvPageCache", None)
    if cache_cls is None or GLOBAL not in global_names(inspect.unwrap(cache_cls.update).__code__):
        raise _error(f"KvPageCache.update no longer calls the module global {GLOBAL}")
    if not callable(getattr(module, "_interleave_kv", None)):
        raise _error(f"{MODULE}._interleave_kv is gone")
    return module, original


def _interleave(module, new_k, new_v, dtype):
    return module._interleave_kv(new_k.astype(dtype), new_v.astype(dtype))  # [T, 2H, D], as the original


def _as_dus_index(index, dim: int):
    """The start index ``lax.dynamic_update_slice`` (``allow_negative_indices=True``) uses for a size-1 slice."""
    index = index.astype(jnp.int32)
    return jnp.clip(jnp.where(index < 0, index + dim, index), 0, dim - 1)


def make_kv_update_scatter(module, dedupe: bool = True) -> Callable:
    """The replacement for ``module.kv_update_unified_prefix`` (same signature, same donation)."""

    @functools.partial(jax.jit, donate_argnums=(0,))
    def kv_update_scatter(kv_pages, t_pages, t_slots, new_k, new_v, K):
        num_pages, page_size = kv_pages.shape[0], kv_pages.shape[1]
        rows = _interleave(module, new_k, new_v, kv_pages.dtype)
        n = t_pages.shape[0]
        i = jnp.arange(n, dtype=jnp.int32)
        active = i < K
        # dynamic_update_slice wraps a negative start index once (index + dim) and then clamps it into
        # [0, dim - 1] (slice size 1): so does this
        pages = _as_dus_index(t_pages, num_pages)
        slots = _as_dus_index(t_slots, page_size)
        if dedupe:
            end = num_pages * page_size
            flat = jnp.where(active, pages * page_size + slots, end)
            order = jnp.argsort(flat, stable=True)  # equal destinations stay in token order
            sorted_flat = flat[order]
            last = jnp.concatenate([sorted_flat[:-1] != sorted_flat[1:], jnp.ones((1,), bool)])
            keep = jnp.zeros((n,), bool).at[order].set(last & (sorted_flat < end))
            # kept tokens have distinct destinations; every other one a distinct out-of-range page (dropped)
            pages = jnp.where(keep, pages, num_pages + i)
            return kv_pages.at[pages, slots].set(rows, mode="drop", unique_indices=True)
        pages = jnp.where(active, pages, num_pages)
        return kv_pages.at[pages, slots].set(rows, mode="drop")

    kv_update_scatter._decode_seam_replacement = True  # type: ignore[attr-defined]
    return kv_update_scatter


VARIANTS = {"scatter": True, "scatter_plain": False}
"""Seam variants: name -> de-duplicate destinations (exact for every input) or not (exact for the engine's)."""


@contextlib.contextmanager
def kv_update_swapped(variant: str = "scatter") -> Iterator[Callable]:
    """Inside the block, Levanter's KV-cache write is the scatter; outside, Levanter's own loop again."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown seam variant {variant!r}; one of {sorted(VARIANTS)}")
    module, original = check_kv_update_seam()
    replacement = make_kv_update_scatter(module, dedupe=VARIANTS[variant])
    jax.clear_caches()
    setattr(module, GLOBAL, replacement)
    try:
        yield replacement
    finally:
        setattr(module, GLOBAL, original)
        jax.clear_caches()


def original_kv_update() -> Callable:
    """Levanter's own ``kv_update_unified_prefix`` (after the fence checks)."""
    return check_kv_update_seam()[1]


def seam_variant(name: str | None):
    """A context manager for ``--seam NAME`` (``none``/None: Levanter unchanged)."""
    if name in (None, "", "none"):
        return contextlib.nullcontext()
    return kv_update_swapped(name)
