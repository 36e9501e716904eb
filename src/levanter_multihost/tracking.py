"""Leader-only reporting, once, after the merge: the run's config, summary, samples table and timeline picture.

Tracker calls made during generation, or on some hosts and not others, have crashed TPU slices, so nothing here
runs before the merge or on any host but the leader. Levanter's ``WandbConfig.init`` syncs run metadata across
hosts (a barrier every host must join), so for wandb the leader opens the run itself from the same config and
wraps it in Levanter's ``WandbTracker``; other trackers use their own ``init``. Everything goes through Levanter's
tracker API (``log_hyperparameters``, ``log``, ``log_summary``); only the table and the picture use wandb types.
"""

import io
import logging
from collections.abc import Sequence
from typing import Any

from levanter.tracker import CompositeTracker, Tracker, TrackerConfig
from levanter.tracker.wandb import WandbConfig, WandbTracker

from levanter_multihost.runplan import Reporting
from levanter_multihost.summary import HostMetrics

logger = logging.getLogger(__name__)

PHASES = ("startup", "prepare", "model_load", "engine_build", "compile", "prefill", "decode", "write", "wait", "send")
"""Timeline segments, in the order they are drawn and listed."""
PHASE_COLORS = (
    "#deddda",
    "#c0bfbc",
    "#77767b",
    "#e5a50a",
    "#f66151",
    "#3584e4",
    "#26a269",
    "#9141ac",
    "#f6f5f4",
    "#c01c28",
)
TABLE_FIELDS = (
    "global_prompt_index",
    "generation_index",
    "process_index",
    "prompt",
    "generated_text",
    "generated_token_count",
    "finish_reason",
)
SCORE_TABLE_FIELDS = (
    "global_prompt_index",
    "process_index",
    "prompt",
    "completion",
    "completion_logprob",
    "is_greedy",
)
"""The samples table of a scoring run (``completion`` is the input's column)."""


def open_tracker(tracker_config: TrackerConfig | Sequence[TrackerConfig], reporting: Reporting) -> Tracker:
    """Create the tracker on the leader only, without any cross-host synchronization."""
    if isinstance(tracker_config, (list, tuple)):
        return CompositeTracker([open_tracker(c, reporting) for c in tracker_config])
    if isinstance(tracker_config, WandbConfig):
        import wandb

        run = wandb.init(
            entity=tracker_config.entity,
            project=tracker_config.project,
            name=tracker_config.name or reporting.run_name,
            tags=list(tracker_config.tags),
            id=tracker_config.id or reporting.run_id,
            group=tracker_config.group,
            mode=tracker_config.mode,
            resume=tracker_config.resume,
        )
        return WandbTracker(run)
    return tracker_config.init(reporting.run_id)


def report(
    reporting: Reporting, summary: dict[str, Any], samples: Sequence[dict], timeline_png: bytes | None
) -> None:
    """Log the config, the summary, the samples table and the timeline once, then finish the tracker."""
    tracker = open_tracker(reporting.tracker, reporting)
    try:
        tracker.log_hyperparameters(reporting.config)
        tracker.log(summary, step=0)
        tracker.log_summary(summary)
        for wandb_tracker in _wandb_trackers(tracker):
            import wandb
            from PIL import Image

            media: dict[str, Any] = {}
            if reporting.samples_table_rows > 0:
                columns = SCORE_TABLE_FIELDS if samples and "is_greedy" in samples[0] else TABLE_FIELDS
                table = wandb.Table(columns=list(columns))
                for row in samples[: reporting.samples_table_rows]:
                    table.add_data(*[row[f] for f in columns])
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


def timeline_png(host_metrics: Sequence[HostMetrics], leader_phases: dict[str, Any] | None = None) -> bytes:
    """A bar per host, one segment per phase, on a shared wall-clock axis (seconds since the first host started);
    the leader's own merge and report phases on a bar of their own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hosts = sorted(host_metrics, key=lambda m: m.host)
    t0 = min(m.started_at for m in hosts)
    bars = [(f"host {m.host}", m.started_at - t0, m.phases) for m in hosts]
    if leader_phases is not None:
        bars.append(("leader", leader_phases["started_at"] - t0, leader_phases["phases"]))
    leader_colors = {"collect": "#f6f5f4", "merge": "#1c71d8", "timeline": "#813d9c", "tracker": "#a51d2d"}
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.45 * len(bars)))
    for y, (_, offset, phases) in enumerate(bars):
        colors = dict(zip(PHASES, PHASE_COLORS)) if y < len(hosts) else leader_colors
        for phase, color in colors.items():
            for start, end in _spans(phases.get(phase)):
                ax.barh(y, max(end - start, 1e-3), left=offset + start, color=color, height=0.6)
    ax.set_yticks(range(len(bars)), [name for name, _, _ in bars])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first host started")
    ax.set_title("Per-host timeline")
    names = [*PHASES, *leader_colors] if leader_phases is not None else list(PHASES)
    colors = [*PHASE_COLORS, *leader_colors.values()] if leader_phases is not None else list(PHASE_COLORS)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors]
    ax.legend(handles, names, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _spans(value) -> list[tuple[float, float]]:
    """A phase is one [start, end] span or a list of them (one per batch)."""
    if not value:
        return []
    return [tuple(value)] if not isinstance(value[0], (list, tuple)) else [tuple(v) for v in value]
