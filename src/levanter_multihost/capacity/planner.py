"""The capacity plan of a run: per replica (a host, or a group of hosts running one engine), its prompts, its
batches and what they need; every problem with its fix.

Pure Python. :func:`plan_capacity` shards the prompts as the sampler does, packs each replica's share into
batches (:class:`~levanter_multihost.capacity.batch.BatchPacker`), forecasts each batch and checks the engine's
construction rules, the prompts that cannot fit a call at all, the stop sequences and HBM.
"""

from dataclasses import dataclass, fields, replace

from levanter_multihost.capacity.autosize import Proposal, propose
from levanter_multihost.capacity.batch import (
    BatchLimit,
    BatchPacker,
    PromptDemand,
    batch_limit,
    forecast,
    prompt_problems,
)
from levanter_multihost.capacity.engine import EngineLimits, Problem, ceil_div, construction_problems, stop_problems
from levanter_multihost.capacity.hbm import (
    ModelShape,
    decode_seconds_bound,
    effective_max_pages,
    gib,
    hbm_bytes_per_chip,
    step_seconds_bound,
)
from levanter_multihost.capacity.tpu import Topology
from levanter_multihost.sharding import all_shards, prompt_cost


@dataclass(frozen=True)
class RunSpec:
    """What is sampled, in global prompt order."""

    demands: tuple[PromptDemand, ...]
    """Each prompt's tokens, new tokens and generations."""
    shard_strategy: str = "contiguous"
    """How prompts are split over hosts (see :mod:`levanter_multihost.sharding`)."""
    batch_size: int | None = None
    """The config's cap on sequences per batch; None lets the engine's limits decide."""
    stop_sequences: int = 0
    """Stop sequences per sequence (stop strings and EOS ids)."""
    longest_stop_tokens: int = 0
    """Tokens of the longest stop sequence."""

    @property
    def longest(self) -> PromptDemand:
        """A prompt as long as the longest, with the most new tokens and generations of any: the worst case."""
        return PromptDemand(
            max((d.prompt_tokens for d in self.demands), default=1),
            max((d.max_new_tokens for d in self.demands), default=1),
            max((d.generations for d in self.demands), default=1),
        )


@dataclass(frozen=True)
class HostPlan:
    """One replica's share, packed into batches (a replica is one host unless ``hosts_per_replica`` > 1)."""

    host: int
    """Replica index: the host index (JAX process index) when every host is its own replica."""
    prompts: int
    """Prompts on this host."""
    sequences: int
    """Sequences on this host (prompts x generations)."""
    batch_sequences: tuple[int, ...]
    """Sequences of each batch, in order."""
    pages_peak: int
    """Most pages any of its batches holds at full length."""
    decode_iterations: int
    """Decode iterations over all batches, if no sequence stops early."""
    kv_tokens_read: int
    """Context tokens attended to over all decode iterations."""


@dataclass(frozen=True)
class CapacityPlan:
    """The planner's answer: per-host plans, problems (empty when the run fits) and notes."""

    engine: EngineLimits
    run: RunSpec
    topology: Topology
    model: ModelShape | None
    max_pages: int | None
    """The engine's max_pages, or the HBM-derived estimate when it is unset; None when neither is known."""
    batch: BatchLimit
    """The largest batch for the worst-case prompt, and the field that sets it."""
    hosts: tuple[HostPlan, ...]
    proposal: Proposal | None
    """Engine sizes that fill HBM for these prompts (:mod:`.autosize`); None without a TPU type or model shape."""
    problems: tuple[Problem, ...]
    """Everything that would make the run fail or truncate."""
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def prompts_per_host(self) -> list[int]:
        return [h.prompts for h in self.hosts]

    @property
    def batches_per_host(self) -> list[int]:
        return [len(h.batch_sequences) for h in self.hosts]

    @property
    def pages_per_seq(self) -> int:
        """Pages of the worst-case sequence at full length."""
        worst = self.run.longest
        return self.engine.pages_for(worst.prompt_tokens, worst.max_new_tokens)

    @property
    def pages_required(self) -> int:
        """Most pages any batch on any host holds at full length."""
        return max((h.pages_peak for h in self.hosts), default=0)

    @property
    def hbm_per_chip(self) -> int | None:
        if self.model is None or self.max_pages is None:
            return None
        return hbm_bytes_per_chip(self.engine, self.model, self.max_pages)

    @property
    def decode_bound_s(self) -> list[float] | None:
        """Per host, the HBM-bound decode time of all its batches (prefill and compilation left out)."""
        if self.model is None or self.topology.generation is None:
            return None
        return [
            decode_seconds_bound(self.model, self.topology, h.decode_iterations, h.kv_tokens_read) for h in self.hosts
        ]

    @property
    def largest_batch(self) -> int:
        """Sequences of the largest batch any host runs (a host with fewer prompts than the batch limit runs a
        smaller one); the batch limit when no host was planned."""
        largest = max((max(h.batch_sequences, default=0) for h in self.hosts), default=0)
        return largest or self.batch.sequences

    @property
    def step_bound_s(self) -> float | None:
        """HBM-bound time of one decode iteration of the largest batch at half its new tokens (mid-decode)."""
        if self.model is None:
            return None
        worst = self.run.longest
        context = worst.prompt_tokens + worst.max_new_tokens // 2
        return step_seconds_bound(self.model, self.topology, self.largest_batch, context)


def plan_capacity(
    engine: EngineLimits, run: RunSpec, topology: Topology, model: ModelShape | None = None
) -> CapacityPlan:
    """Plan ``run`` on ``topology`` with one engine of ``engine`` limits per replica (per host unless
    ``topology.hosts_per_replica`` says otherwise)."""
    problems = construction_problems(engine)
    problems += stop_problems(engine, run.stop_sequences, run.longest_stop_tokens)
    max_pages, hbm_problems, notes = effective_max_pages(engine, topology, model)
    unpackable = _single_prompt_problems(engine, max_pages, run)
    limit = batch_limit(engine, max_pages, run.longest, run.batch_size)
    engine_limit = batch_limit(engine, max_pages, run.longest)
    worst = run.longest
    if run.batch_size is not None and run.batch_size < worst.generations:
        unpackable.append(
            Problem(
                "batch_size",
                f"batch_size ({run.batch_size}) is fewer sequences than the {worst.generations} generations of one "
                f"prompt, which one engine call samples together. Set batch_size to {worst.generations} or more, "
                "or leave it unset.",
                worst.generations,
            )
        )
    problems += unpackable
    # 0 when the longest prompt, the most new tokens and the most generations (of different prompts) fit no call
    # together, though each prompt fits one: the packer sizes such batches by their own prompts
    if run.batch_size is not None and run.batch_size > engine_limit.sequences > 0:
        field = engine_limit.limited_by
        problems.append(
            Problem(
                "batch_size",
                f"batch_size ({run.batch_size}) is more sequences than one engine call completes in one wave for "
                f"these prompts: at most {engine_limit.sequences}, set by {field} "
                f"({_value(engine, max_pages, field)}). Set batch_size to {engine_limit.sequences} or less, or "
                "leave it unset.",
                engine_limit.sequences,
            )
        )
    hosts: tuple[HostPlan, ...] = ()
    if not unpackable:  # the other problems leave the packing as it is: show it
        hosts = _host_plans(engine, max_pages, run, topology.replicas)
    problems += hbm_problems
    if model is not None and max_pages is not None and topology.generation is not None and hosts:
        notes.append(
            f"HBM per chip: {gib(hbm_bytes_per_chip(engine, model, max_pages))} of "
            f"{gib(topology.generation.hbm_bytes_per_chip)} ({model.source})."
        )
    proposal = None
    if model is not None and run.demands:
        share = max(
            (h.sequences for h in hosts),
            default=ceil_div(sum(d.generations for d in run.demands), topology.replicas),
        )
        proposal = propose(engine, worst, share, topology, model)
    return CapacityPlan(
        engine, run, topology, model, max_pages, limit, hosts, proposal, tuple(problems), tuple(notes)
    )


def _single_prompt_problems(engine: EngineLimits, max_pages: int | None, run: RunSpec) -> list[Problem]:
    """Per field, the prompt that needs the most of it (one message each, not one per prompt): its value fixes
    every prompt, where the first failing prompt's might fix only that one."""
    found: dict[str, Problem] = {}
    for i, d in enumerate(run.demands):
        for p in prompt_problems(engine, max_pages, d, f"Prompt {i}"):
            if p.field not in found or (p.suggested or 0) > (found[p.field].suggested or 0):
                found[p.field] = p
    return list(found.values())


ENGINE_FIELDS = frozenset(f.name for f in fields(EngineLimits))


def verified_fixes(plan: CapacityPlan, rounds: int = 6) -> dict[str, int] | None:
    """Values for the problems' fields with which the run fits, checked by planning it again with them.

    Each round applies every remaining problem's suggestion and plans again, since one fix can raise another
    field's need (a longer ``max_seq_len`` needs more pages). None when a problem has no number or names a field
    outside the engine and ``batch_size``, or the rounds do not settle: then no value is offered as a fix.
    """
    fixes: dict[str, int] = {}
    current = plan
    for _ in range(rounds):
        if current.ok:
            return fixes
        for p in current.problems:
            if p.suggested is None or not (
                p.field == "batch_size" or p.field.removeprefix("engine.") in ENGINE_FIELDS
            ):
                return None
            fixes[p.field] = p.suggested
        sizes = {f.removeprefix("engine."): v for f, v in fixes.items() if f != "batch_size"}
        try:
            engine = replace(plan.engine, **sizes)
        except ValueError:  # a value the engine refuses outright
            return None
        run = replace(plan.run, batch_size=fixes.get("batch_size", plan.run.batch_size))
        current = plan_capacity(engine, run, plan.topology, plan.model)
    return fixes if current.ok else None


def as_flags(fixes: dict[str, int]) -> str:
    """``fixes`` as command-line overrides of the sampler and the planner."""
    return " ".join(f"--{name} {value}" for name, value in fixes.items())


def _host_plans(engine: EngineLimits, max_pages: int | None, run: RunSpec, num_hosts: int) -> tuple[HostPlan, ...]:
    costs = [prompt_cost(d.prompt_tokens, d.max_new_tokens, d.generations) for d in run.demands]
    packer = BatchPacker(engine, max_pages, run.batch_size)
    plans = []
    for host, shard in enumerate(all_shards(run.shard_strategy, num_hosts, costs)):
        demands = [run.demands[i] for i in shard]
        forecasts = [forecast(engine, demands[r.start : r.stop]) for r in packer.pack(demands)]
        plans.append(
            HostPlan(
                host=host,
                prompts=len(shard),
                sequences=sum(d.generations for d in demands),
                batch_sequences=tuple(f.sequences for f in forecasts),
                pages_peak=max((f.pages_at_full_length for f in forecasts), default=0),
                decode_iterations=sum(f.decode_iterations for f in forecasts),
                kv_tokens_read=sum(f.kv_tokens_read for f in forecasts),
            )
        )
    return tuple(plans)


def _value(engine: EngineLimits, max_pages: int | None, field: str) -> int | None:
    """The value in effect of an engine field that bounds the batch."""
    effective = {
        "engine.max_pages": max_pages,
        "engine.max_prefill_size": engine.prefill_size,
        "engine.max_tokens_per_round": engine.tokens_per_round,
    }
    return effective.get(field, getattr(engine, field.split(".", 1)[-1], None))
