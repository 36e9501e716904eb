"""What only the leader does, after every host has sent its rows: verify, merge, summarize, report.

Covers collecting the payloads (failing with the names of missing hosts), writing ``merged.jsonl`` only when every
(prompt, generation) pair arrived exactly once, ``summary.json``, ``timeline.png``, the printed table, the tracker,
and announcing ``done`` so the other hosts may exit. Leaves out the transport (:mod:`levanter_multihost.gather`)
and the summary's arithmetic (:mod:`levanter_multihost.summary`).
"""

import json
import logging
import time

from levanter_multihost import addition, outputs, summary, tracking
from levanter_multihost.gather import KvGather

logger = logging.getLogger(__name__)


def finish_as_leader(config, ctx, job, kv: KvGather) -> dict:
    """Collect every host's rows and write the merged output, summary and reports. Returns the summary."""
    with ctx.phase("gather"):
        received = kv.collect(config.gather_timeout_s)
    host_metrics = []
    rows = []
    for host, got in sorted(received.items()):
        metrics = dict(got.body["metrics"])
        metrics["gather_bytes"] = got.bytes
        sent_at = metrics["phases"]["write"][1]
        metrics["phases"]["gather"] = (sent_at, got.at - metrics["started_at"])
        host_metrics.append(metrics)
        rows.extend(got.body["rows"])
    with ctx.phase("merge"):
        merged = outputs.merge_rows(rows, len(job.prompts.texts), config.n_generations)
        outputs.write_atomic(outputs.join(config.output_dir, outputs.MERGED_NAME), outputs.jsonl_bytes(merged))
    result = summary.build_summary(
        host_metrics,
        merged,
        num_prompts=len(job.prompts.texts),
        inference_mode=config.inference_mode,
        wall_clock_s=time.time() - ctx.started_at,
        gather_s=ctx.seconds("gather"),
    )
    if config.task is not None:
        result["sample/task_accuracy"] = task_accuracy(config.task, merged)
    outputs.write_atomic(
        outputs.join(config.output_dir, outputs.SUMMARY_NAME),
        json.dumps({"summary": result, "hosts": host_metrics}, indent=2).encode("utf-8"),
    )
    png = tracking.timeline_png(host_metrics)
    outputs.write_atomic(outputs.join(config.output_dir, outputs.TIMELINE_NAME), png)
    with ctx.phase("tracker"):
        tracking.report(config.trainer.tracker, config.trainer.id, result, merged, png, config.skip_samples_table)
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
    logger.info("Merged %d rows into %s", len(merged), outputs.join(config.output_dir, outputs.MERGED_NAME))
    return result


def task_accuracy(task: str, rows) -> float:
    """Fraction of rows whose answer the task's checker accepts."""
    if task == "addition":
        return addition.accuracy(rows)
    raise ValueError(f"task ({task!r}) is not a known task. Use 'addition' or leave it unset.")
