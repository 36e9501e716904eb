"""What only the leader does, after sampling its own shard: collect the others, merge, summarize, report.

Covers collecting the other hosts' payloads (failing with the names of missing hosts) while keeping its own shard
out of the store, writing ``merged.jsonl`` only when every (prompt, generation) pair arrived exactly once (merged
line by line, see :func:`levanter_multihost.outputs.merge_jsonl`), ``summary.json`` with the leader's own phases
(``collect``, ``merge``, ``timeline``, ``tracker``; written before the tracker and again after it),
``timeline.png``, the printed table, the tracker, and announcing ``done`` so the other hosts may exit. The merged
rows are parsed into dicts only for what needs them (the task's accuracy, a wandb samples table), at most once.
Leaves out the transport (:mod:`levanter_multihost.gather`) and the summary's arithmetic
(:mod:`levanter_multihost.summary`).
"""

import functools
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from levanter_multihost import addition, outputs, summary, tracking
from levanter_multihost.gather import KvGather, Received

logger = logging.getLogger(__name__)


def finish_as_leader(config, ctx, job, kv: KvGather, header: dict[str, Any], shard: bytes) -> dict:
    """Collect the other hosts' shards, add this host's own (``header`` and ``shard``, the bytes of its shard file)
    and write the merged output, summary and reports. Returns the summary."""
    own = Received(header, shard, 0, time.time())
    with ctx.phase("collect"):
        received = {0: own, **kv.collect(config.gather_timeout_s, hosts=range(1, ctx.num_hosts))}
    host_metrics = [arrival_metrics(got) for _, got in sorted(received.items())]
    with ctx.phase("merge"):
        shards = [received[host].data for host in range(ctx.num_hosts)]
        merged = outputs.merge_jsonl(shards, len(job.prompts.texts), config.n_generations)
        outputs.write_atomic(outputs.join(config.output_dir, outputs.MERGED_NAME), merged)
    rows = parsed_once(merged)
    result = summary.build_summary(
        host_metrics,
        num_prompts=len(job.prompts.texts),
        inference_mode=config.inference_mode,
        wall_clock_s=time.time() - ctx.started_at,
        gather_s=ctx.seconds("collect"),
    )
    if config.task is not None:
        result["sample/task_accuracy"] = task_accuracy(config.task, rows())
    with ctx.phase("timeline"):
        png = tracking.timeline_png(host_metrics)
        outputs.write_atomic(outputs.join(config.output_dir, outputs.TIMELINE_NAME), png)
    write_summary(config, ctx, result, host_metrics)
    with ctx.phase("tracker"):
        tracking.report(config.trainer.tracker, config.trainer.id, result, rows, png, config.skip_samples_table)
    write_summary(config, ctx, result, host_metrics)
    kv.publish("done", True)
    logger.info("Per-host results:\n%s", summary.format_table(host_metrics, result))
    if config.task is not None:
        logger.info(
            "Task %s: %.1f%% exact answers; %.0f tokens/s over %d hosts",
            config.task,
            100 * result["sample/task_accuracy"],
            result["sample/decode_tokens_per_s"],
            ctx.num_hosts,
        )
    logger.info(
        "Merged %d rows into %s",
        result["sample/total_sequences"],
        outputs.join(config.output_dir, outputs.MERGED_NAME),
    )
    return result


def arrival_metrics(got: Received) -> dict:
    """A host's metrics with what only the leader knows: the bytes it sent and when its shard arrived."""
    metrics = dict(got.header["metrics"])
    metrics["gather_bytes"] = got.bytes
    sent_at = metrics["phases"]["write"][1]
    metrics["phases"] = {**metrics["phases"], "gather": [sent_at, got.at - metrics["started_at"]]}
    return metrics


def parsed_once(merged: bytes) -> Callable[[], list[dict]]:
    """The rows of ``merged.jsonl`` as dicts, parsed on the first call and kept."""
    return functools.cache(lambda: outputs.parse_jsonl(merged))


def write_summary(config, ctx, result: dict, host_metrics: list[dict]) -> None:
    """``summary.json``: the totals, every host's metrics, and the leader's own phases (``collect``, ``merge``,
    ``timeline``, ``tracker`` and those it ran as a host) in seconds since its ``started_at``."""
    leader = {"started_at": ctx.started_at, "phases": {name: list(span) for name, span in ctx.phases.items()}}
    outputs.write_atomic(
        outputs.join(config.output_dir, outputs.SUMMARY_NAME),
        json.dumps({"summary": result, "hosts": host_metrics, "leader": leader}, indent=2).encode("utf-8"),
    )


def task_accuracy(task: str, rows) -> float:
    """Fraction of rows whose answer the task's checker accepts."""
    if task == "addition":
        return addition.accuracy(rows)
    raise ValueError(f"task ({task!r}) is not a known task. Use 'addition' or leave it unset.")
