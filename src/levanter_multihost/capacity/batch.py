"""How many sequences one ``generate`` call of the pinned engine completes, in closed form.

A batch is sized so that the engine admits all of it in its first prefill (one admission wave) and every
sequence reaches its ``max_new_tokens`` within the call's decode budget, so no replay of the engine's scheduler
is needed. The conditions, each from ``levanter/inference/engine.py``:

- slots: sequences <= ``max_seqs``; requests <= ``max_seqs_in_prefill`` (``_prefill_prompts`` stops there);
  the sampler sends one request per sequence (see below), so both count sequences;
- prefill buffer: every sequence's prompt tokens <= ``max_prefill_size``;
- pages: every sequence at full length, ceil((prompt + max_new_tokens) / page_size) pages each, within
  ``max_pages`` (the engine admits on prompt pages alone and runs out mid-decode otherwise);
- decode budget: ``generate`` runs at most ceil(max_seq_len / max_rounds) outer rounds of ``max_rounds``
  iterations, and an iteration takes the first ``max_tokens_per_round`` tokens of the decode queue (one per
  unfinished sequence) and queues each sequence's next token behind the rest. With no more sequences than that,
  each gets a token per iteration and max_new_tokens - 1 < max_seq_len iterations always suffice. More sequences
  take turns, but not evenly: an iteration re-queues its tokens sorted by slot, so a sequence can fall behind, and
  B x (max_new_tokens - 1) tokens can take more than ceil(B x (max_new_tokens - 1) / max_tokens_per_round)
  iterations (on the pinned engine, 5 sequences of 20 new tokens at 3 per iteration need more than
  32 = ceil(5 x 19 / 3), and truncate; ``tests/test_batch_engine.py``). What holds in any order is that a queued
  token has at most B - 1 ahead of it, so it waits at most ceil(B / max_tokens_per_round) iterations: B sequences
  finish within (max_new_tokens - 1) x ceil(B / max_tokens_per_round) iterations.

The sampler never asks the engine for clones (``n_generations`` of one request): the pinned engine clones a
request before its prompt pages exist, so the clone of a prompt of ``page_size`` tokens or more gets none of its
parent's pages — wrong text, or pages that are never freed (``tests/test_batch_engine.py``). Each generation is
a request of its own, prefilled and paged like any sequence. Pure Python.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from levanter_multihost.capacity.engine import EngineLimits, Problem, ceil_div


@dataclass(frozen=True)
class PromptDemand:
    """What one prompt asks of the engine."""

    prompt_tokens: int
    """Tokens the engine is given for the prompt."""
    max_new_tokens: int
    """New tokens wanted for each of its sequences."""
    generations: int = 1
    """Sequences sampled from it in this batch (clones of one request)."""


@dataclass(frozen=True)
class BatchLimit:
    """The largest batch for prompts of one shape, and which config field sets it."""

    sequences: int
    """Most sequences (prompts x generations) one ``generate`` call completes in one wave."""
    limited_by: str
    """The config field whose value sets ``sequences``."""
    bounds: dict[str, int]
    """Every field's own bound on the sequences, for the report."""


def batch_limit(
    engine: EngineLimits, max_pages: int | None, demand: PromptDemand, batch_size: int | None = None
) -> BatchLimit:
    """The most sequences of prompts shaped like ``demand`` that one call completes in one wave, in whole prompts.

    ``max_pages`` is the engine's (or the planner's HBM estimate; None skips the page bound); ``batch_size`` is
    the config's own cap, if set. Zero means not even one prompt fits (see :func:`prompt_problems`).
    """
    n = demand.generations
    bounds = {
        "engine.max_seqs": engine.max_seqs,
        "engine.max_seqs_in_prefill": engine.max_seqs_in_prefill,
        "engine.max_prefill_size": engine.prefill_size // demand.prompt_tokens,
    }
    if max_pages is not None:
        bounds["engine.max_pages"] = max_pages // engine.pages_for(demand.prompt_tokens, demand.max_new_tokens)
    if demand.max_new_tokens > 1:
        turns = engine.decode_iterations // (demand.max_new_tokens - 1)  # each at most ceil(B / per round) long
        bounds["engine.max_tokens_per_round"] = engine.tokens_per_round * max(turns, 1)
    if batch_size is not None:
        bounds["batch_size"] = batch_size
    field = min(bounds, key=lambda k: (bounds[k], k != "batch_size"))
    return BatchLimit(sequences=bounds[field] // n * n, limited_by=field, bounds=bounds)


@dataclass(frozen=True)
class _Totals:
    """Running totals of a batch being packed."""

    sequences: int
    """Sequences so far (slots)."""
    primaries: int
    """Requests so far: one per sequence, as the sampler sends them."""
    prompt_tokens: int
    """Tokens every request prefills."""
    pages: int
    """Pages at full length."""
    longest_new: int
    """The most new tokens any sequence asks for."""
    longest_positions: int = 0

    def plus(self, engine: EngineLimits, d: PromptDemand) -> "_Totals":
        return _Totals(
            self.sequences + d.generations,
            self.primaries + d.generations,  # one request per generation
            self.prompt_tokens + d.generations * d.prompt_tokens,
            self.pages + d.generations * engine.pages_for(d.prompt_tokens, d.max_new_tokens),
            max(self.longest_new, d.max_new_tokens),
            max(self.longest_positions, d.prompt_tokens + d.max_new_tokens),
        )


_NONE = _Totals(0, 0, 0, 0, 0)


class BatchPacker:
    """Groups prompts, in order, into batches that each fit one wave of one ``generate`` call."""

    def __init__(self, engine: EngineLimits, max_pages: int | None, batch_size: int | None = None):
        self.engine = engine
        self.max_pages = max_pages
        self.max_sequences = min(engine.max_seqs, batch_size or engine.max_seqs)

    def _allows(self, t: _Totals) -> bool:
        e = self.engine
        return (
            t.longest_positions <= e.max_seq_len  # the engine sizes every per-sequence buffer by it
            and t.sequences <= self.max_sequences
            and t.primaries <= e.max_seqs_in_prefill
            and t.prompt_tokens <= e.prefill_size
            and (self.max_pages is None or t.pages <= self.max_pages)
            and within_decode_budget(e, t.sequences, t.longest_new)
        )

    def fits(self, demands: Sequence[PromptDemand]) -> bool:
        """Whether ``demands`` together complete in one wave of one call."""
        totals = _NONE
        for d in demands:
            totals = totals.plus(self.engine, d)
        return self._allows(totals)

    def pack(self, demands: Sequence[PromptDemand]) -> list[range]:
        """Consecutive index ranges of ``demands``, greedily as large as :meth:`fits` allows (linear time).

        Raises ValueError naming the position of a prompt that does not fit even alone (:func:`prompt_problems`
        says why; preflight runs it first, so the sampler never gets here with such a prompt).
        """
        batches: list[range] = []
        start, totals = 0, _NONE
        for i, d in enumerate(demands):
            grown = totals.plus(self.engine, d)
            if i > start and not self._allows(grown):
                batches.append(range(start, i))
                start, grown = i, _NONE.plus(self.engine, d)
            if not self._allows(grown):
                raise ValueError(f"The prompt at position {i} ({d}) does not fit one engine call on its own.")
            totals = grown
        if start < len(demands):
            batches.append(range(start, len(demands)))
        return batches


def pages_at_full_length(engine: EngineLimits, demands: Sequence[PromptDemand]) -> int:
    return sum(d.generations * engine.pages_for(d.prompt_tokens, d.max_new_tokens) for d in demands)


def within_decode_budget(engine: EngineLimits, sequences: int, longest_new: int) -> bool:
    """Whether ``sequences`` sequences all get ``longest_new`` tokens before ``generate`` gives up, in any order the
    engine packs them (see the module docstring)."""
    if sequences <= engine.tokens_per_round or longest_new <= 1:
        return True  # a token per sequence per iteration, and max_new_tokens - 1 < max_seq_len iterations
    return (longest_new - 1) * ceil_div(sequences, engine.tokens_per_round) <= engine.decode_iterations


def prompt_problems(engine: EngineLimits, max_pages: int | None, demand: PromptDemand, where: str) -> list[Problem]:
    """Why a single prompt (``where`` names it) cannot be completed by one ``generate`` call at all."""
    problems = []
    need = demand.prompt_tokens + demand.max_new_tokens
    if need > engine.max_seq_len:
        problems.append(
            Problem(
                "engine.max_seq_len",
                f"{where} has {demand.prompt_tokens} tokens, and with max_new_tokens {demand.max_new_tokens} needs "
                f"{need} positions, more than engine.max_seq_len ({engine.max_seq_len}). Raise engine.max_seq_len "
                f"to {need}, lower max_new_tokens to {max(engine.max_seq_len - demand.prompt_tokens, 0)}, or "
                "shorten the prompt.",
                need,
            )
        )
    prefill = demand.generations * demand.prompt_tokens
    if prefill > engine.prefill_size:
        problems.append(
            Problem(
                "engine.max_prefill_size",
                f"{where} has {demand.prompt_tokens} tokens; its {demand.generations} generation(s) prefill "
                f"{prefill}, more than engine.max_prefill_size ({engine.prefill_size}) takes in one prefill. Raise "
                f"engine.max_prefill_size to {prefill}.",
                prefill,
            )
        )
    if demand.generations > engine.max_seqs_in_prefill:
        problems.append(
            Problem(
                "engine.max_seqs_in_prefill",
                f"{where} asks for {demand.generations} generations, more than engine.max_seqs_in_prefill "
                f"({engine.max_seqs_in_prefill}) admitted in one prefill. Raise engine.max_seqs_in_prefill to "
                f"{demand.generations} (and engine.max_queued_tokens with it) or lower n_generations.",
                demand.generations,
            )
        )
    if demand.generations > engine.max_seqs:
        problems.append(
            Problem(
                "engine.max_seqs",
                f"{where} asks for {demand.generations} generations, more than engine.max_seqs "
                f"({engine.max_seqs}) slots. Raise engine.max_seqs to {demand.generations} or lower n_generations.",
                demand.generations,
            )
        )
    if not within_decode_budget(engine, demand.generations, demand.max_new_tokens):
        n, per_round = demand.generations, engine.tokens_per_round
        problems.append(
            Problem(
                "engine.max_tokens_per_round",
                f"{where} asks for {n} generations of {demand.max_new_tokens} new tokens; taking turns "
                f"{per_round} at a time (engine.max_tokens_per_round) they may need {demand.max_new_tokens - 1} x "
                f"{ceil_div(n, per_round)} decode iterations, more than the {engine.decode_iterations} one call "
                f"runs ({engine.outer_rounds} outer rounds x max_rounds {engine.max_rounds}). Raise "
                f"engine.max_tokens_per_round to {n} or lower n_generations.",
                n,
            )
        )
    pages = demand.generations * engine.pages_for(demand.prompt_tokens, demand.max_new_tokens)
    if max_pages is not None and pages > max_pages:
        problems.append(
            Problem(
                "engine.max_pages",
                f"{where} needs {pages} KV pages at full length ({demand.generations} x ceil(({demand.prompt_tokens}"
                f" + {demand.max_new_tokens}) / {engine.page_size})), more than engine.max_pages ({max_pages}). "
                f"Raise engine.max_pages to {pages}.",
                pages,
            )
        )
    return problems


@dataclass(frozen=True)
class BatchForecast:
    """What the engine will show for one batch, assuming no sequence stops early."""

    sequences: int
    """Sequences in the batch."""
    waves: int
    """Prefill admissions: always 1 for a packed batch."""
    pages_after_prefill: int
    """Pages in use when decoding starts: every sequence's prompt pages (exact for one generation per prompt)."""
    pages_at_full_length: int
    """Pages if every sequence reaches its max_new_tokens: what ``max_pages`` must hold."""
    outer_rounds: int
    """``_run_generation_loop`` calls (step callbacks) until the longest sequence is done: exact when the batch has
    no more sequences than ``max_tokens_per_round``, an upper bound otherwise."""
    decode_iterations: int
    """Decode iterations that run (exact or an upper bound, as ``outer_rounds``)."""
    kv_tokens_read: int
    """Context tokens attended to over all decode iterations (the KV read of the roofline)."""


def forecast(engine: EngineLimits, demands: Sequence[PromptDemand]) -> BatchForecast:
    """What one ``generate`` call of ``demands`` (a packed batch) shows, if no sequence stops early."""
    sequences = sum(d.generations for d in demands)
    longest_new = max((d.max_new_tokens for d in demands), default=1)
    turns = ceil_div(sequences, engine.tokens_per_round)  # the most iterations a queued token waits
    iterations = (longest_new - 1) * turns
    kv_read = sum(
        d.generations * sum(range(d.prompt_tokens, d.prompt_tokens + d.max_new_tokens - 1)) for d in demands
    )
    return BatchForecast(
        sequences=sequences,
        waves=1,
        pages_after_prefill=sum(d.generations * ceil_div(d.prompt_tokens, engine.page_size) for d in demands),
        pages_at_full_length=pages_at_full_length(engine, demands),
        outer_rounds=ceil_div(iterations, engine.max_rounds),
        decode_iterations=iterations,
        kv_tokens_read=kv_read,
    )
