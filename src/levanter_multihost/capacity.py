"""Preflight capacity planning for host-data-parallel sampling with Levanter's paged-attention InferenceEngine.

Pure Python, no JAX and no Levanter: plain dataclasses describe the engine's limits (:class:`EngineLimits`), the
run (:class:`RunSpec`), the slice (:class:`Topology`, :func:`parse_tpu_type`) and, optionally, the model's shape
(:class:`ModelShape`). :func:`plan_capacity` returns a :class:`CapacityPlan`: per host, the prompts and sequences
it samples, the KV pages they need, the prefill admission waves and the new tokens each prompt can get within the
pinned engine's decode budget, an HBM check and an HBM-bandwidth roofline of the decode; and every problem found,
each naming the config field to change, the value and the limit, and a value that passes.

Admission waves, pages and the decode budget come from a replay of the pinned engine's host-side scheduling
(``InferenceEngine.generate``, ``_admit_from_queue``, ``_run_generation_loop`` and its FIFO ``TokenQueue``), token by
token but without a model. The replay assumes that no stop sequence ends a sequence early, the worst case for
pages and for the budget. It is exact for ``n_generations == 1``; with clones, it counts each clone as a sequence
with its own prompt pages (the pinned engine sets a clone up before its parent's prompt pages exist, so its real
page count differs slightly).

Leaves out: the config classes, tokenizers and model files (:mod:`levanter_multihost.plan`), prefill compute time,
and the VMEM of the ragged paged-attention kernel. ``docs/capacity.md`` works the math through on an example.
"""

import math
import re
from collections import deque
from dataclasses import dataclass, replace
from functools import lru_cache

from levanter_multihost.sharding import all_shards, prompt_cost

GIB = 1024**3


@dataclass(frozen=True)
class TpuGeneration:
    """One TPU generation's per-chip memory and how its slice names count devices."""

    name: str
    """Generation name as in slice names: v4, v5e, v5p, v6e."""
    hbm_bytes_per_chip: int
    """HBM capacity of one chip, in bytes."""
    hbm_bandwidth_per_chip: float
    """HBM bandwidth of one chip, in bytes per second."""
    cores_per_chip_in_name: int
    """What the number in a slice name counts per chip: 2 for v4/v5p (TensorCores), 1 for v5e/v6e (chips)."""


TPU_GENERATIONS: dict[str, TpuGeneration] = {
    "v4": TpuGeneration("v4", 32 * GIB, 1200e9, 2),
    "v5e": TpuGeneration("v5e", 16 * GIB, 819e9, 1),
    "v5p": TpuGeneration("v5p", 95 * GIB, 2765e9, 2),
    "v6e": TpuGeneration("v6e", 32 * GIB, 1638e9, 1),
}
"""Cloud TPU chip specs (HBM capacity, HBM bandwidth) by generation; ``v5litepod`` names are v5e."""

_HOST_CHIPS = 4
"""Chips per host of a multi-host slice, every generation here (v5e/v6e single-host slices go up to 8 chips)."""


@dataclass(frozen=True)
class Topology:
    """The slice: how many hosts, how many chips each, and which TPU generation (None when unknown)."""

    num_hosts: int = 1
    """Hosts (JAX processes); each runs its own engine on its own chips."""
    chips_per_host: int = 1
    """Accelerator chips on each host."""
    generation: TpuGeneration | None = None
    """TPU generation, for HBM capacity and bandwidth; None skips the HBM check and the roofline."""
    name: str | None = None
    """Slice name this topology was parsed from (e.g. v5p-32), for reports."""


def parse_tpu_type(tpu_type: str) -> Topology:
    """Hosts, chips per host and generation of a slice name such as ``v5p-32``, ``v4-8``, ``v5litepod-16``.

    v4 and v5p names count TensorCores, two per chip: v5p-32 is 16 chips, 4 hosts of 4. v5e (``v5e-N`` or
    ``v5litepod-N``) and v6e names count chips: up to 8 chips are one host (v5e-8: 1 host of 8), larger slices
    have 4 chips per host (v5e-16: 4 hosts of 4).
    """
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", tpu_type.strip().lower())
    if match is None:
        raise ValueError(
            f"tpu_type {tpu_type!r} is not a slice name like v5p-32, v4-8, v5e-16, v5litepod-16 or v6e-8."
        )
    gen = TPU_GENERATIONS["v5e" if match.group(1) == "v5litepod" else match.group(1)]
    count = int(match.group(2))
    if count == 0 or count % gen.cores_per_chip_in_name != 0:
        raise ValueError(
            f"tpu_type {tpu_type!r}: {gen.name} names count TensorCores ({gen.cores_per_chip_in_name} per chip), "
            f"so the number must be a positive multiple of {gen.cores_per_chip_in_name}."
        )
    chips = count // gen.cores_per_chip_in_name
    single_host_max = _HOST_CHIPS if gen.cores_per_chip_in_name == 2 else 2 * _HOST_CHIPS
    if chips <= single_host_max:
        return Topology(1, chips, gen, tpu_type)
    if chips % _HOST_CHIPS != 0:
        raise ValueError(f"tpu_type {tpu_type!r}: {chips} chips do not split into hosts of {_HOST_CHIPS}.")
    return Topology(chips // _HOST_CHIPS, _HOST_CHIPS, gen, tpu_type)


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

    @property
    def tokens_per_round(self) -> int:
        """Effective ``max_tokens_per_round``."""
        return self.max_tokens_per_round if self.max_tokens_per_round is not None else self.max_seqs

    @property
    def pages_per_seq_max(self) -> int:
        """Pages of a sequence at ``max_seq_len``: the most one sequence can ever hold."""
        return _ceil_div(self.max_seq_len, self.page_size)

    @property
    def prefill_size(self) -> int:
        """Effective ``max_prefill_size``."""
        if self.max_prefill_size is not None:
            return self.max_prefill_size
        return self.pages_per_seq_max * self.page_size

    @property
    def outer_rounds(self) -> int:
        """Outer decode rounds before ``generate`` stops: the first k with k * max_rounds >= max_seq_len."""
        return _ceil_div(self.max_seq_len, self.max_rounds)

    @property
    def decode_iterations(self) -> int:
        """Most decode iterations one ``generate`` call runs: outer rounds x ``max_rounds``."""
        return self.outer_rounds * self.max_rounds


@dataclass(frozen=True)
class RunSpec:
    """What is sampled: every prompt's token count, in global order, and the sampling lengths."""

    prompt_tokens: tuple[int, ...]
    """Token count of each prompt, exactly as the engine is given it."""
    max_new_tokens: int
    """New tokens wanted per sequence."""
    n_generations: int = 1
    """Sequences per prompt; each takes a slot."""
    stop_tokens: int = 0
    """Tokens in the stop sequence; 0 when there is none."""
    shard_strategy: str = "contiguous"
    """How prompts are split over hosts (see :mod:`levanter_multihost.sharding`)."""


@dataclass(frozen=True)
class ModelShape:
    """What the HBM check and the roofline need of the model, and how it is spread over a host's chips."""

    num_layers: int
    """Transformer layers, each with its own KV cache."""
    num_kv_heads: int
    """Key/value heads per layer."""
    head_dim: int
    """Size of one head."""
    weight_bytes: int
    """Bytes of all weights in the compute dtype."""
    weight_shards: int = 1
    """Chips the weights are split over (the model axis); 1 means every chip holds all of them."""
    kv_shards: int = 1
    """Chips the KV cache is split over (the model axis when ``kv_head`` is sharded); 1 means replicated."""


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
class Wave:
    """One prefill admission on a host."""

    after_round: int
    """Outer decode rounds run before this admission (0: the initial prefill)."""
    requests: int
    """Prompts admitted."""
    sequences: int
    """Sequences admitted (prompts x n_generations)."""
    prompt_tokens: int
    """Prompt tokens prefilled."""
    stopped_by: str | None
    """Engine limit that ended the admission with prompts still queued; None when the queue emptied."""


@dataclass(frozen=True)
class HostPlan:
    """One host's share of the run, replayed through the engine's scheduling."""

    host: int
    """Host index (JAX process index)."""
    prompt_indices: tuple[int, ...]
    """Global indices of this host's prompts, in the order the engine receives them."""
    sequences: int
    """Sequences on this host (prompts x n_generations)."""
    waves: tuple[Wave, ...]
    """Prefill admissions, in order."""
    new_tokens: tuple[int, ...]
    """New tokens each prompt gets (fewest over its generations), aligned with ``prompt_indices``."""
    max_active: int
    """Most sequences held at once."""
    pages_required: int
    """Most pages held at once if every held sequence grows to ceil((prompt + max_new_tokens) / page_size)."""
    peak_pages: int
    """Most pages the engine holds at once (a sequence of P prompt and N new tokens peaks at ceil((P+N-1)/size))."""
    round_start_pages: tuple[int, ...]
    """Pages held at the start of each outer round, where ``generate`` calls its step callback."""
    pages_at_end: int
    """Pages still held when ``generate`` returns (sequences cut off by the decode budget)."""
    decode_iterations: int
    """Decode iterations that ran."""
    kv_tokens_read: int
    """Context tokens the decode iterations attended to, summed (the KV read of the roofline)."""

    @property
    def prompts(self) -> int:
        """Prompts on this host."""
        return len(self.prompt_indices)

    @property
    def rounds_run(self) -> int:
        """Outer decode rounds that ran."""
        return len(self.round_start_pages)

    @property
    def min_new_tokens(self) -> int | None:
        """Fewest new tokens any prompt of this host gets; None for a host without prompts."""
        return min(self.new_tokens, default=None)

    @property
    def observed_pages_peak(self) -> int:
        """What the sampler's ``GenerationStats.pages_peak`` reads: the most pages at a round start or at the end."""
        return max((*self.round_start_pages, self.pages_at_end))


@dataclass(frozen=True)
class Row:
    """One line of the report table."""

    parameter: str
    """What is checked."""
    value: str
    """The configured value."""
    needed: str
    """What the run needs."""
    headroom: str
    """value - needed, when both are numbers."""
    verdict: str
    """ok, warn (works, but see the notes) or FAIL."""


@dataclass(frozen=True)
class CapacityPlan:
    """The planner's answer: per-host plans, problems (empty when the run fits) and notes."""

    engine: EngineLimits
    """Engine limits planned over."""
    run: RunSpec
    """The run planned."""
    topology: Topology
    """The slice planned for."""
    model: ModelShape | None
    """Model shape, or None when unknown (no HBM check, no roofline)."""
    max_pages: int | None
    """The engine's max_pages, or the HBM-derived estimate when it is unset; None when neither is known."""
    hosts: tuple[HostPlan, ...]
    """One plan per host."""
    problems: tuple[Problem, ...]
    """Everything that would make the run fail or truncate, engine-construction rules first."""
    notes: tuple[str, ...]
    """Things worth knowing that are not failures."""

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    @property
    def prompts_per_host(self) -> list[int]:
        """Prompts on each host."""
        return [h.prompts for h in self.hosts]

    @property
    def sequences_per_host(self) -> list[int]:
        """Sequences on each host."""
        return [h.sequences for h in self.hosts]

    @property
    def pages_per_seq_max(self) -> int:
        """Worst case pages of one sequence: ceil(max_seq_len / page_size)."""
        return self.engine.pages_per_seq_max

    @property
    def pages_per_seq(self) -> int:
        """Pages of the longest prompt's sequence at full length: ceil((prompt + max_new_tokens) / page_size)."""
        longest = max(self.run.prompt_tokens, default=0)
        return _ceil_div(longest + self.run.max_new_tokens, self.engine.page_size)

    @property
    def pages_needed(self) -> int:
        """Busiest host, worst case: the most sequences it holds at once x ``pages_per_seq_max``."""
        return max((h.max_active for h in self.hosts), default=0) * self.pages_per_seq_max

    @property
    def pages_required(self) -> int:
        """Busiest host, these prompts: the most pages held at once at full sequence length."""
        return max((h.pages_required for h in self.hosts), default=0)

    @property
    def free_pages(self) -> int | None:
        """max_pages - pages_needed (negative when the worst case does not fit)."""
        return None if self.max_pages is None else self.max_pages - self.pages_needed

    @property
    def new_tokens_per_prompt(self) -> list[int]:
        """New tokens each prompt gets, in global prompt order."""
        out = [0] * len(self.run.prompt_tokens)
        for h in self.hosts:
            for i, n in zip(h.prompt_indices, h.new_tokens, strict=True):
                out[i] = n
        return out

    @property
    def truncated_prompts(self) -> int:
        """Prompts that get fewer than max_new_tokens: the run would silently truncate them."""
        return sum(1 for t in self.new_tokens_per_prompt if t < self.run.max_new_tokens)

    @property
    def kv_bytes_per_token(self) -> int | None:
        """KV-cache bytes of one token over all layers: layers x kv_heads x head_dim x 2 (K and V) x dtype bytes."""
        if self.model is None:
            return None
        m = self.model
        return m.num_layers * m.num_kv_heads * m.head_dim * 2 * self.engine.kv_dtype_bytes

    @property
    def kv_cache_bytes(self) -> int | None:
        """KV cache of one host's engine: kv_bytes_per_token x page_size x max_pages."""
        if self.kv_bytes_per_token is None or self.max_pages is None:
            return None
        return self.kv_bytes_per_token * self.engine.page_size * self.max_pages

    @property
    def hbm_bytes_per_chip_needed(self) -> int | None:
        """Weights / weight_shards + KV cache / kv_shards: what each chip of a host holds."""
        if self.model is None or self.kv_cache_bytes is None:
            return None
        return _ceil_div(self.model.weight_bytes, self.model.weight_shards) + _ceil_div(
            self.kv_cache_bytes, self.model.kv_shards
        )

    @property
    def decode_roofline_s(self) -> list[float] | None:
        """Per host: HBM-bound decode time, summed over its decode iterations.

        Each iteration reads the chip's share of the weights and the KV of every packed sequence's context:
        (iterations x weights / weight_shards + kv_tokens_read x kv_bytes_per_token / kv_shards) / chip bandwidth.
        With weights and KV split over all of a host's chips this is (weights + KV read) / host HBM bandwidth.
        Prefill is left out.
        """
        gen = self.topology.generation
        if self.model is None or gen is None or self.kv_bytes_per_token is None:
            return None
        m = self.model
        return [
            (
                h.decode_iterations * m.weight_bytes / m.weight_shards
                + h.kv_tokens_read * self.kv_bytes_per_token / m.kv_shards
            )
            / gen.hbm_bandwidth_per_chip
            for h in self.hosts
        ]

    @property
    def rows(self) -> list[Row]:
        """The report table: parameter, value, needed, headroom, verdict."""
        return _rows(self)

    def report(self) -> str:
        """The plan as text: a summary line, the table, the problems with their fixes, and the notes."""
        return _report(self)

    def to_dict(self) -> dict:
        """The plan as JSON-ready data."""
        roofline = self.decode_roofline_s
        return {
            "ok": self.ok,
            "tpu_type": self.topology.name,
            "num_hosts": self.topology.num_hosts,
            "chips_per_host": self.topology.chips_per_host,
            "prompts": len(self.run.prompt_tokens),
            "prompts_per_host": self.prompts_per_host,
            "sequences_per_host": self.sequences_per_host,
            "max_new_tokens": self.run.max_new_tokens,
            "pages_per_seq_max": self.pages_per_seq_max,
            "pages_per_seq": self.pages_per_seq,
            "pages_needed": self.pages_needed,
            "pages_required": self.pages_required,
            "max_pages": self.max_pages,
            "free_pages": self.free_pages,
            "decode_budget": {
                "outer_rounds": self.engine.outer_rounds,
                "iterations": self.engine.decode_iterations,
            },
            "new_tokens_per_prompt": self.new_tokens_per_prompt,
            "truncated_prompts": self.truncated_prompts,
            "hosts": [
                {
                    "host": h.host,
                    "prompts": h.prompts,
                    "sequences": h.sequences,
                    "waves": [vars(w) for w in h.waves],
                    "min_new_tokens": h.min_new_tokens,
                    "pages_required": h.pages_required,
                    "peak_pages": h.peak_pages,
                    "round_start_pages": list(h.round_start_pages),
                    "pages_at_end": h.pages_at_end,
                    "observed_pages_peak": h.observed_pages_peak,
                    "rounds_run": h.rounds_run,
                    "decode_iterations": h.decode_iterations,
                    "decode_roofline_s": None if roofline is None else roofline[h.host],
                }
                for h in self.hosts
            ],
            "hbm": None
            if self.hbm_bytes_per_chip_needed is None or self.topology.generation is None
            else {
                "bytes_per_chip_needed": self.hbm_bytes_per_chip_needed,
                "bytes_per_chip": self.topology.generation.hbm_bytes_per_chip,
                "kv_cache_bytes": self.kv_cache_bytes,
                "weight_bytes": self.model.weight_bytes if self.model else None,
            },
            "problems": [vars(p) for p in self.problems],
            "notes": list(self.notes),
            "rows": [vars(r) for r in self.rows],
        }


def plan_capacity(
    engine: EngineLimits, run: RunSpec, topology: Topology, model: ModelShape | None = None
) -> CapacityPlan:
    """Plan ``run`` on ``topology`` with one engine of ``engine`` limits per host."""
    _validate(engine, run, topology)
    problems: list[Problem] = _engine_rule_problems(engine)
    notes: list[str] = []
    problems += _length_problems(engine, run)

    max_pages, hbm_problems, hbm_notes = _hbm(engine, topology, model)
    notes += hbm_notes

    costs = [prompt_cost(p, run.max_new_tokens, run.n_generations) for p in run.prompt_tokens]
    shards = all_shards(run.shard_strategy, topology.num_hosts, costs)
    hosts = tuple(
        replace(
            _replay(
                tuple(run.prompt_tokens[i] for i in shard),
                engine,
                max_pages,
                run.max_new_tokens,
                run.n_generations,
            ),
            host=h,
            prompt_indices=tuple(shard),
        )
        for h, shard in enumerate(shards)
    )
    admission = _admission_problems(engine, run, hosts, max_pages)
    problems += admission or _budget_problems(engine, run, hosts, max_pages)
    problems += _page_problems(engine, run, hosts, max_pages)
    problems += hbm_problems
    notes += _notes(engine, run, hosts, max_pages)
    return CapacityPlan(engine, run, topology, model, max_pages, hosts, tuple(problems), tuple(notes))


# ----------------------------------------------------------------------------------------------------------------
# checks


def _validate(engine: EngineLimits, run: RunSpec, topology: Topology) -> None:
    positive = {
        "max_seq_len": engine.max_seq_len,
        "page_size": engine.page_size,
        "max_seqs": engine.max_seqs,
        "max_seqs_in_prefill": engine.max_seqs_in_prefill,
        "max_rounds": engine.max_rounds,
        "tokens_per_round": engine.tokens_per_round,
        "max_new_tokens": run.max_new_tokens,
        "n_generations": run.n_generations,
        "num_hosts": topology.num_hosts,
        "chips_per_host": topology.chips_per_host,
    }
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name} ({value}) must be >= 1.")
    if any(p < 1 for p in run.prompt_tokens):
        raise ValueError("Every prompt must have at least one token.")


def _engine_rule_problems(engine: EngineLimits) -> list[Problem]:
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


def _length_problems(engine: EngineLimits, run: RunSpec) -> list[Problem]:
    problems = []
    if run.prompt_tokens:
        longest = max(run.prompt_tokens)
        i = run.prompt_tokens.index(longest)
        need = longest + run.max_new_tokens
        if engine.max_seq_len < need:
            problems.append(
                Problem(
                    "engine.max_seq_len",
                    f"max_seq_len ({engine.max_seq_len}) is below the {need} tokens of prompt {i} "
                    f"({longest} prompt + {run.max_new_tokens} new). Increase max_seq_len to {need} "
                    f"(or lower max_new_tokens to {max(engine.max_seq_len - longest, 0)}).",
                    need,
                )
            )
    if run.n_generations > engine.max_seqs:
        problems.append(
            Problem(
                "engine.max_seqs",
                f"max_seqs ({engine.max_seqs}) is below n_generations ({run.n_generations}); generate() rejects "
                f"the requests. Increase max_seqs to {run.n_generations}.",
                run.n_generations,
            )
        )
    if run.stop_tokens > 0:
        if engine.max_stop_seqs < 1:
            problems.append(
                Problem(
                    "engine.max_stop_seqs",
                    "max_stop_seqs (0) leaves no room for the stop sequence. Increase max_stop_seqs to 1.",
                    1,
                )
            )
        if engine.max_stop_tokens < run.stop_tokens:
            problems.append(
                Problem(
                    "engine.max_stop_tokens",
                    f"max_stop_tokens ({engine.max_stop_tokens}) is below the {run.stop_tokens} tokens of the stop "
                    f"sequence. Increase max_stop_tokens to {run.stop_tokens}.",
                    run.stop_tokens,
                )
            )
    return problems


def _admission_problems(
    engine: EngineLimits, run: RunSpec, hosts: tuple[HostPlan, ...], max_pages: int | None
) -> list[Problem]:
    """Prompts that can never be admitted: longer than one prefill, or needing more pages than exist."""
    if not run.prompt_tokens:
        return []
    longest = max(run.prompt_tokens)
    i = run.prompt_tokens.index(longest)
    host = next(h.host for h in hosts if i in h.prompt_indices)
    problems = []
    if longest > engine.prefill_size:
        problems.append(
            Problem(
                "engine.max_prefill_size",
                f"max_prefill_size ({engine.prefill_size}) is below the {longest} tokens of prompt {i} on host "
                f"{host}: the engine can never admit it, and every prompt queued after it waits forever (0 new "
                f"tokens). Increase max_prefill_size to {longest}.",
                longest,
            )
        )
    prompt_pages = _ceil_div(longest, engine.page_size)
    if max_pages is not None and prompt_pages > max_pages:
        problems.append(
            Problem(
                "engine.max_pages",
                f"max_pages ({max_pages}) is below the {prompt_pages} pages of prompt {i}'s {longest} tokens: the "
                f"engine can never admit it. Increase max_pages to {prompt_pages}.",
                prompt_pages,
            )
        )
    return problems


def _budget_problems(
    engine: EngineLimits, run: RunSpec, hosts: tuple[HostPlan, ...], max_pages: int | None
) -> list[Problem]:
    """Prompts that get fewer than max_new_tokens within the decode budget: silent truncation."""
    n = run.max_new_tokens
    short = [h for h in hosts if any(t < n for t in h.new_tokens)]
    if not short:
        return []
    worst = min(short, key=lambda h: (h.min_new_tokens, h.host))
    budget = (
        f"the engine's decode budget ({engine.outer_rounds} outer rounds x {engine.max_rounds} iterations, "
        f"ceil(max_seq_len {engine.max_seq_len} / max_rounds {engine.max_rounds}) rounds)"
    )
    short_prompts = sum(1 for h in short for t in h.new_tokens if t < n)
    where = f"host {worst.host}"
    waves = len(worst.waves)
    last = worst.waves[-1]
    got = worst.min_new_tokens
    if waves > 1:
        outcome = (
            f"they are admitted in {waves} prefill waves and the prompts admitted after outer round "
            f"{last.after_round} get only {got} of their {n} new tokens within {budget}"
        )
    else:
        outcome = f"each prompt gets only {got} of its {n} new tokens within {budget}"
    tail = f"; {short_prompts} prompts would be silently truncated."
    sequences = worst.sequences
    prompt_sum = sum(run.prompt_tokens[i] for i in worst.prompt_indices)
    problems = []
    if engine.max_seqs < sequences:
        problems.append(
            Problem(
                "engine.max_seqs",
                f"max_seqs ({engine.max_seqs}) is below the {sequences} sequences on {where}: {outcome}{tail} "
                f"Increase max_seqs to {sequences}.",
                sequences,
            )
        )
    if engine.max_seqs_in_prefill < worst.prompts:
        problems.append(
            Problem(
                "engine.max_seqs_in_prefill",
                f"max_seqs_in_prefill ({engine.max_seqs_in_prefill}) is below the {worst.prompts} prompts on "
                f"{where}, so they cannot be admitted in one prefill: {outcome}{tail} "
                f"Increase max_seqs_in_prefill to {worst.prompts}.",
                worst.prompts,
            )
        )
    if engine.prefill_size < prompt_sum:
        problems.append(
            Problem(
                "engine.max_prefill_size",
                f"max_prefill_size ({engine.prefill_size}) is below the {prompt_sum} prompt tokens on {where}, so "
                f"they cannot be admitted in one prefill: {outcome}{tail} Increase max_prefill_size to {prompt_sum}.",
                prompt_sum,
            )
        )
    if engine.max_tokens_per_round is not None and engine.max_tokens_per_round < sequences:
        queue = f" (and max_queued_tokens to {sequences})" if engine.max_queued_tokens < sequences else ""
        problems.append(
            Problem(
                "engine.max_tokens_per_round",
                f"max_tokens_per_round ({engine.tokens_per_round}) is below the {sequences} sequences on {where}: "
                f"each decode iteration advances only {engine.tokens_per_round} of them, and {outcome}{tail} "
                f"Increase max_tokens_per_round to {sequences}{queue}.",
                sequences,
            )
        )
    if not problems and max_pages is not None:
        need = worst.sequences * _ceil_div(max(run.prompt_tokens) + n, engine.page_size)
        problems.append(
            Problem(
                "engine.max_pages",
                f"max_pages ({max_pages}) leaves too few free pages to admit all {sequences} sequences on {where} "
                f"at once: {outcome}{tail} Increase max_pages to {need}.",
                need,
            )
        )
    return problems


def _page_problems(
    engine: EngineLimits, run: RunSpec, hosts: tuple[HostPlan, ...], max_pages: int | None
) -> list[Problem]:
    """The engine admits on prompt pages only, then allocates as sequences grow and crashes when none is free."""
    if max_pages is None or not hosts:
        return []
    busiest = max(hosts, key=lambda h: (h.pages_required, -h.host))
    if busiest.pages_required <= max_pages:
        return []
    return [
        Problem(
            "engine.max_pages",
            f"max_pages ({max_pages}) is below the {busiest.pages_required} pages that host {busiest.host}'s "
            f"{busiest.max_active} sequences held at once need at full length (ceil((prompt + {run.max_new_tokens}) "
            f"/ {engine.page_size}) each); the engine would stop with 'Out of free pages' mid-decode. "
            f"Increase max_pages to {busiest.pages_required}.",
            busiest.pages_required,
        )
    ]


def _hbm(
    engine: EngineLimits, topology: Topology, model: ModelShape | None
) -> tuple[int | None, list[Problem], list[str]]:
    """The effective max_pages and the per-chip HBM check (weights and KV cache, each split over its shards)."""
    gen = topology.generation
    if model is None or gen is None:
        why = "the model shape is unknown" if model is None else "the TPU generation is unknown (set tpu_type)"
        if engine.max_pages is None:
            return None, [], [f"max_pages is unset (sized from free HBM at start) and {why}: page checks skipped."]
        return engine.max_pages, [], [f"HBM check skipped: {why}."]
    page_bytes = model.num_layers * model.num_kv_heads * model.head_dim * 2 * engine.kv_dtype_bytes * engine.page_size
    page_bytes_per_chip = page_bytes / model.kv_shards
    weights_per_chip = _ceil_div(model.weight_bytes, model.weight_shards)
    hbm = gen.hbm_bytes_per_chip
    free = hbm - weights_per_chip
    if free <= 0:
        return (
            engine.max_pages,
            [
                Problem(
                    "trainer.model_axis_size",
                    f"The weights need {_gib(weights_per_chip)} per chip ({_gib(model.weight_bytes)} over "
                    f"{model.weight_shards} chip(s)), above the {_gib(hbm)} of a {gen.name} chip. Shard them over "
                    f"the host's {topology.chips_per_host} chips: set trainer.model_axis_size to "
                    f"{topology.chips_per_host} and trainer.tensor_parallel_axes (e.g. [mlp, heads, kv_head]).",
                    topology.chips_per_host,
                )
            ],
            [],
        )
    fits = int(free // page_bytes_per_chip)
    if engine.max_pages is None:
        estimate = int(free * engine.hbm_utilization // page_bytes_per_chip)
        return (
            estimate,
            [],
            [
                (
                    f"max_pages is unset: the engine sizes it from free HBM at start; planned with an estimate of "
                    f"{estimate} pages ({engine.hbm_utilization:g} x ({_gib(hbm)} - {_gib(weights_per_chip)} of "
                    f"weights) / {_gib(page_bytes_per_chip)} per page per chip)."
                )
            ],
        )
    if engine.max_pages <= fits:
        return engine.max_pages, [], []
    need = weights_per_chip + engine.max_pages * page_bytes_per_chip
    return (
        engine.max_pages,
        [
            Problem(
                "engine.max_pages",
                f"max_pages ({engine.max_pages}) needs {_gib(need)} of HBM per chip ({_gib(weights_per_chip)} of "
                f"weights + {engine.max_pages} pages x {_gib(page_bytes_per_chip)}), above the {_gib(hbm)} of a "
                f"{gen.name} chip. Lower max_pages to {fits} (or shard the KV cache over more chips).",
                fits,
            )
        ],
        [],
    )


def _notes(engine: EngineLimits, run: RunSpec, hosts: tuple[HostPlan, ...], max_pages: int | None) -> list[str]:
    notes = []
    if max_pages is not None and hosts:
        worst_case = max(h.max_active for h in hosts) * engine.pages_per_seq_max
        required = max(h.pages_required for h in hosts)
        if required <= max_pages < worst_case:
            notes.append(
                f"max_pages ({max_pages}) is below the {worst_case} pages the busiest host's sequences would hold "
                f"at max_seq_len ({engine.pages_per_seq_max} each); these prompts need at most {required}, so the "
                f"run fits, but longer prompts or a larger max_new_tokens may not."
            )
    multi = [h for h in hosts if len(h.waves) > 1]
    if multi and all(t >= run.max_new_tokens for h in hosts for t in h.new_tokens):
        h = max(multi, key=lambda h: len(h.waves))
        notes.append(
            f"Host {h.host} admits its prompts in {len(h.waves)} prefill waves (first stopped by "
            f"{h.waves[0].stopped_by}); later waves start later, but all finish within the decode budget."
        )
    if run.n_generations > 1:
        notes.append(
            "n_generations > 1: each clone is counted as a sequence with its own prompt pages; exact for prompts "
            "up to one page, an estimate for longer ones (the pinned engine gives a clone only a copy of its "
            "parent's last partial page)."
        )
    return notes


# ----------------------------------------------------------------------------------------------------------------
# the engine replay


@lru_cache(maxsize=64)
def _replay(
    prompts: tuple[int, ...], engine: EngineLimits, max_pages: int | None, max_new_tokens: int, n_generations: int
) -> HostPlan:
    """Replay ``InferenceEngine.generate`` on one host's requests (one per prompt, in order), without a model.

    Mirrors the pinned engine: the initial ``_admit_from_queue``; then, while fewer than ceil(max_seq_len /
    max_rounds) outer rounds have run and some request is unfinished, an outer round of up to ``max_rounds``
    iterations followed by another admission. An admission takes requests from the head of the queue while slots
    (n_generations each), free pages (prompt pages), prefill tokens and prefill requests last; slots are popped
    from the end of the free list. A prefill yields each sequence's first token. Every unfinished sequence has one
    token in the FIFO decode queue; an iteration packs the first ``tokens_per_round`` of them, sorts them by slot,
    writes their KV (pages grow to ceil(length / page_size)) and samples one token each; a sequence that reaches
    prompt + max_new_tokens tokens finishes, frees its pages at once and its slot at the end of the round, and the
    others re-enter the queue at the back.
    """
    ps = engine.page_size
    per_round = engine.tokens_per_round
    page_limit = max_pages if max_pages is not None else math.inf
    free_slots = list(range(engine.max_seqs))
    pending = deque(range(len(prompts)))
    owner: dict[int, int] = {}
    length: dict[int, int] = {}
    target: dict[int, int] = {}
    pages: dict[int, int] = {}
    full: dict[int, int] = {}
    queue: deque[int] = deque()
    new_tokens: list[int | None] = [None] * len(prompts)
    waves: list[Wave] = []
    round_start: list[int] = []
    released: list[int] = []
    st = {"held": 0, "peak": 0, "reserved": 0, "required": 0, "active": 0, "iterations": 0, "kv": 0}

    def record(slot: int) -> None:
        r = owner[slot]
        got = length[slot] - prompts[r]
        new_tokens[r] = got if new_tokens[r] is None else min(new_tokens[r], got)

    def finish(slot: int) -> None:
        st["held"] -= pages.pop(slot)
        st["reserved"] -= full.pop(slot)
        record(slot)
        released.append(slot)

    def release() -> None:
        free_slots.extend(sorted(released))
        released.clear()

    def admit(after_round: int) -> None:
        slots, avail, tokens, batch, stopped_by = len(free_slots), page_limit - st["held"], 0, [], None
        while pending:
            p = prompts[pending[0]]
            if slots < n_generations:
                stopped_by = "max_seqs"
            elif avail < _ceil_div(p, ps):
                stopped_by = "max_pages"
            elif tokens + p > engine.prefill_size:
                stopped_by = "max_prefill_size"
            elif len(batch) >= engine.max_seqs_in_prefill:
                stopped_by = "max_seqs_in_prefill"
            if stopped_by is not None:
                break
            batch.append(pending.popleft())
            slots -= n_generations
            avail -= _ceil_div(p, ps)
            tokens += p
        if not batch:
            return
        primaries, clones = [], []
        for r in batch:
            mine = [free_slots.pop() for _ in range(n_generations)]  # the primary's slot, then its clones'
            primaries.append(mine[0])
            clones += mine[1:]
            for slot in mine:
                p = prompts[r]
                owner[slot], length[slot], target[slot] = r, p + 1, p + max_new_tokens
                pages[slot] = _ceil_div(p, ps)
                full[slot] = _ceil_div(p + max_new_tokens, ps)
                st["held"] += pages[slot]
                st["reserved"] += full[slot]
        st["peak"] = max(st["peak"], st["held"])
        st["required"] = max(st["required"], st["reserved"])
        for slot in primaries + sorted(clones):
            if length[slot] >= target[slot]:
                finish(slot)
            else:
                queue.append(slot)
        st["active"] = max(st["active"], len(pages))
        waves.append(Wave(after_round, len(batch), len(batch) * n_generations, tokens, stopped_by))
        release()

    def feed(slot: int, upto: int) -> None:
        """Allocate pages for a sequence whose KV now covers ``upto`` tokens."""
        grown = _ceil_div(upto, ps)
        st["held"] += grown - pages[slot]
        pages[slot] = grown

    def decode_round() -> None:
        nonlocal queue
        step = 0
        while step < engine.max_rounds and queue:
            if len(queue) <= per_round:
                # Every queued sequence is packed each iteration: jump to the next finish or the round's end.
                order = sorted(queue)
                jump = min(engine.max_rounds - step, min(target[s] - length[s] for s in order))
                for s in order:
                    feed(s, length[s] + jump - 1)
                    st["kv"] += jump * length[s] + jump * (jump - 1) // 2
                    length[s] += jump
                st["peak"] = max(st["peak"], st["held"])
                queue = deque(s for s in order if length[s] < target[s])
                for s in order:
                    if length[s] >= target[s]:
                        finish(s)
            else:
                jump = 1
                batch = sorted(queue.popleft() for _ in range(per_round))
                for s in batch:
                    feed(s, length[s])
                    st["kv"] += length[s]
                st["peak"] = max(st["peak"], st["held"])
                for s in batch:
                    length[s] += 1
                    if length[s] >= target[s]:
                        finish(s)
                    else:
                        queue.append(s)
            step += jump
            st["iterations"] += jump

    admit(0)
    rounds = 0
    while rounds * engine.max_rounds < engine.max_seq_len and (pending or queue):
        rounds += 1
        round_start.append(st["held"])
        decode_round()
        release()
        admit(rounds)
    for slot in list(pages):
        record(slot)
    return HostPlan(
        host=0,
        prompt_indices=(),
        sequences=len(prompts) * n_generations,
        waves=tuple(waves),
        new_tokens=tuple(0 if t is None else t for t in new_tokens),
        max_active=st["active"],
        pages_required=st["required"],
        peak_pages=st["peak"],
        round_start_pages=tuple(round_start),
        pages_at_end=st["held"],
        decode_iterations=st["iterations"],
        kv_tokens_read=st["kv"],
    )


# ----------------------------------------------------------------------------------------------------------------
# the report


def _rows(plan: CapacityPlan) -> list[Row]:
    e, run, hosts = plan.engine, plan.run, plan.hosts
    failed = {p.field for p in plan.problems}
    truncated = plan.truncated_prompts > 0
    busiest = max(hosts, key=lambda h: (h.sequences, -h.host))
    longest = max(run.prompt_tokens, default=0)
    prompt_sum = max((sum(run.prompt_tokens[i] for i in h.prompt_indices) for h in hosts), default=0)
    rows = []

    def add(param: str, value, needed, what: str, fail: bool, warn: bool = False) -> None:
        head = value - needed if isinstance(value, int) and isinstance(needed, int) else None
        verdict = "FAIL" if fail else ("warn" if warn or (head is not None and head < 0) else "ok")
        headroom = "" if head is None else f"{head:,}"
        rows.append(Row(param, _fmt(value), f"{_fmt(needed)} {what}".strip(), headroom, verdict))

    add(
        "max_seq_len",
        e.max_seq_len,
        longest + run.max_new_tokens,
        f"(longest prompt {longest} + {run.max_new_tokens} new)",
        "engine.max_seq_len" in failed,
    )
    if plan.max_pages is None:
        add("max_pages", "unset", plan.pages_needed, "(worst case; the engine sizes it from HBM)", False)
    else:
        active = max((h.max_active for h in hosts), default=0)
        add(
            "max_pages (worst case)",
            plan.max_pages,
            plan.pages_needed,
            f"({active} seqs x {e.pages_per_seq_max} pages at max_seq_len)",
            False,
            warn=plan.pages_needed > plan.max_pages,
        )
        add(
            "max_pages (these prompts)",
            plan.max_pages,
            plan.pages_required,
            f"(up to {plan.pages_per_seq} pages per seq at prompt + max_new_tokens)",
            "engine.max_pages" in failed,
        )
    add(
        "max_seqs",
        e.max_seqs,
        busiest.sequences,
        f"(sequences on host {busiest.host})",
        "engine.max_seqs" in failed,
        warn=e.max_seqs < busiest.sequences,
    )
    add(
        "max_seqs_in_prefill",
        e.max_seqs_in_prefill,
        busiest.prompts,
        "(prompts in one prefill wave)",
        "engine.max_seqs_in_prefill" in failed,
        warn=e.max_seqs_in_prefill < busiest.prompts,
    )
    add(
        "max_prefill_size",
        e.prefill_size,
        prompt_sum,
        f"(prompt tokens in one prefill wave; longest prompt {longest})",
        "engine.max_prefill_size" in failed,
        warn=e.prefill_size < prompt_sum,
    )
    add(
        "max_queued_tokens",
        e.max_queued_tokens,
        max(e.max_seqs, e.tokens_per_round, e.max_seqs_in_prefill),
        "(>= max_seqs, max_tokens_per_round, max_seqs_in_prefill)",
        "engine.max_queued_tokens" in failed,
    )
    add(
        "max_tokens_per_round",
        e.tokens_per_round,
        busiest.sequences,
        "(one token per sequence per iteration)",
        "engine.max_tokens_per_round" in failed,
        warn=e.tokens_per_round < busiest.sequences,
    )
    add(
        "decode iterations",
        e.decode_iterations,
        max((h.decode_iterations for h in hosts), default=0),
        f"(budget {e.outer_rounds} outer rounds x max_rounds {e.max_rounds}; used)",
        False,
        warn=truncated,
    )
    add(
        "new tokens per prompt",
        min(plan.new_tokens_per_prompt, default=run.max_new_tokens),
        run.max_new_tokens,
        "(fewest predicted; needed: max_new_tokens)",
        truncated,
    )
    if run.stop_tokens:
        add(
            "max_stop_tokens",
            e.max_stop_tokens,
            run.stop_tokens,
            "(tokens of the stop sequence)",
            "engine.max_stop_tokens" in failed,
        )
    need = plan.hbm_bytes_per_chip_needed
    gen = plan.topology.generation
    if need is not None and gen is not None:
        verdict = "FAIL" if need > gen.hbm_bytes_per_chip else "ok"
        headroom = _gib(gen.hbm_bytes_per_chip - need)
        rows.append(
            Row(
                f"HBM per chip ({gen.name})",
                _gib(gen.hbm_bytes_per_chip),
                f"{_gib(need)} (weights + KV cache)",
                headroom,
                verdict,
            )
        )
    roofline = plan.decode_roofline_s
    if roofline is not None:
        tokens = sum(busiest.new_tokens) * run.n_generations
        rows.append(
            Row(
                "decode roofline (HBM-bound)",
                f"{roofline[busiest.host]:.1f} s",
                f"{tokens:,} new tokens on host {busiest.host}",
                "",
                "info",
            )
        )
    return rows


def _report(plan: CapacityPlan) -> str:
    t = plan.topology
    where = f"{t.name}: " if t.name else ""
    head = (
        f"{'OK' if plan.ok else 'FAIL'}: {len(plan.run.prompt_tokens)} prompts x {plan.run.n_generations} "
        f"generation(s), max_new_tokens {plan.run.max_new_tokens}, on {where}{t.num_hosts} host(s) x "
        f"{t.chips_per_host} chip(s); prompts per host {_span(plan.prompts_per_host)}"
    )
    rows = [Row("parameter", "value", "needed", "headroom", "verdict"), *plan.rows]
    widths = [max(len(getattr(r, f)) for r in rows) for f in ("parameter", "value", "needed", "headroom")]
    lines = [head, ""]
    for r in rows:
        cells = [
            r.parameter.ljust(widths[0]),
            r.value.rjust(widths[1]),
            r.needed.ljust(widths[2]),
            r.headroom.rjust(widths[3]),
            r.verdict,
        ]
        lines.append("  ".join(cells).rstrip())
    if plan.problems:
        lines += ["", "Problems (field to change: suggested value):"]
        for p in plan.problems:
            lines.append(f"- {p.field}: {'-' if p.suggested is None else p.suggested}")
            lines.append(f"  {p.message}")
    if plan.notes:
        lines += ["", "Notes:", *[f"- {n}" for n in plan.notes]]
    return "\n".join(lines)


def _span(values: list[int]) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _fmt(value) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
