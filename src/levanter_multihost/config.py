"""The sampler's configuration: what to sample, with which model and engine, and where the outputs go.

One dataclass, read from YAML by draccus (one file per topology under ``config/sampler/``). Checks of its values
live in :mod:`levanter_multihost.preflight` and :mod:`levanter_multihost.plan`.
"""

from dataclasses import dataclass, field

import draccus
import jax.numpy as jnp
from levanter.compat.hf_checkpoints import RepoRef
from levanter.inference.engine import InferenceEngineConfig
from levanter.models.llama import LlamaConfig
from levanter.models.lm_model import LmConfig
from levanter.trainer import TrainerConfig

from levanter_multihost.ragged_attention import RaggedAttentionConfig

# InferenceEngineConfig.compute_dtype is a numpy dtype, which draccus cannot read from YAML on its own
draccus.decode.register(jnp.dtype, lambda value: jnp.dtype(value))
draccus.encode.register(jnp.dtype, lambda value: str(value))


@dataclass
class SampleLmMultihostConfig:
    """What to sample, with which model and engine, and where the outputs go."""

    hf_checkpoint: RepoRef | None = None
    """Hugging Face checkpoint (local directory, fsspec URL or hub id) to load. Set this or `checkpoint_path`."""
    checkpoint_path: str | None = None
    """Levanter checkpoint to load instead of `hf_checkpoint`; `model` then gives its architecture."""
    model: LmConfig = field(default_factory=LlamaConfig)
    """Model architecture; with `hf_checkpoint` it is read from the checkpoint's config."""
    tokenizer: str | None = None
    """Tokenizer to load; defaults to the one stored with `hf_checkpoint`."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Levanter runtime settings: per-host mesh (`model_axis_size`), precision (`mp`), tracker, distributed."""
    engine: InferenceEngineConfig = field(default_factory=lambda: InferenceEngineConfig(max_seq_len=2560))
    """Levanter InferenceEngine sizing: pages, sequences, prefill and decode budgets (one engine per host)."""
    ragged_attention: RaggedAttentionConfig = field(default_factory=RaggedAttentionConfig)
    """Block sizes and VMEM limit of the TPU ragged paged-attention kernel."""

    prompts: list[str] | None = None
    """Prompts, inline. Set this or `prompts_file`."""
    prompts_file: str | None = None
    """A .txt file (one prompt per line) or .jsonl file (a `prompt` field per line)."""
    max_new_tokens: int = 128
    """Tokens to generate per sequence (fewer if the stop sequence comes first)."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy."""
    stop_sequence: str | None = None
    """Stop generating a sequence once it ends with these tokens."""
    seed: int = 0
    """Seed of the per-prompt keys; each key depends only on this and the global prompt index."""
    n_generations: int = 1
    """Sequences sampled per prompt."""

    output_dir: str = "outputs/sample_lm_multihost"
    """Directory (local path or fsspec URL) for shard files, merged.jsonl and summary.json."""
    overwrite: bool = False
    """Replace the outputs of an earlier run in `output_dir`."""
    resume: bool = False
    """Keep the rows already in `output_dir` (same run fingerprint) and sample only the missing ones."""

    inference_mode: str = "host_data_parallel"
    """How work is split: `host_data_parallel` (each host samples its own shard on its own chips)."""
    shard_strategy: str = "contiguous"
    """`contiguous` slices of the prompt list, or `balanced` by estimated prompt cost."""
    tpu_type: str | None = None
    """The slice this config is written for (e.g. v5p-32); the planner checks the config against it."""

    defer_tracker_logs_until_end: bool = True
    """Log to the tracker only once, on the leader, after the gather. Required in host-DP mode."""
    skip_samples_table: bool = False
    """Do not log the samples table to the tracker."""
    progress_interval_s: float = 10.0
    """Seconds between each host's progress lines while it generates; 0 turns them off."""
    gather_timeout_s: float = 300.0
    """How long the leader waits for a host whose heartbeat stopped (dead or hung) before failing the run."""
    gather_chunk_bytes: int = 4 * 1024 * 1024
    """Largest value written to the key-value store in one piece."""
    task: str | None = None
    """Score the merged outputs with a task's exact-answer checker (`addition`); the accuracy joins the summary."""

    @property
    def is_host_data_parallel(self) -> bool:
        return self.inference_mode == "host_data_parallel"
