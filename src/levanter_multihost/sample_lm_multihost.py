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
import os

# Levanter's engine checks its bookkeeping with Equinox's ``error_if``, which by default compiles to host callbacks,
# and JAX never writes a program with host callbacks to the persistent compilation cache: the engine would compile
# on every run. As NaN poisoning the checks still run and the programs can be cached. Equinox reads this when it is
# imported, hence before the imports below; ``EQX_ON_ERROR=raise`` in the environment restores raising.
os.environ.setdefault("EQX_ON_ERROR", "nan")

import levanter

from levanter_multihost import gather, model_loading, outputs, preflight, resume, runtime
from levanter_multihost.config import SampleLmMultihostConfig
from levanter_multihost.generation import GenerationStats, WorkItem, build_engine, generate_rows
from levanter_multihost.leader import finish_as_leader
from levanter_multihost.ragged_attention import apply_ragged_attention
from levanter_multihost.sharding import prompt_cost, shard_for_host
from levanter_multihost.summary import host_metrics

logger = logging.getLogger(__name__)


def main(config: SampleLmMultihostConfig) -> None:
    ctx = runtime.start(config.trainer)
    apply_ragged_attention(config.ragged_attention)
    kv = gather.for_this_job(ctx.num_hosts, config.gather_chunk_bytes)
    alive = kv.heartbeat(ctx.host, interval_s=min(2.0, config.gather_timeout_s / 4))
    with gather.failures_reported(kv, ctx.host):
        with ctx.phase("prepare"):
            job = preflight.prepare(config, ctx.host, ctx.num_hosts)
            resume.prepare_output_dir(config, job.fingerprint_fields, ctx.host, kv)
        shard, kept, todo = host_work(config, ctx, job)
        rows, stats = sample_shard(config, ctx, job, todo)
        with ctx.phase("write"):
            rows = sorted(rows + kept, key=lambda r: (r["global_prompt_index"], r["generation_index"]))
            data = outputs.jsonl_bytes(rows)
            outputs.write_shard(config.output_dir, ctx.host, ctx.num_hosts, data)
        with ctx.phase("gather"):
            metrics = host_metrics(ctx.host, ctx.started_at, ctx.phases, len(shard), stats, len(kept), rows)
            header = {"metrics": metrics}
            if not ctx.is_leader:
                kv.send(ctx.host, header, data)
            alive.set()
        if ctx.is_leader:
            finish_as_leader(config, ctx, job, kv, header, data)
    if not ctx.is_leader:
        kv.wait_for("done", gather.LEADER_WAIT_S)


def host_work(config: SampleLmMultihostConfig, ctx, job):
    """This host's prompts, the rows of them already on disk (resume) and what is left to sample."""
    costs = [prompt_cost(len(t), config.max_new_tokens, config.n_generations) for t in job.prompts.token_ids]
    shard = shard_for_host(config.shard_strategy, ctx.num_hosts, ctx.host, costs)
    have = resume.existing_rows(config.output_dir, set(shard)) if config.resume else {}
    missing = resume.missing_generations(shard, config.n_generations, have)
    todo = [WorkItem(p, job.prompts.texts[p], job.prompts.token_ids[p], gens) for p, gens in sorted(missing.items())]
    logger.info(
        "host %d: %d prompts, %d rows on disk, %d prompts to sample", ctx.host, len(shard), len(have), len(todo)
    )
    return shard, list(have.values()), todo


def sample_shard(config: SampleLmMultihostConfig, ctx, job, todo: list[WorkItem]):
    """Load the model onto this host's chips and sample ``todo``; no cross-host communication.

    A host with nothing to sample (an empty shard, or every row already on disk) loads nothing.
    """
    if not todo:
        return [], GenerationStats()
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
    try:
        levanter.config.main(main)()
    except Exception:
        logger.exception("Sampling failed")
        runtime.exit_now(1)


if __name__ == "__main__":
    cli()
