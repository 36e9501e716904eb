"""What the sampler reads of a built ``InferenceEngine``'s private state, in one place, guarded.

Levanter's engine exposes ``generate`` and its result, but not how far a call got or what it left behind; the
sampler needs both: progress lines and per-batch stats read the pending queue, the host-side results and the pages
in use during ``generate`` (its step callback), and after every batch :func:`held_after_batch` checks that every
page and slot came back (the engine's own checks run as NaN poisoning, so a violated one shows only there). Each
read names the attributes it relies on in :data:`ATTRIBUTES`; :func:`check` raises ``SeamError`` naming the first
one a built engine lacks, and runs on every engine the sampler builds (``generation.build_engine``). Checked
against levanter 1.2.dev1644. Can go when Levanter's engine reports progress and its free pages and slots.
"""

from dataclasses import dataclass

import jax
import numpy as np

from levanter_multihost.seams import _error

ATTRIBUTES = (
    "gen_state",
    "gen_state.decode_state.page_table.page_ref_counts",
    "gen_state.decode_state.sequences.used_mask",
    "free_slots",
    "request_queue",
    "results",
)
"""Attribute paths of the engine this module reads."""


def check(engine) -> None:
    """Raise SeamError unless ``engine`` has every attribute path this module reads."""
    for path in ATTRIBUTES:
        value = engine
        for part in path.split("."):
            if not hasattr(value, part):
                raise _error(f"InferenceEngine.{path} is gone (no {part!r})")
            value = getattr(value, part)


def wait_allocated(engine) -> None:
    """Block until the engine's KV cache and state exist on the device."""
    jax.block_until_ready(engine.gen_state)


def _page_counts(engine) -> np.ndarray:
    return np.asarray(jax.device_get(engine.gen_state.decode_state.page_table.page_ref_counts.array))


def pages_in_use(engine) -> int:
    """Pages some sequence holds now."""
    return int((_page_counts(engine) != 0).sum())


def requests_waiting(engine) -> int:
    """Requests not yet admitted (prefilled)."""
    return len(engine.request_queue)


def tokens_so_far(engine) -> int:
    """Tokens the current ``generate`` call has handed back to the host so far."""
    return sum(len(r.token_list) for kids in engine.results.values() for r in kids.values())


@dataclass(frozen=True)
class Held:
    """Pages and slots an engine holds, and whether its page counts are counts."""

    pages: int
    slots: int
    free_slot_list_complete: bool
    largest_count: int
    poisoned: bool
    """A page count below 0 or above the slots: an engine check failed (NaN poisoning turns counts into garbage)."""


def held_after_batch(engine) -> Held:
    """What the engine holds once ``generate`` returned (nothing, after a healthy batch)."""
    counts = _page_counts(engine)
    used = np.asarray(jax.device_get(engine.gen_state.decode_state.sequences.used_mask.array)).astype(bool)
    return Held(
        pages=int((counts != 0).sum()),
        slots=int(used.sum()),
        free_slot_list_complete=len(engine.free_slots) == len(used),
        largest_count=int(counts.max()) if counts.size else 0,
        poisoned=bool((counts < 0).any() or (counts > len(used)).any()),
    )
