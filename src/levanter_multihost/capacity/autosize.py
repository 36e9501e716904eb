"""Engine sizes that fill a stated fraction of a chip's HBM, for a slice, a model and these prompts.

The decode step of a batch of B sequences is bound by HBM bandwidth: each iteration reads the chip's weights once
and the KV of every sequence's context, so tokens/s = B / ((weights + B x context x KV per token) / bandwidth)
grows with B and saturates. The proposal is therefore the largest batch whose KV cache at full length fits
``hbm_utilization`` of what the weights leave free (the rest is left to activations and the compiler's scratch),
no larger than a host's share, with every other engine size made to match it: one wave, one token per sequence
per decode iteration. Pure Python.
"""

from dataclasses import dataclass, replace

from levanter_multihost.capacity.batch import PromptDemand
from levanter_multihost.capacity.engine import EngineLimits, ceil_div
from levanter_multihost.capacity.hbm import ModelShape, page_bytes_per_chip, step_seconds_bound
from levanter_multihost.capacity.tpu import Topology

MAX_PREFILL_TOKENS = 32768
"""Most prompt tokens one prefill takes: its activations grow with it, and one prefill per batch is enough."""
MAX_SEQUENCES = 1024
"""Most sequences proposed: past this the KV reads dominate the step and tokens/s barely grows."""


@dataclass(frozen=True)
class Proposal:
    """Engine sizes for the run, and what they should deliver at the HBM bound."""

    limits: EngineLimits
    """The engine's limits with every size the proposal sets replaced."""
    sequences: int
    """Sequences per batch."""
    limited_by: str
    """What stopped the batch from growing: ``HBM``, ``share`` (a host's whole share), ``prefill`` or ``cap``."""
    step_s: float | None
    """HBM-bound decode iteration of a full batch at half its new tokens."""
    tokens_per_s: float | None
    """``sequences`` / ``step_s``: decode tokens/s per host at the bound."""

    def engine_fields(self) -> dict[str, int]:
        """The ``engine.*`` values the proposal sets, as a config would write them."""
        names = (
            "max_seqs",
            "max_seqs_in_prefill",
            "max_queued_tokens",
            "max_tokens_per_round",
            "max_pages",
            "max_prefill_size",
            "max_seq_len",
        )
        return {name: getattr(self.limits, name) for name in names}


def propose(
    engine: EngineLimits, worst: PromptDemand, share_sequences: int, topology: Topology, model: ModelShape
) -> Proposal | None:
    """The proposal for prompts no longer than ``worst`` and a largest host share of ``share_sequences``; None when
    the slice's HBM is unknown or the weights leave no room."""
    gen = topology.generation
    if gen is None:
        return None
    free = (gen.hbm_bytes_per_chip - model.weight_bytes_per_chip) * engine.hbm_utilization
    per_page = page_bytes_per_chip(engine, model)
    pages_per_seq = ceil_div(worst.prompt_tokens + worst.max_new_tokens, engine.page_size)
    max_seq_len = max(engine.max_seq_len, pages_per_seq * engine.page_size)
    bounds = {
        "HBM": int(free // per_page) // pages_per_seq if free > 0 else 0,
        "share": max(share_sequences, 1),
        "prefill": MAX_PREFILL_TOKENS // worst.prompt_tokens,
        "cap": MAX_SEQUENCES,
    }
    limited_by = min(bounds, key=bounds.get)
    sequences = bounds[limited_by]
    if sequences >= 16 and limited_by != "share":
        sequences -= sequences % 8  # whole tiles of 8 rows
    if sequences < 1:
        return None
    limits = replace(
        engine,
        max_seq_len=max_seq_len,
        max_seqs=sequences,
        max_seqs_in_prefill=sequences,
        max_queued_tokens=sequences,
        max_tokens_per_round=sequences,
        max_pages=sequences * pages_per_seq,
        max_prefill_size=ceil_div(sequences * worst.prompt_tokens, engine.page_size) * engine.page_size,
    )
    context = worst.prompt_tokens + worst.max_new_tokens // 2
    step = step_seconds_bound(model, topology, sequences, context)
    return Proposal(limits, sequences, limited_by, step, sequences / step if step else None)
