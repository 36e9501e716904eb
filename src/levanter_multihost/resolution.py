"""The config's one-time resolution: into the capacity the sampler and the planner share, then into a RunPlan.

:func:`resolve_capacity` is the one path from a :class:`~levanter_multihost.config.SampleLmMultihostConfig` to a
capacity plan (prompts → stop condition → engine limits → slice → model shape → run spec → auto-size →
capacity); the sampler (:func:`resolve`) and ``levanter-multihost-plan`` both call it and differ only in what
they load: the sampler a tokenizer and the run directory, the planner nothing that needs the network.
"""

import dataclasses
import json
import logging
import os
import subprocess
from dataclasses import dataclass

import draccus
import jax
import numpy as np
from levanter.compat.hf_checkpoints import RepoRef, load_tokenizer
from levanter.inference.engine import InferenceEngineConfig

from levanter_multihost import (
    addition,
    capacity_inputs,
    checks,
    encoding,
    fingerprint,
    host_input,
    model_loading,
    scoring,
    seams,
)
from levanter_multihost.capacity import CapacityPlan, PromptDemand, plan_capacity
from levanter_multihost.capacity.autosize import propose
from levanter_multihost.config import SampleLmMultihostConfig
from levanter_multihost.errors import ConfigError
from levanter_multihost.host_input import HostInput, LineIndex, TableIndex
from levanter_multihost.model_loading import model_vocab_size, resolve_location
from levanter_multihost.prompts import PromptError, PromptRecords, read_prompts
from levanter_multihost.replicas import Replicas
from levanter_multihost.rundir import RunDir, fingerprint_hash
from levanter_multihost.runplan import (
    EngineSettings,
    ModelSource,
    PromptSet,
    Reporting,
    RunPlan,
    Sampling,
    StopCondition,
)
from levanter_multihost.sharding import cost_ranges

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedCapacity:
    """A config resolved as far as capacity goes: what the sampler runs and what the planner prints."""

    prompts: PromptSet | None
    """The encoded prompts; None when the planner counts tokens without encoding (no tokenizer, or a fixed count)."""
    stop: StopCondition
    """Stop strings and EOS (without a tokenizer: a bound, each string at most its UTF-8 bytes in tokens)."""
    engine: InferenceEngineConfig
    """Levanter's engine config, with the planner's sizes when ``engine.auto_size`` is on."""
    capacity: CapacityPlan
    """The plan of that engine on the slice; not checked here (``capacity_inputs.check_capacity`` raises)."""
    token_count: str
    """How the prompts' tokens were counted, for the planner's notes."""


def resolve_capacity(
    config: SampleLmMultihostConfig,
    tokenizer,
    checkpoint: str | None,
    num_hosts: int,
    local_devices: int,
    prompt_tokens: int | None = None,
) -> ResolvedCapacity:
    """Everything capacity needs from ``config``, on ``num_hosts`` hosts of ``local_devices`` devices (``tpu_type``
    wins where set) in replicas of ``hosts_per_replica``, its values already checked (:func:`~levanter_multihost.checks.check_values`);
    ``tokenizer`` None counts each prompt as its
    UTF-8 bytes + 1, ``prompt_tokens`` as that many."""
    records = read_prompts(**prompt_source(config))
    checks.check_carried_columns(records, config.output_format)
    prompts = None
    max_new = encoding.per_prompt(records, "max_new_tokens", config.max_new_tokens)
    if tokenizer is not None and prompt_tokens is None:
        prompts = encoded(records, config, tokenizer)
        lengths, max_new = planned_lengths(prompts), prompts.max_new_tokens
        how = "Prompt token counts from the tokenizer, as the sampler counts them."
    elif prompt_tokens is not None:
        lengths = [prompt_tokens] * len(records)
        how = f"--prompt_tokens: every prompt counted as {prompt_tokens} tokens."
    else:
        lengths = byte_counts(records)
        how = (
            "The tokenizer does not load offline: each prompt counted as its UTF-8 bytes + 1, an upper bound. "
            "Pass --prompt_tokens N for a closer count."
        )
    stop = stop_condition(config, tokenizer, checkpoint)
    if prompts is None and records.completions is not None:  # counted without encoding: each as its bytes
        lengths = [n + len((c or "").encode("utf-8")) for n, c in zip(lengths, records.completions)]
        max_new = [0] * len(records)
    generations = encoding.per_prompt(records, "n_generations", config.n_generations)
    engine = config.engine.levanter()
    limits = capacity_inputs.engine_limits(engine)
    replicas = Replicas.of(config.hosts_per_replica, num_hosts)
    slice_ = capacity_inputs.topology(config.tpu_type, num_hosts, local_devices, replicas.hosts_per_replica)
    model = capacity_inputs.model_shape(checkpoint, config.trainer, limits) if slice_.generation is not None else None
    spec = capacity_inputs.run_spec(lengths, max_new, generations, stop, config.shard_strategy, config.batch_size)
    if config.engine.auto_size:
        engine = auto_sized(engine, limits, spec, slice_, model)
        limits = capacity_inputs.engine_limits(engine)
    capacity = with_replica_note(plan_capacity(limits, spec, slice_, model), config)
    return ResolvedCapacity(prompts, stop, engine, capacity, how)


def with_replica_note(capacity: CapacityPlan, config: SampleLmMultihostConfig) -> CapacityPlan:
    """``capacity`` with a note when replicas span hosts but the weights are sharded only within one host."""
    slice_ = capacity.topology
    if slice_.hosts_per_replica == 1 or config.trainer.model_axis_size > slice_.chips_per_host:
        return capacity
    note = (
        f"trainer.model_axis_size ({config.trainer.model_axis_size}) is no wider than a host's "
        f"{slice_.chips_per_host} chips: each replica holds a whole copy of the weights on every host. Set it to "
        f"{slice_.chips_per_replica} to shard them over the replica's hosts."
    )
    return dataclasses.replace(capacity, notes=(*capacity.notes, note))


def resolve_per_host(
    config: SampleLmMultihostConfig,
    tokenizer,
    checkpoint: str | None,
    num_hosts: int,
    local_devices: int,
    index: LineIndex | TableIndex,
    host: int,
) -> tuple[ResolvedCapacity, HostInput]:
    """Capacity for prompts read per host, from their scan alone (every host the same engine); each host checks
    its own prompts against that engine when it reads them (``read`` below)."""
    stop = stop_condition(config, tokenizer, checkpoint)
    engine = config.engine.levanter()
    limits = capacity_inputs.engine_limits(engine)
    replicas = Replicas.of(config.hosts_per_replica, num_hosts)
    slice_ = capacity_inputs.topology(config.tpu_type, num_hosts, local_devices, replicas.hosts_per_replica)
    model = capacity_inputs.model_shape(checkpoint, config.trainer, limits) if slice_.generation is not None else None
    # no prompt is parsed yet: this plan holds the engine's own checks, each host checks its prompts in `read`
    spec = capacity_inputs.run_spec([], [], [], stop, config.shard_strategy, config.batch_size)
    if config.engine.auto_size:
        # a row's bytes + 1 bound a text prompt's tokens with BOS (each token spells a byte, but a leading
        # space or BOS); the largest share counts the config's generations; rows beyond these fail in `read`
        worst = PromptDemand(int(index.row_bytes.max()) + 1, config.max_new_tokens, config.n_generations)
        generations = np.full(len(index), config.n_generations)
        costs = host_input.share_costs(index, config.max_new_tokens, generations, config.shard_strategy)
        largest = max(len(r) for r in cost_ranges(costs, replicas.num_replicas)) * config.n_generations
        engine = auto_sized(engine, limits, spec, slice_, model, (worst, largest))
        limits = capacity_inputs.engine_limits(engine)
    # a host's share is its replica's: checked as one replica's whole job
    one_replica = dataclasses.replace(slice_, num_hosts=replicas.hosts_per_replica)

    def read(start: int, end: int) -> PromptSet:
        """This host's prompts, with every check resolve makes of all prompts made of these."""
        records = index.read(start, end, (config.prompt_field, config.messages_field))
        checks.check_carried_columns(records, config.output_format)
        prompts = encoded(records, config, tokenizer, start)
        check_prompts(prompts, config, tokenizer)
        lengths, max_new, generations = planned_lengths(prompts), prompts.max_new_tokens, prompts.n_generations
        own = capacity_inputs.run_spec(lengths, max_new, generations, stop, config.shard_strategy, config.batch_size)
        capacity_inputs.check_capacity(plan_capacity(limits, own, one_replica, model), log=host == 0)
        return prompts

    source = HostInput(index, config.max_new_tokens, config.n_generations, config.shard_strategy, read)
    capacity = with_replica_note(plan_capacity(limits, spec, slice_, model), config)
    return ResolvedCapacity(None, stop, engine, capacity, "Per host, as each host reads its share."), source


def encoded(records: PromptRecords, config: SampleLmMultihostConfig, tokenizer, first: int = 0) -> PromptSet:
    """``records`` (the prompts from global index ``first`` on) tokenized, with the config's per-prompt defaults
    and their completions' tokens."""
    prompts = encoding.encode_prompts(
        records,
        tokenizer,
        chat_template=config.chat_template,
        add_bos=config.add_bos,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        n_generations=config.n_generations,
        top_k=config.top_k,
        top_p=config.top_p,
        min_p=config.min_p,
        seed=config.seed,
        first=first,
    )
    return scoring.with_completions(prompts, records.completions, tokenizer, config.prompt_logprobs, config.task)


def planned_lengths(prompts: PromptSet):
    """Each prompt's tokens as the planner counts them: scoring rows are one forward pass over prompt and
    completion."""
    if prompts.completions is None:
        return prompts.tokens.lengths
    return prompts.tokens.lengths + prompts.completions.lengths


def stop_condition(config: SampleLmMultihostConfig, tokenizer, checkpoint: str | None) -> StopCondition:
    """Stop strings and EOS; without a tokenizer a bound (each string at most its UTF-8 bytes in tokens)."""
    if tokenizer is not None:
        return encoding.stop_condition(
            tokenizer, list(config.stop_sequences), config.stop_at_eos, config.include_stop_in_text, checkpoint
        )
    # every token spells at least one byte; EOS, when on, is at least one more stop sequence of one token
    strings = tuple(config.stop_sequences)
    return StopCondition(
        strings, tuple(tuple(s.encode("utf-8")) for s in strings), eos_ids=(-1,) if config.stop_at_eos else ()
    )


def byte_counts(records: PromptRecords) -> list[int]:
    """Each prompt's UTF-8 bytes + 1: a bound on its tokens (a byte-level BPE token covers at least one byte)."""
    texts = [t if t is not None else json.dumps(m) for t, m in zip(records.texts, records.messages)]
    return [len(t.encode("utf-8")) + 1 for t in texts]


def resolve(config: SampleLmMultihostConfig, host: int, num_hosts: int, local_devices: int) -> RunPlan:
    """Every check that needs no model, and the plan the stages run; the same on every host."""
    checks.check_values(config, num_hosts, local_devices)
    checkpoint = (
        resolve_location(config.hf_checkpoint.model_name_or_path, "hf_checkpoint")
        if config.hf_checkpoint is not None
        else None
    )
    tokenizer_name = config.tokenizer or checkpoint
    if tokenizer_name is None:
        raise ConfigError(
            f"`tokenizer` is not set and `checkpoint_path` ({config.checkpoint_path}) is a Levanter "
            "checkpoint, which holds no tokenizer. Set `tokenizer`."
        )
    tokenizer = encoding.load_checked(load_tokenizer, resolve_location(tokenizer_name, "tokenizer"))
    vocab = model_vocab_size(checkpoint)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab}: token "
            "ids past the embedding would be garbage. Use the tokenizer the model was trained with."
        )
    index = host_input.per_host_index(**prompt_source(config), min_bytes=config.per_host_input_min_bytes)
    if index is None:
        resolved = resolve_capacity(config, tokenizer, checkpoint, num_hosts, local_devices)
        prompts = resolved.prompts
        check_prompts(prompts, config, tokenizer)
        fields = fingerprint.fields(
            config, fingerprint.prompts_digest(prompts, config.seed), len(prompts), checkpoint
        )
    else:
        resolved, prompts = resolve_per_host(config, tokenizer, checkpoint, num_hosts, local_devices, index, host)
        fields = fingerprint.fields(config, fingerprint.per_host_digest(config, index), len(index), checkpoint)
    revision = config.hf_checkpoint.revision if checkpoint is not None else None
    architecture = model_loading.architecture(
        capacity_inputs.hf_config(checkpoint, revision)[0] if checkpoint else None,
        config.model,
        f"hf_checkpoint {checkpoint}",
    )
    capacity = capacity_inputs.check_capacity(resolved.capacity, log=host == 0 and index is None)
    run_dir = RunDir(config.output_dir)
    run_dir.check_usable(host)
    if num_hosts > 1 and run_dir.is_local and jax.default_backend() == "tpu":
        logger.warning(
            "output_dir (%s) is a local path: on a multi-host slice every worker writes its parts to its own disk, "
            "merged.jsonl lives only on worker 0's, and all of it goes with the VMs. Use a bucket URL "
            "(gs://...) for anything worth keeping.",
            config.output_dir,
        )
    ref = None if checkpoint is None else RepoRef(checkpoint, config.hf_checkpoint.revision)
    return RunPlan(
        prompts=prompts,
        sampling=Sampling(
            seed=config.seed, stop=resolved.stop, logprobs=config.logprobs, prompt_logprobs=config.prompt_logprobs
        ),
        engine=EngineSettings(resolved.engine, capacity.engine, capacity.max_pages, config.batch_size),
        model=ModelSource(ref, config.checkpoint_path, architecture, config.trainer),
        tokenizer=tokenizer,
        run_dir=run_dir,
        fingerprint=fields,
        resume=config.resume,
        overwrite=config.overwrite,
        shard_strategy=config.shard_strategy,
        replicas=Replicas.of(config.hosts_per_replica, num_hosts),
        reporting=Reporting(
            tracker=config.trainer.tracker,
            run_name=config.run_name or os.path.basename(config.output_dir.rstrip("/")) or "levanter-multihost",
            run_id=config.trainer.id or os.environ.get("RUN_ID"),
            config={
                "config": {**draccus.encode(config), "model": model_loading.encoded(architecture)},
                "fingerprint": fingerprint_hash(fields),
                **provenance(),
            },
            samples_table_rows=config.samples_table_rows,
            task=config.task,
            progress_interval_s=config.progress_interval_s,
        ),
        output_format=config.output_format,
        merge=config.merge,
    )


def check_prompts(prompts: PromptSet, config: SampleLmMultihostConfig, tokenizer) -> None:
    """The checks of the encoded prompts: addition problems for the addition task, characters the tokenizer
    spells."""
    if config.task == "addition":
        bad = next((i for i, t in enumerate(prompts.texts) if not addition.is_prompt(t)), None)
        if bad is not None:
            raise PromptError(
                f"Prompt {prompts.first + bad} ({prompts.texts[bad]!r:.60}) is not an addition problem like "
                "'4821+377=', but task is addition. Leave task unset or give addition prompts."
            )
    if not config.allow_unknown_tokens:
        encoding.check_spelled(prompts, tokenizer)


def auto_sized(
    engine: InferenceEngineConfig,
    limits: capacity_inputs.EngineLimits,
    spec: capacity_inputs.RunSpec,
    slice_: capacity_inputs.Topology,
    model: capacity_inputs.ModelShape | None,
    bound: tuple[PromptDemand, int] | None = None,
) -> InferenceEngineConfig:
    """``engine`` with the planner's proposal applied (``engine.auto_size: true``): for ``spec``'s prompts, or,
    given a ``bound`` (the longest prompt's demand, the largest host share's sequences), for any prompts within
    it."""
    if slice_.generation is None or model is None:
        raise ConfigError(
            "engine.auto_size is true, but it needs the HBM of the chips and the model's shape: set "
            "tpu_type (e.g. v5p-32) and an hf_checkpoint whose config.json is readable here, or give "
            "the engine's sizes."
        )
    proposal = (
        propose(limits, *bound, slice_, model) if bound else plan_capacity(limits, spec, slice_, model).proposal
    )
    if proposal is None:
        raise ConfigError(
            f"engine.auto_size: the model's weights leave no room for a KV cache on a "
            f"{slice_.generation.name} chip. Shard more (trainer.tensor_parallel_axes) or use a "
            "larger slice."
        )
    logger.info("engine.auto_size: %s (limited by %s)", proposal.engine_fields(), proposal.limited_by)
    return dataclasses.replace(engine, **proposal.engine_fields())


def prompt_source(config: SampleLmMultihostConfig) -> dict:
    """The arguments of :func:`~levanter_multihost.prompts.read_prompts`; inline prompts win over a file."""
    return {
        "prompts": config.prompts,
        "file": config.prompts_file,
        "dataset": config.prompts_dataset,
        "split": config.prompts_split,
        "prompt_field": config.prompt_field,
        "messages_field": config.messages_field,
    }


def provenance() -> dict:
    """Git commit of the code (or ``LEVANTER_MULTIHOST_GIT_COMMIT``) and the pinned dependencies' versions."""
    commit = os.environ.get("LEVANTER_MULTIHOST_GIT_COMMIT")
    if commit is None:
        try:
            here = os.path.dirname(os.path.abspath(__file__))
            out = subprocess.run(
                ["git", "rev-parse", "HEAD"], check=False, cwd=here, capture_output=True, text=True, timeout=10
            )
            commit = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"git_commit": commit, "versions": seams.versions()}
