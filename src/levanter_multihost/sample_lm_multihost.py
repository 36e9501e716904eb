"""Sample many prompts from a Llama model on every host of a multi-host slice, host-data-parallel.

Every host loads the model onto its own chips, samples its shard of the prompts, writes its shard file and sends
its rows to the leader through the JAX distributed key-value store; the leader writes ``merged.jsonl``, a summary
and (optionally) logs to wandb.

    # 4 emulated hosts on this machine, tiny model
    uv run python infra/launch.py --local_hosts 4 -- \
        uv run python -m levanter_multihost.sample_lm_multihost --config_path config/sampler/tiny_local.yaml

    # one host (no launcher needed)
    uv run levanter-multihost-sample --config_path config/sampler/tiny_local.yaml
"""

import logging
from dataclasses import dataclass, field

import draccus
import jax.numpy as jnp

import levanter
from levanter.compat.hf_checkpoints import RepoRef
from levanter.inference.engine import InferenceEngineConfig
from levanter.models.llama import LlamaConfig
from levanter.models.lm_model import LmConfig
from levanter.trainer import TrainerConfig

from levanter_multihost import gather, model_loading, outputs, preflight, resume, runtime
from levanter_multihost.generation import WorkItem, build_engine, generate_rows
from levanter_multihost.leader import finish_as_leader
from levanter_multihost.ragged_attention import RaggedAttentionConfig, apply_ragged_attention
from levanter_multihost.sharding import prompt_cost, shard_for_host
from levanter_multihost.summary import host_metrics

logger = logging.getLogger(__name__)

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
    gather_timeout_s: float = 600.0
    """How long the leader waits for every host's rows (and the others for the leader) before failing."""
    gather_chunk_bytes: int = 4 * 1024 * 1024
    """Largest value written to the key-value store in one piece."""

    @property
    def is_host_data_parallel(self) -> bool:
        return self.inference_mode == "host_data_parallel"


def main(config: SampleLmMultihostConfig) -> None:
    ctx = runtime.start(config.trainer)
    apply_ragged_attention(config.ragged_attention)
    kv = gather.for_this_job(ctx.num_hosts, config.gather_chunk_bytes)
    with gather.failures_reported(kv, ctx.host):
        with ctx.phase("prepare"):
            job = preflight.prepare(config, ctx.host, ctx.num_hosts)
            resume.prepare_output_dir(config, job.fingerprint_fields, ctx.host, kv)
        shard, kept, todo = host_work(config, ctx, job)
        rows, stats = sample_shard(config, ctx, job, todo)
        with ctx.phase("write"):
            rows = sorted(rows + kept, key=lambda r: (r["global_prompt_index"], r["generation_index"]))
            outputs.write_shard(config.output_dir, ctx.host, ctx.num_hosts, rows)
        with ctx.phase("gather"):
            metrics = host_metrics(ctx.host, ctx.started_at, ctx.phases, len(shard), stats, len(kept))
            kv.send(ctx.host, {"rows": rows, "metrics": metrics})
        if ctx.is_leader:
            finish_as_leader(config, ctx, job, kv)
    if not ctx.is_leader:
        kv.wait_for("done", config.gather_timeout_s)


def host_work(config: SampleLmMultihostConfig, ctx, job):
    """This host's prompts, the rows of them already on disk (resume) and what is left to sample."""
    costs = [prompt_cost(len(t), config.max_new_tokens, config.n_generations) for t in job.prompts.token_ids]
    shard = shard_for_host(config.shard_strategy, ctx.num_hosts, ctx.host, costs)
    have = resume.existing_rows(config.output_dir, set(shard)) if config.resume else {}
    missing = resume.missing_generations(shard, config.n_generations, have)
    todo = [
        WorkItem(p, job.prompts.texts[p], job.prompts.token_ids[p], gens) for p, gens in sorted(missing.items())
    ]
    logger.info("host %d: %d prompts, %d rows on disk, %d prompts to sample", ctx.host, len(shard), len(have), len(todo))
    return shard, list(have.values()), todo


def sample_shard(config: SampleLmMultihostConfig, ctx, job, todo: list[WorkItem]):
    """Load the model onto this host's chips and sample ``todo``; no cross-host communication."""
    with model_loading.on_local_mesh(config.trainer):
        with ctx.phase("model_load"):
            model = model_loading.load_model(config, job.tokenizer)
        with ctx.phase("engine_build"):
            engine = build_engine(model, job.tokenizer, config.engine)
        with ctx.phase("generate"):
            rows, stats = generate_rows(
                engine,
                job.tokenizer,
                todo,
                n_generations=config.n_generations,
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                seed=config.seed,
                stop_ids=job.prompts.stop_ids,
                host=ctx.host,
                progress_interval_s=config.progress_interval_s,
            )
    start, end = ctx.phases["generate"]
    ctx.phases["prefill"] = (start, start + stats.prefill_s)
    ctx.phases["decode"] = (start + stats.prefill_s, end)
    return rows, stats


def cli():
    levanter.config.main(main)()


if __name__ == "__main__":
    cli()
