"""The sampler's configuration and its resolution into a checked :class:`~levanter_multihost.runplan.RunPlan`.

One dataclass, read from YAML by draccus (one file per topology under ``config/sampler/``), and :func:`resolve`,
the only code that reads it: every check that needs no model runs there, on every host, before anything loads.
"""

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import subprocess
from dataclasses import dataclass, field

import draccus
import jax
import jax.numpy as jnp
import levanter
from levanter.compat.hf_checkpoints import RepoRef, load_tokenizer
from levanter.inference.engine import InferenceEngineConfig
from levanter.models.llama import LlamaConfig
from levanter.models.lm_model import LmConfig
from levanter.trainer import TrainerConfig

from levanter_multihost import addition, checks, encoding, model_loading, plan, scoring, seams
from levanter_multihost.config_keys import keys, with_closest_keys
from levanter_multihost.errors import ConfigError
from levanter_multihost.fingerprint import run_identity
from levanter_multihost.model_loading import model_vocab_size, resolve_location
from levanter_multihost.prompts import PromptError, broken_rule, read_prompts
from levanter_multihost.rundir import RunDir, fingerprint_hash
from levanter_multihost.runplan import EngineSettings, ModelSource, PromptSet, Reporting, RunPlan, Sampling
from levanter_multihost.sharding import STRATEGIES

# InferenceEngineConfig.compute_dtype is a numpy dtype, which draccus cannot read from YAML on its own
draccus.decode.register(jnp.dtype, lambda value: jnp.dtype(value))
draccus.encode.register(jnp.dtype, lambda value: str(value))

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class EngineConfig(InferenceEngineConfig):
    """Levanter's engine config, plus sizing by the planner."""

    auto_size: bool = False
    """Replace max_seqs, max_seqs_in_prefill, max_queued_tokens, max_tokens_per_round, max_pages, max_prefill_size
    (and max_seq_len if too short) by the planner's proposal for these prompts: the largest batch whose KV cache
    fills `hbm_utilization` of the HBM the weights leave free (needs `tpu_type`; `levanter-multihost-plan` shows it)."""

    def levanter(self, **sizes) -> InferenceEngineConfig:
        """As Levanter's own config, with ``sizes`` replaced."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(InferenceEngineConfig)}
        return InferenceEngineConfig(**{**values, **sizes})


TASKS = ("addition",)


@dataclass
class SampleLmMultihostConfig:
    """What to sample, with which model and engine, and where the outputs go."""

    hf_checkpoint: RepoRef | None = None
    """Hugging Face checkpoint (local directory, fsspec URL or hub id) to load. Set this or `checkpoint_path`."""
    checkpoint_path: str | None = None
    """Levanter checkpoint to load instead of `hf_checkpoint`; `model` then gives its architecture."""
    tokenizer: str | None = None
    """Tokenizer to load; defaults to the one stored with `hf_checkpoint`."""
    prompts: list[str] | None = None
    """Prompts, inline; they win over `prompts_file` and `prompts_dataset`."""
    prompts_file: str | None = None
    """A .txt (one prompt per line), .jsonl (one object per line) or .parquet file, local or any fsspec URL."""
    prompts_dataset: str | None = None
    """A Hugging Face dataset: a local directory (save_to_disk, or data files) or a hub id."""
    prompts_split: str = "train"
    """Split of `prompts_dataset`."""
    prompt_field: str = "prompt"
    """Column holding a row's text prompt; every other column is carried into its outputs."""
    messages_field: str = "messages"
    """Column holding a row's chat (a list of {role, content}), rendered with the chat template."""
    chat_template: str | None = None
    """Jinja chat template for chat rows; defaults to the tokenizer's own."""
    add_bos: bool | None = None
    """Start text prompts with BOS; null follows the tokenizer (Llama-3 adds it, the tiny model has none)."""
    allow_unknown_tokens: bool = False
    """Sample prompts holding characters the tokenizer cannot spell (they become its unknown token); by default
    such a prompt is refused, naming it."""

    max_new_tokens: int = 128
    """Tokens to generate per sequence (fewer if it stops first); a `max_new_tokens` column overrides it per row."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy. A `temperature` column overrides it per row."""
    seed: int = 0
    """Seed of the sampling keys (all 64 bits count); a key depends only on this (or the row's `seed` column), the
    global prompt index and the generation."""
    top_k: int = 0
    """Sample from the k most likely tokens only; 0 keeps every token. A `top_k` column overrides it per row."""
    top_p: float = 1.0
    """Sample from the fewest most likely tokens whose probability reaches top_p (after top_k); 1 keeps every
    token. A `top_p` column overrides it per row."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0 keeps every token. A `min_p` column
    overrides it per row. Greedy (temperature 0) ignores top_k, top_p and min_p."""
    n_generations: int = 1
    """Sequences sampled per prompt; an `n_generations` column overrides it per row."""
    stop_sequences: list[str] = field(default_factory=list)
    """Stop a sequence at the first of these strings to appear (the engine holds `engine.max_stop_seqs`)."""
    stop_at_eos: bool = True
    """Stop a sequence at EOS (the tokenizer's and the checkpoint's generation_config.json eos_token_id)."""
    include_stop_in_text: bool = False
    """Keep the stop string in `generated_text`; token ids end with the token that completes it."""
    logprobs: bool = False
    """Write `generated_logprobs`: the log-probability of each generated token under the distribution it was sampled
    from (temperature-scaled; truncated by top_k, top_p, min_p and renormalized)."""
    prompt_logprobs: bool = False
    """Rows with a `completion` (scored, not generated): also write `prompt_logprobs`, one per prompt token after
    the first."""
    batch_size: int | None = None
    """Most sequences per engine call; null takes the largest the engine completes in one wave (the planner's)."""

    output_dir: str = "outputs/sample_lm_multihost"
    """Run directory (local path or fsspec URL): parts, the merged output, summary.json, run.json."""
    output_format: str = "jsonl"
    """`jsonl` (merged.jsonl) or `parquet` (merged.parquet)."""
    overwrite: bool = False
    """Replace the outputs of an earlier run in `output_dir` (once this run's merge is written)."""
    resume: bool = False
    """Keep the rows already in `output_dir` (same run fingerprint) and sample only the missing ones."""

    inference_mode: str = "host_data_parallel"
    """How work is split: `host_data_parallel` (each host samples its own share on its own chips)."""
    shard_strategy: str = "contiguous"
    """`contiguous` slices of the prompt list, or `balanced` by estimated prompt cost."""
    tpu_type: str | None = None
    """The slice this config is written for (e.g. v5p-32); the planner checks HBM against it."""

    run_name: str | None = None
    """Name of the run in the tracker and summary.json; defaults to the config file's name (on the command line),
    else the output directory's."""
    defer_tracker_logs_until_end: bool = True
    """Log to the tracker only once, on the leader, after the merge. Required in host-DP mode."""
    samples_table_rows: int = 256
    """Rows of the tracker's samples table (the first of the merged output); 0 for no table."""
    progress_interval_s: float = 10.0
    """Seconds between each host's progress lines while it samples; 0 turns them off."""
    engine_log: bool = False
    """Let Levanter's engine log every decode round (its time and tokens/s: the steady-state step on a TPU)."""
    silent_host_timeout_s: float = 300.0
    """A host (leader included) whose heartbeat has not moved this long is dead or hung; the others give up on it."""
    gather_chunk_bytes: int = 4 * 1024 * 1024
    """Largest value written to the key-value store in one piece."""
    task: str | None = None
    """Score the merged outputs with a task's exact-answer checker (`addition`); the accuracy joins the summary."""

    # nested settings last, so that --help lists the sampler's own fields first
    model: LmConfig = field(default_factory=LlamaConfig)
    """Model architecture; with `hf_checkpoint` it is read from the checkpoint's config."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Levanter runtime settings: per-host mesh (`model_axis_size`), precision (`mp`), tracker, distributed."""
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(max_seq_len=2560))
    """Levanter InferenceEngine sizing: pages, sequences, prefill and decode budgets (one engine per host), or
    `auto_size: true`."""
    ragged_attention: seams.RaggedAttentionConfig = field(default_factory=seams.RaggedAttentionConfig)
    """Block sizes and VMEM limit of the TPU ragged paged-attention kernel."""


def parse_command_line(argv: list[str]) -> SampleLmMultihostConfig:
    """The config from ``--config_path`` (a path or fsspec URL, as Levanter reads it) and draccus overrides.

    A key the config does not have is a :class:`ConfigError` of one line naming it and the closest valid keys,
    instead of argparse's usage (hundreds of lines) or a traceback. ``--help`` prints the usage as usual.
    """
    if any(a in ("-h", "--help") for a in argv):
        return levanter.config.main(_parsed, args=argv)()
    if "--config_path" in argv[:-1]:
        checks.check_yaml(argv[argv.index("--config_path") + 1])
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            config = levanter.config.main(_parsed, args=argv)()
        if config.run_name is None and "--config_path" in argv[:-1]:  # the run is named after its config file
            name = os.path.splitext(os.path.basename(argv[argv.index("--config_path") + 1]))[0]
            config = dataclasses.replace(config, run_name=name)
        return config
    except draccus.utils.ParsingError as e:
        raise ConfigError(with_closest_keys(str(e), keys(SampleLmMultihostConfig()))) from None
    except SystemExit as e:
        if e.code == 0:
            raise
        lines = stderr.getvalue().strip().splitlines()
        message = lines[-1].split("error: ", 1)[-1] if lines else str(e)
        raise ConfigError(with_closest_keys(message, keys(SampleLmMultihostConfig()))) from None


def _parsed(config: SampleLmMultihostConfig) -> SampleLmMultihostConfig:
    return config




def resolve(config: SampleLmMultihostConfig, host: int, num_hosts: int, local_devices: int) -> RunPlan:
    """Every check that needs no model, and the plan the stages run; the same on every host."""
    check_values(config, local_devices)
    checkpoint = resolve_location(config.hf_checkpoint.model_name_or_path, "hf_checkpoint") \
        if config.hf_checkpoint is not None else None  # fmt: skip
    tokenizer_name = config.tokenizer or checkpoint
    if tokenizer_name is None:
        raise ConfigError(f"`tokenizer` is not set and `checkpoint_path` ({config.checkpoint_path}) is a Levanter "
                          "checkpoint, which holds no tokenizer. Set `tokenizer`.")  # fmt: skip
    tokenizer = encoding.load_checked(load_tokenizer, resolve_location(tokenizer_name, "tokenizer"))
    vocab = model_vocab_size(checkpoint)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab}: token "
                          "ids past the embedding would be garbage. Use the tokenizer the model was trained with.")  # fmt: skip
    records = read_prompts(**prompt_source(config))
    checks.check_carried_columns(records, config.output_format)
    stop = encoding.stop_condition(tokenizer, list(config.stop_sequences), config.stop_at_eos,
                                   config.include_stop_in_text, checkpoint)  # fmt: skip
    prompts = encoding.encode_prompts(records, tokenizer, chat_template=config.chat_template, add_bos=config.add_bos,
                                      max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                      n_generations=config.n_generations, top_k=config.top_k, top_p=config.top_p,
                                      min_p=config.min_p, seed=config.seed)  # fmt: skip
    prompts = scoring.with_completions(prompts, records.completions, tokenizer, config.prompt_logprobs, config.task)
    if config.task == "addition":
        bad = next((i for i, t in enumerate(prompts.texts) if not addition.is_prompt(t)), None)
        if bad is not None:
            raise PromptError(f"Prompt {bad} ({prompts.texts[bad]!r:.60}) is not an addition problem like "
                              "'4821+377=', but task is addition. Leave task unset or give addition prompts.")  # fmt: skip
    if not config.allow_unknown_tokens:
        encoding.check_spelled(prompts, tokenizer)
    engine = config.engine.levanter()
    limits = plan.engine_limits(engine)
    slice_ = plan.topology(config.tpu_type, num_hosts, local_devices)
    model = plan.model_shape(checkpoint, config.trainer, limits) if config.tpu_type else None
    revision = config.hf_checkpoint.revision if checkpoint is not None else None
    architecture = model_loading.architecture(plan.hf_config(checkpoint, revision)[0] if checkpoint else None,
                                              config.model, f"hf_checkpoint {checkpoint}")  # fmt: skip
    spec = plan.run_spec(prompts, stop, config.shard_strategy, config.batch_size)
    if config.engine.auto_size:
        engine = auto_sized(engine, limits, spec, slice_, model)
        limits = plan.engine_limits(engine)
    capacity = plan.check_capacity(limits, spec, slice_, model, log=host == 0)
    run_dir = RunDir(config.output_dir)
    run_dir.check_usable(host)
    if num_hosts > 1 and run_dir.is_local and jax.default_backend() == "tpu":
        logger.warning(
            "output_dir (%s) is a local path: on a multi-host slice every worker writes its parts to its own disk, "
            "merged.jsonl lives only on worker 0's, and all of it goes with the VMs. Use a bucket URL "
            "(gs://...) for anything worth keeping.", config.output_dir,
        )  # fmt: skip
    fields = fingerprint_fields(config, prompts, checkpoint)
    ref = None if checkpoint is None else RepoRef(checkpoint, config.hf_checkpoint.revision)
    return RunPlan(
        prompts=prompts,
        sampling=Sampling(seed=config.seed, stop=stop, logprobs=config.logprobs,
                          prompt_logprobs=config.prompt_logprobs),
        engine=EngineSettings(engine, limits, capacity.max_pages, config.batch_size),
        model=ModelSource(ref, config.checkpoint_path, architecture, config.trainer),
        tokenizer=tokenizer,
        run_dir=run_dir,
        fingerprint=fields,
        resume=config.resume,
        overwrite=config.overwrite,
        shard_strategy=config.shard_strategy,
        timeouts=checks.timeouts(config),
        reporting=Reporting(
            tracker=config.trainer.tracker,
            run_name=config.run_name or os.path.basename(config.output_dir.rstrip("/")) or "levanter-multihost",
            run_id=config.trainer.id or os.environ.get("RUN_ID"),
            config={"config": {**draccus.encode(config), "model": model_loading.encoded(architecture)},
                    "fingerprint": fingerprint_hash(fields), **provenance()},
            samples_table_rows=config.samples_table_rows,
            task=config.task,
            progress_interval_s=config.progress_interval_s,
        ),
        chunk_bytes=config.gather_chunk_bytes,
        output_format=config.output_format,
    )


def auto_sized(engine: InferenceEngineConfig, limits: plan.EngineLimits, spec: plan.RunSpec,
               slice_: plan.Topology, model: plan.ModelShape | None) -> InferenceEngineConfig:  # fmt: skip
    """``engine`` with the planner's proposal applied (``engine.auto_size: true``)."""
    if slice_.generation is None or model is None:
        raise ConfigError("engine.auto_size is true, but it needs the HBM of the chips and the model's shape: set "
                          "tpu_type (e.g. v5p-32) and an hf_checkpoint whose config.json is readable here, or give "
                          "the engine's sizes.")  # fmt: skip
    proposal = plan.plan_capacity(limits, spec, slice_, model).proposal
    if proposal is None:
        raise ConfigError(f"engine.auto_size: the model's weights leave no room for a KV cache on a "
                          f"{slice_.generation.name} chip. Shard more (trainer.tensor_parallel_axes) or use a "
                          "larger slice.")  # fmt: skip
    logger.info("engine.auto_size: %s (limited by %s)", proposal.engine_fields(), proposal.limited_by)
    return dataclasses.replace(engine, **proposal.engine_fields())


def prompt_source(config: SampleLmMultihostConfig) -> dict:
    """The arguments of :func:`~levanter_multihost.prompts.read_prompts`; inline prompts win over a file."""
    return {"prompts": config.prompts, "file": config.prompts_file, "dataset": config.prompts_dataset,
            "split": config.prompts_split, "prompt_field": config.prompt_field,
            "messages_field": config.messages_field}  # fmt: skip


def check_values(config: SampleLmMultihostConfig, local_devices: int) -> None:
    """Checks on the config's own values: each names the field, the value and the fix."""
    checks.check_limits(config)

    def number(name: str, low: float, *, integer: bool = False, strict: bool = True) -> None:
        value = getattr(config, name)
        kind = int if integer else (int, float)
        ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < low or (strict and value == low):
            raise ConfigError(f"{name} ({value}) must be {'an integer' if integer else 'a finite number'} "
                              f"{'>' if strict else '>='} {low}.")  # fmt: skip

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
    choices = {"inference_mode": ("host_data_parallel",), "shard_strategy": STRATEGIES,
               "output_format": ("jsonl", "parquet")}  # fmt: skip
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"{name} ({getattr(config, name)!r}) must be one of {list(allowed)}.")
    if config.task is not None and config.task not in TASKS:
        raise ConfigError(f"task ({config.task!r}) is not a known task. Use one of {list(TASKS)} or leave it unset.")
    if not config.defer_tracker_logs_until_end:
        raise ConfigError(
            "defer_tracker_logs_until_end is false, but host-data-parallel mode logs to the tracker only once, on "
            "the leader, after the merge: tracker calls during generation or on some hosts only have crashed TPU "
            "slices. Set defer_tracker_logs_until_end: true."
        )
    if config.resume and config.overwrite:
        raise ConfigError("`resume` and `overwrite` are both true. Choose one.")
    axis = config.trainer.model_axis_size
    if local_devices % axis != 0:
        raise ConfigError(f"trainer.model_axis_size ({axis}) does not divide this host's {local_devices} devices. "
                          f"Set it to a divisor of {local_devices}.")  # fmt: skip


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
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
            commit = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"git_commit": commit, "versions": seams.versions()}
