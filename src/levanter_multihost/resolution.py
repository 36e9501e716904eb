"""The config's one-time resolution: into the capacity the sampler and the planner share, then into a RunPlan.

:func:`resolve_capacity` is the one path from a :class:`~levanter_multihost.config.SampleLmMultihostConfig` to a
capacity plan (prompts → stop condition → engine limits → slice → model shape → run spec → auto-size →
capacity); the sampler (:func:`resolve`) and ``levanter-multihost-plan`` both call it and differ only in what
they load: the sampler a tokenizer and the run directory, the planner nothing that needs the network.
"""

import dataclasses
import hashlib
import json
import logging
import math
import os
import subprocess
from dataclasses import dataclass

import draccus
import jax
from levanter.compat.hf_checkpoints import RepoRef, load_tokenizer
from levanter.inference.engine import InferenceEngineConfig

from levanter_multihost import addition, capacity_inputs, checks, encoding, model_loading, scoring, seams
from levanter_multihost.capacity import CapacityPlan, plan_capacity
from levanter_multihost.config import TASKS, SampleLmMultihostConfig
from levanter_multihost.errors import ConfigError
from levanter_multihost.fingerprint import run_identity
from levanter_multihost.model_loading import model_vocab_size, resolve_location
from levanter_multihost.prompts import PromptError, PromptRecords, broken_rule, read_prompts
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
from levanter_multihost.sharding import STRATEGIES

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
    wins where set) in replicas of ``hosts_per_replica``, its values already checked (:func:`check_values`);
    ``tokenizer`` None counts each prompt as its
    UTF-8 bytes + 1, ``prompt_tokens`` as that many."""
    records = read_prompts(**prompt_source(config))
    checks.check_carried_columns(records, config.output_format)
    prompts = None
    max_new = encoding.per_prompt(records, "max_new_tokens", config.max_new_tokens)
    if tokenizer is not None and prompt_tokens is None:
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
        )
        prompts = scoring.with_completions(
            prompts, records.completions, tokenizer, config.prompt_logprobs, config.task
        )
        lengths, max_new = prompts.tokens.lengths, prompts.max_new_tokens
        if prompts.completions is not None:  # scoring rows: one forward pass over prompt and completion
            lengths = lengths + prompts.completions.lengths
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
    if tokenizer is not None:
        stop = encoding.stop_condition(
            tokenizer, list(config.stop_sequences), config.stop_at_eos, config.include_stop_in_text, checkpoint
        )
    else:  # every token spells at least one byte; EOS, when on, is at least one more stop sequence of one token
        strings = tuple(config.stop_sequences)
        stop = StopCondition(
            strings, tuple(tuple(s.encode("utf-8")) for s in strings), eos_ids=(-1,) if config.stop_at_eos else ()
        )
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
    capacity = plan_capacity(limits, spec, slice_, model)
    if replicas.hosts_per_replica > 1 and config.trainer.model_axis_size <= slice_.chips_per_host:
        note = (
            f"trainer.model_axis_size ({config.trainer.model_axis_size}) is no wider than a host's "
            f"{slice_.chips_per_host} chips: each replica holds a whole copy of the weights on every host. Set it to "
            f"{slice_.chips_per_replica} to shard them over the replica's hosts."
        )
        capacity = dataclasses.replace(capacity, notes=(*capacity.notes, note))
    return ResolvedCapacity(prompts, stop, engine, capacity, how)


def byte_counts(records: PromptRecords) -> list[int]:
    """Each prompt's UTF-8 bytes + 1: a bound on its tokens (a byte-level BPE token covers at least one byte)."""
    texts = [t if t is not None else json.dumps(m) for t, m in zip(records.texts, records.messages)]
    return [len(t.encode("utf-8")) + 1 for t in texts]


def resolve(config: SampleLmMultihostConfig, host: int, num_hosts: int, local_devices: int) -> RunPlan:
    """Every check that needs no model, and the plan the stages run; the same on every host."""
    check_values(config, num_hosts, local_devices)
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
    resolved = resolve_capacity(config, tokenizer, checkpoint, num_hosts, local_devices)
    prompts = resolved.prompts
    if config.task == "addition":
        bad = next((i for i, t in enumerate(prompts.texts) if not addition.is_prompt(t)), None)
        if bad is not None:
            raise PromptError(
                f"Prompt {bad} ({prompts.texts[bad]!r:.60}) is not an addition problem like "
                "'4821+377=', but task is addition. Leave task unset or give addition prompts."
            )
    if not config.allow_unknown_tokens:
        encoding.check_spelled(prompts, tokenizer)
    revision = config.hf_checkpoint.revision if checkpoint is not None else None
    architecture = model_loading.architecture(
        capacity_inputs.hf_config(checkpoint, revision)[0] if checkpoint else None,
        config.model,
        f"hf_checkpoint {checkpoint}",
    )
    capacity = capacity_inputs.check_capacity(resolved.capacity, log=host == 0)
    run_dir = RunDir(config.output_dir)
    run_dir.check_usable(host)
    if num_hosts > 1 and run_dir.is_local and jax.default_backend() == "tpu":
        logger.warning(
            "output_dir (%s) is a local path: on a multi-host slice every worker writes its parts to its own disk, "
            "merged.jsonl lives only on worker 0's, and all of it goes with the VMs. Use a bucket URL "
            "(gs://...) for anything worth keeping.",
            config.output_dir,
        )
    fields = fingerprint_fields(config, prompts, checkpoint)
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


def auto_sized(
    engine: InferenceEngineConfig,
    limits: capacity_inputs.EngineLimits,
    spec: capacity_inputs.RunSpec,
    slice_: capacity_inputs.Topology,
    model: capacity_inputs.ModelShape | None,
) -> InferenceEngineConfig:
    """``engine`` with the planner's proposal applied (``engine.auto_size: true``)."""
    if slice_.generation is None or model is None:
        raise ConfigError(
            "engine.auto_size is true, but it needs the HBM of the chips and the model's shape: set "
            "tpu_type (e.g. v5p-32) and an hf_checkpoint whose config.json is readable here, or give "
            "the engine's sizes."
        )
    proposal = plan_capacity(limits, spec, slice_, model).proposal
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


def check_values(config: SampleLmMultihostConfig, num_hosts: int, local_devices: int) -> None:
    """Checks on the config's own values for a job of ``num_hosts`` hosts of ``local_devices`` devices: each names
    the field, the value and the fix."""
    checks.check_limits(config)

    def number(name: str, low: float, *, integer: bool = False, strict: bool = True) -> None:
        value = getattr(config, name)
        kind = int if integer else (int, float)
        ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < low or (strict and value == low):
            raise ConfigError(
                f"{name} ({value}) must be {'an integer' if integer else 'a finite number'} "
                f"{'>' if strict else '>='} {low}."
            )

    number("max_new_tokens", 0, integer=True)
    number("n_generations", 0, integer=True)
    number("temperature", 0, strict=False)
    number("progress_interval_s", 0, strict=False)
    number("samples_table_rows", 0, integer=True, strict=False)
    if config.batch_size is not None:
        number("batch_size", 0, integer=True)
    for name in ("seed", "top_k", "top_p", "min_p"):
        rule = broken_rule(name, getattr(config, name))
        if rule is not None:
            raise ConfigError(f"{name} ({getattr(config, name)}) must be {rule}.")
    if (config.hf_checkpoint is None) == (config.checkpoint_path is None):
        raise ConfigError("Set exactly one of `hf_checkpoint` and `checkpoint_path`.")
    for name, allowed in {"shard_strategy": STRATEGIES, "output_format": ("jsonl", "parquet")}.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"{name} ({getattr(config, name)!r}) must be one of {list(allowed)}.")
    if not config.merge and config.output_format != "jsonl":
        raise ConfigError(
            f"output_format ({config.output_format!r}) is the merged file's, but merge is false: the JSONL parts are "
            "the output. Set output_format: jsonl, or merge: true."
        )
    if config.task is not None and config.task not in TASKS:
        raise ConfigError(f"task ({config.task!r}) is not a known task. Use one of {list(TASKS)} or leave it unset.")
    if config.resume and config.overwrite:
        raise ConfigError("`resume` and `overwrite` are both true. Choose one.")
    k = Replicas.of(config.hosts_per_replica, num_hosts).hosts_per_replica
    axis, devices = config.trainer.model_axis_size, k * local_devices
    if devices % axis != 0:
        where = (
            f"this host's {devices} devices"
            if k == 1
            else f"a replica's {devices} devices ({k} hosts x {local_devices})"
        )
        raise ConfigError(
            f"trainer.model_axis_size ({axis}) does not divide {where}. Set it to a divisor of {devices}."
        )


def fingerprint_fields(config: SampleLmMultihostConfig, prompts: PromptSet, checkpoint: str | None) -> dict:
    """What identifies a run's outputs: a resume refuses a directory, the leader a host, with other values."""
    digest = hashlib.sha256(json.dumps(prompts.texts).encode("utf-8"))
    for column in (prompts.tokens.flat, prompts.max_new_tokens, prompts.temperature, prompts.n_generations):
        digest.update(column.tobytes())
    controls = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": config.seed}
    for name, default in controls.items():  # only when set: the fingerprints of runs without them stay as they were
        if (getattr(prompts, name) != default).any():
            digest.update(name.encode() + getattr(prompts, name).tobytes())
    for extra in prompts.extra_json or ():
        digest.update(extra + b"\n")
    return {
        **run_identity(config, checkpoint),
        "precision": str(config.trainer.mp),
        "prompts_sha256": digest.hexdigest(),
        "num_prompts": len(prompts),
        "seed": config.seed,
        "temperature": config.temperature,
        "max_new_tokens": config.max_new_tokens,
        "n_generations": config.n_generations,
        "stop_sequences": list(config.stop_sequences),
        "stop_at_eos": config.stop_at_eos,
        "include_stop_in_text": config.include_stop_in_text,
        "logprobs": config.logprobs,
        **({"prompt_logprobs": True} if config.prompt_logprobs else {}),  # absent: older fingerprints stay valid
        **{name: getattr(config, name) for name, default in controls.items() if getattr(config, name) != default},
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
