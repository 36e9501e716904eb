"""The numbers of Levanter's ``InferenceEngineConfig`` the planner reasons about, and the engine's own rules.

Pure Python: :class:`EngineLimits` mirrors the pinned engine's config (``levanter/inference/engine.py``) with the
defaults it imputes, and :func:`construction_problems` repeats the checks its ``__post_init__`` makes, so a
config the engine would refuse fails before the model loads, naming the field and a value that works.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One reason the run would fail or silently truncate, and how to fix it."""

    field: str
    """Config field to change, as a path in the sampler's YAML (e.g. ``engine.max_seqs``)."""
    message: str
    """What is wrong, naming the value and the limit, and the fix."""
    suggested: int | None
    """A value for ``field`` that removes this problem (None when no number does)."""


@dataclass(frozen=True)
class EngineLimits:
    """The InferenceEngineConfig numbers the planner checks (one engine per host)."""

    max_seq_len: int
    """Longest sequence (prompt + new tokens); also sets the decode budget with ``max_rounds``."""
    page_size: int = 128
    """Tokens per KV page."""
    max_pages: int | None = None
    """KV pages of the engine; None lets the engine size it from free HBM (the planner then estimates it)."""
    max_seqs: int = 256
    """Sequence slots (clones included)."""
    max_seqs_in_prefill: int = 16
    """Most requests (primaries) admitted in one prefill."""
    max_prefill_size: int | None = None
    """Most prompt tokens in one prefill; None means ceil(max_seq_len / page_size) * page_size, as the engine does."""
    max_queued_tokens: int = 512
    """Capacity of the decode token queue."""
    max_tokens_per_round: int | None = None
    """Tokens packed per decode iteration; None means ``max_seqs``."""
    max_rounds: int = 32
    """Decode iterations per outer round (one ``_run_generation_loop`` call)."""
    max_stop_tokens: int = 16
    """Longest stop sequence, in tokens; 0 disables stop sequences."""
    max_stop_seqs: int = 4
    """Stop sequences per sequence."""
    kv_dtype_bytes: int = 2
    """Bytes per KV-cache element (``compute_dtype``; bfloat16 is 2)."""
    hbm_utilization: float = 0.9
    """Fraction of free HBM the engine gives the KV cache when ``max_pages`` is None."""

    def __post_init__(self):
        for name in ("max_seq_len", "page_size", "max_seqs", "max_seqs_in_prefill", "max_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine.{name} ({getattr(self, name)}) must be >= 1.")
        for name in ("max_pages", "max_prefill_size", "max_tokens_per_round"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"engine.{name} ({value}) must be >= 1 or null.")

    @property
    def tokens_per_round(self) -> int:
        """Effective ``max_tokens_per_round``."""
        return self.max_tokens_per_round if self.max_tokens_per_round is not None else self.max_seqs

    @property
    def pages_per_seq_max(self) -> int:
        """Pages of a sequence at ``max_seq_len``: the most one sequence can ever hold."""
        return ceil_div(self.max_seq_len, self.page_size)

    @property
    def prefill_size(self) -> int:
        """Effective ``max_prefill_size``."""
        if self.max_prefill_size is not None:
            return self.max_prefill_size
        return self.pages_per_seq_max * self.page_size

    @property
    def outer_rounds(self) -> int:
        """Outer decode rounds before ``generate`` stops: the first k with k * max_rounds >= max_seq_len."""
        return ceil_div(self.max_seq_len, self.max_rounds)

    @property
    def decode_iterations(self) -> int:
        """Most decode iterations one ``generate`` call runs: outer rounds x ``max_rounds``."""
        return self.outer_rounds * self.max_rounds

    def pages_for(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """Pages one sequence holds at full length: ceil((prompt + max_new_tokens) / page_size)."""
        return ceil_div(prompt_tokens + max_new_tokens, self.page_size)


def construction_problems(engine: EngineLimits) -> list[Problem]:
    """InferenceEngineConfig.__post_init__: the queue must hold a token of every slot, round and prefill."""
    needs = [
        ("max_seqs", engine.max_seqs),
        ("max_tokens_per_round", engine.tokens_per_round),
        ("max_seqs_in_prefill", engine.max_seqs_in_prefill),
    ]
    short = [(name, v) for name, v in needs if engine.max_queued_tokens < v]
    if not short:
        return []
    need = max(v for _, v in needs)
    what = ", ".join(f"{name} ({v})" for name, v in short)
    return [
        Problem(
            "engine.max_queued_tokens",
            f"max_queued_tokens ({engine.max_queued_tokens}) is below {what}; the engine refuses such a config "
            f"(InferenceEngineConfig.__post_init__). Increase max_queued_tokens to {need}.",
            need,
        )
    ]


def stop_problems(engine: EngineLimits, stop_sequences: int, longest_stop_tokens: int) -> list[Problem]:
    """The engine holds at most ``max_stop_seqs`` stop sequences of ``max_stop_tokens`` tokens per sequence."""
    problems = []
    if stop_sequences > engine.max_stop_seqs:
        problems.append(
            Problem(
                "engine.max_stop_seqs",
                f"{stop_sequences} stop sequences (stop strings and EOS ids) are more than engine.max_stop_seqs "
                f"({engine.max_stop_seqs}) holds. Raise engine.max_stop_seqs to {stop_sequences} or give fewer "
                "stop_sequences.",
                stop_sequences,
            )
        )
    if longest_stop_tokens > engine.max_stop_tokens:
        problems.append(
            Problem(
                "engine.max_stop_tokens",
                f"A stop sequence of {longest_stop_tokens} tokens is longer than engine.max_stop_tokens "
                f"({engine.max_stop_tokens}). Raise engine.max_stop_tokens to {longest_stop_tokens} or shorten it.",
                longest_stop_tokens,
            )
        )
    return problems


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
