"""The sampler's configuration and the command line that builds it.

One dataclass, read from YAML by draccus (one file per topology under ``config/sampler/``) with command-line
overrides (:func:`parse_command_line`); :mod:`levanter_multihost.resolution` is the only code that reads it.
"""

import contextlib
import dataclasses
import io
import os
from dataclasses import dataclass, field

import draccus
import jax.numpy as jnp
import levanter
import yaml
from levanter.compat.hf_checkpoints import RepoRef
from levanter.inference.engine import InferenceEngineConfig
from levanter.models.llama import LlamaConfig
from levanter.models.lm_model import LmConfig
from levanter.tracker import TrackerConfig
from levanter.trainer import TrainerConfig

from levanter_multihost import checks, seams
from levanter_multihost.config_keys import keys, with_closest_keys
from levanter_multihost.errors import ConfigError

# InferenceEngineConfig.compute_dtype is a numpy dtype, which draccus cannot read from YAML on its own
draccus.decode.register(jnp.dtype, lambda value: jnp.dtype(value))
draccus.encode.register(jnp.dtype, lambda value: str(value))

TRACKER_FLAG = "--trainer.tracker."
"""Prefix of one tracker setting on the command line (``--trainer.tracker.mode offline``)."""


@dataclass(frozen=True)
class EngineConfig(InferenceEngineConfig):
    """Levanter's engine config, plus sizing by the planner."""

    auto_size: bool = False
    """Replace max_seqs, max_seqs_in_prefill, max_queued_tokens, max_tokens_per_round, max_pages, max_prefill_size
    (and max_seq_len if too short) by the planner's proposal for these prompts: the largest batch whose KV cache
    fills `hbm_utilization` of the HBM the weights leave free (needs `tpu_type`; `levanter-multihost-plan` shows
    it)."""

    def levanter(self, **sizes) -> InferenceEngineConfig:
        """As Levanter's own config, with ``sizes`` replaced."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(InferenceEngineConfig)}
        return InferenceEngineConfig(**{**values, **sizes})


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
    per_host_input_min_bytes: int | None = 8 * 1024**2
    """A .txt, .jsonl or .parquet `prompts_file`, or a `prompts_dataset` saved with `save_to_disk`, of this many bytes
    or more is read per host: each host scans it without parsing its rows and reads, checks and tokenizes only its
    share (docs/usage.md). Smaller inputs, inline prompts and datasets loaded by name are read whole by every host;
    null reads every input whole."""
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
    merge: bool = True
    """Merge every part into one file through the leader. False: the parts are the output, a sharded dataset that
    `_index.json` lists (rows, SHA-256) and README.md's front matter lets `datasets.load_dataset(output_dir)` load;
    the hosts send the leader only each part's manifest. Set it yourself: the layout never switches by size."""
    overwrite: bool = False
    """Replace the outputs of an earlier run in `output_dir` (once this run's merge is written)."""
    resume: bool = False
    """Keep the rows already in `output_dir` (same run fingerprint) and sample only the missing ones."""

    shard_strategy: str = "contiguous"
    """`contiguous` slices of the prompt list, or `balanced` by estimated prompt cost."""
    hosts_per_replica: int = 1
    """Hosts that run one copy of the model together: their chips form one mesh (tensor-parallel over
    `trainer.model_axis_size` of them), they sample the same batches and the first of them writes the rows. 1 gives
    every host its own copy; 0 one copy over every host (a global mesh). Must divide the job's host count."""
    tpu_type: str | None = None
    """The slice this config is written for (e.g. v5p-32); the planner checks HBM against it."""

    run_name: str | None = None
    """Name of the run in the tracker and summary.json; defaults to the config file's name (on the command line),
    else the output directory's."""
    samples_table_rows: int = 256
    """Rows of the tracker's samples table (the first of the merged output); 0 for no table."""
    progress_interval_s: float = 10.0
    """Seconds between each host's progress lines while it samples; 0 turns them off."""
    engine_log: bool = False
    """Let Levanter's engine log every decode round (its time and tokens/s: the steady-state step on a TPU)."""
    silent_host_timeout_s: float = 60.0
    """A host (leader included) whose heartbeat has not moved this long is dead or hung; the others give up on it.
    Below JAX's own 100 s heartbeat timeout, so this names the host before JAX kills the job without saying which."""
    gather_chunk_bytes: int = 4 * 1024 * 1024
    """Largest value written to the key-value store in one piece."""
    task: str | None = None
    """Score the merged outputs with a task's exact-answer checker (`addition`); the accuracy joins the summary."""

    # nested settings last, so that --help lists the sampler's own fields first
    model: LmConfig = field(default_factory=LlamaConfig)
    """Model architecture; with `hf_checkpoint` it is read from the checkpoint's config."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Levanter runtime settings: the replica's mesh (`model_axis_size`: chips of its model axis, a divisor of
    hosts_per_replica x the chips of a host), precision (`mp`), tracker, distributed."""
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(max_seq_len=2560))
    """Levanter InferenceEngine sizing: pages, sequences, prefill and decode budgets (one engine per host), or
    `auto_size: true`."""
    ragged_attention: seams.RaggedAttentionConfig = field(default_factory=seams.RaggedAttentionConfig)
    """Block sizes and VMEM limit of the TPU ragged paged-attention kernel."""


def parse_command_line(argv: list[str]) -> SampleLmMultihostConfig:
    """The config from ``--config_path`` (a path or fsspec URL, as Levanter reads it) and draccus overrides.

    A key the config does not have is a :class:`ConfigError` of one line naming it and the closest valid keys,
    instead of argparse's usage (hundreds of lines) or a traceback; so is a value Levanter's own configs refuse.
    ``--help`` prints the usage as usual. ``--trainer.tracker.<key> value`` sets one tracker setting
    (:func:`with_tracker_settings`).
    """
    if any(a in ("-h", "--help") for a in argv):
        return levanter.config.main(_parsed, args=argv)()
    if "--config_path" in argv[:-1]:
        checks.check_yaml(argv[argv.index("--config_path") + 1])
    argv, tracker_settings = _split_tracker_settings(argv)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            config = levanter.config.main(_parsed, args=argv)()
    except draccus.utils.ParsingError as e:  # the cause says why, e.g. InferenceEngineConfig.__post_init__'s check
        cause = f": {e.__cause__}" if e.__cause__ else ""
        raise ConfigError(with_closest_keys(str(e), keys(SampleLmMultihostConfig())) + cause) from None
    except SystemExit as e:
        if e.code == 0:
            raise
        lines = stderr.getvalue().strip().splitlines()
        raise ConfigError(
            with_closest_keys(lines[-1].split("error: ", 1)[-1] if lines else str(e), keys(SampleLmMultihostConfig()))
        ) from None
    except OSError as e:
        raise ConfigError(f"The config cannot be read: {e}") from None
    except (ValueError, TypeError) as e:  # e.g. InferenceEngineConfig.__post_init__ on the values given
        raise ConfigError(f"The config cannot be parsed: {e}{f': {e.__cause__}' if e.__cause__ else ''}") from None
    if tracker_settings:
        config = with_tracker_settings(config, tracker_settings)
    if config.run_name is None and "--config_path" in argv[:-1]:  # the run is named after its config file
        name = os.path.splitext(os.path.basename(argv[argv.index("--config_path") + 1]))[0]
        config = dataclasses.replace(config, run_name=name)
    return config


def _split_tracker_settings(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """``argv`` without its ``--trainer.tracker.<key>`` settings, and those settings (values as written).

    draccus takes ``trainer.tracker`` only whole (it is a union of one tracker and a list of them), so its keys are
    applied after parsing.
    """
    rest, settings = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(TRACKER_FLAG):
            key, eq, value = arg[len(TRACKER_FLAG) :].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg} has no value. Give one, e.g. {TRACKER_FLAG}mode offline.")
                value = argv[i + 1]
                i += 1
            settings[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, settings


def with_tracker_settings(config: SampleLmMultihostConfig, settings: dict[str, str]) -> SampleLmMultihostConfig:
    """``config`` with tracker keys set (values read as YAML); a new ``type`` starts from that tracker's defaults."""
    current = config.trainer.tracker
    if not isinstance(current, TrackerConfig):
        raise ConfigError(
            f"trainer.tracker is a list of trackers; {TRACKER_FLAG}<key> sets one tracker's key. Give "
            "the list whole: --trainer.tracker '[{type: wandb, mode: offline}]'."
        )
    values = {k: yaml.safe_load(v) for k, v in settings.items()}
    kind = values.pop("type", TrackerConfig.get_choice_name(type(current)))
    base = draccus.encode(current) if kind == TrackerConfig.get_choice_name(type(current)) else {}
    try:
        tracker = draccus.decode(TrackerConfig, {"type": kind, **base, **values})
    except (draccus.utils.ParsingError, draccus.utils.DecodingError, ValueError, TypeError) as e:
        flags = " ".join(f"{TRACKER_FLAG}{k} {v}" for k, v in settings.items())
        raise ConfigError(f"{flags}: not a tracker setting ({e}).".replace("\n", " ")) from None
    return dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, tracker=tracker))


def _parsed(config: SampleLmMultihostConfig) -> SampleLmMultihostConfig:
    return config
