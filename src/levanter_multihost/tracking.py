"""Leader-only reporting, once, after the gather: tracker summary, samples table, timeline picture.

Tracker calls made during generation, or on some hosts and not others, have crashed TPU slices, so nothing here
runs before the gather or on any host but the leader. Levanter's ``WandbConfig.init`` syncs run metadata across
hosts (a barrier every host must join), so for wandb the leader opens the run itself from the same config and
wraps it in Levanter's ``WandbTracker``; other trackers use their own ``init``. Leaves out computing the summary
(:mod:`levanter_multihost.summary`).
"""

import io
import logging
from collections.abc import Callable, Sequence
from typing import Any

from levanter.tracker import CompositeTracker, Tracker, TrackerConfig
from levanter.tracker.wandb import WandbConfig, WandbTracker

logger = logging.getLogger(__name__)

PHASES = ("startup", "prepare", "model_load", "engine_build", "prefill", "decode", "write", "gather")
PHASE_COLORS = ("#deddda", "#c0bfbc", "#77767b", "#e5a50a", "#3584e4", "#26a269", "#9141ac", "#c01c28")
TABLE_FIELDS = (
    "global_prompt_index",
    "generation_index",
    "process_index",
    "prompt",
    "generated_text",
    "generated_token_count",
    "finish_reason",
)


def open_tracker(tracker_config: TrackerConfig | Sequence[TrackerConfig], run_id: str | None) -> Tracker:
    """Create the tracker on the leader only, without any cross-host synchronization."""
    if isinstance(tracker_config, (list, tuple)):
        return CompositeTracker([open_tracker(c, run_id) for c in tracker_config])
    if isinstance(tracker_config, WandbConfig):
        import wandb

        run = wandb.init(
            entity=tracker_config.entity,
            project=tracker_config.project,
            name=tracker_config.name,
            tags=list(tracker_config.tags),
            id=tracker_config.id or run_id,
            group=tracker_config.group,
            mode=tracker_config.mode,
            resume=tracker_config.resume,
        )
        return WandbTracker(run)
    return tracker_config.init(run_id)


def report(
    tracker_config,
    run_id: str | None,
    summary: dict[str, Any],
    rows: Callable[[], Sequence[dict[str, Any]]],
    timeline_png: bytes | None,
    skip_samples_table: bool,
) -> None:
    """Log the summary, the samples table and the timeline once, then finish the tracker.

    ``rows`` returns the merged rows; it is called only for a wandb samples table.
    """
    tracker = open_tracker(tracker_config, run_id)
    try:
        tracker.log(summary, step=0)
        tracker.log_summary(summary)
        for wandb_tracker in _wandb_trackers(tracker):
            import wandb
            from PIL import Image

            media: dict[str, Any] = {}
            if not skip_samples_table:
                table = wandb.Table(columns=list(TABLE_FIELDS))
                for row in rows():
                    table.add_data(*[row[f] for f in TABLE_FIELDS])
                media["samples"] = table
            if timeline_png is not None:
                media["timeline"] = wandb.Image(Image.open(io.BytesIO(timeline_png)))
            if media:
                wandb_tracker.run.log(media, step=0)
    finally:
        tracker.finish()


def _wandb_trackers(tracker: Tracker) -> list[WandbTracker]:
    if isinstance(tracker, WandbTracker):
        return [tracker]
    if isinstance(tracker, CompositeTracker):
        return [t for sub in tracker.loggers for t in _wandb_trackers(sub)]
    return []


def timeline_png(host_metrics: Sequence[dict[str, Any]]) -> bytes:
    """A bar per host, one segment per phase, on a shared wall-clock axis (seconds since the first host started)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hosts = sorted(host_metrics, key=lambda m: m["host"])
    t0 = min(m["started_at"] for m in hosts)
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.45 * len(hosts)))
    for y, m in enumerate(hosts):
        offset = m["started_at"] - t0
        for phase, color in zip(PHASES, PHASE_COLORS):
            if phase in m["phases"]:
                start, end = m["phases"][phase]
                ax.barh(y, max(end - start, 1e-3), left=offset + start, color=color, height=0.6)
    ax.set_yticks(range(len(hosts)), [f"host {m['host']}" for m in hosts])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first host started")
    ax.set_title("Per-host timeline")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in PHASE_COLORS]
    ax.legend(handles, PHASES, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
