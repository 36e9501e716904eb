"""The run summary the leader builds from every host's metrics.

Covers the ``sample/*`` totals, per-host ``host/<i>/<name>`` metrics, round-time spread and imbalance, and the
readable table printed at the end. Totals come from the metrics (each host counts the rows and tokens of the
shard it sent), so the merged rows need not be parsed. Leaves out where the summary goes
(:mod:`levanter_multihost.tracking`). No JAX import.
"""

from collections.abc import Sequence
from typing import Any

HOST_METRICS = (
    "prompts",
    "sequences",
    "rows_resumed",
    "shard_rows",
    "shard_tokens",
    "tokens_generated",
    "model_load_s",
    "engine_build_s",
    "prefill_s",
    "decode_s",
    "round_total_s",
    "decode_tokens_per_s",
    "pages_in_use_after_decode",
    "pages_free_after_decode",
    "pages_peak",
    "write_s",
    "gather_bytes",
)
TABLE_COLUMNS = (
    ("host", "host", "{:d}"),
    ("prompts", "prompts", "{:d}"),
    ("sequences", "seqs", "{:d}"),
    ("tokens_generated", "tokens", "{:d}"),
    ("model_load_s", "load s", "{:.1f}"),
    ("engine_build_s", "build s", "{:.1f}"),
    ("prefill_s", "prefill s", "{:.1f}"),
    ("decode_s", "decode s", "{:.1f}"),
    ("decode_tokens_per_s", "tok/s", "{:.0f}"),
    ("pages_peak", "pages", "{:d}"),
    ("gather_bytes", "sent B", "{:d}"),
)


def build_summary(
    host_metrics: Sequence[dict[str, Any]],
    *,
    num_prompts: int,
    inference_mode: str,
    wall_clock_s: float,
    gather_s: float,
) -> dict[str, Any]:
    """Flat summary: ``sample/*`` totals and ``host/<i>/<metric>`` for every host, idle hosts included."""
    rounds = [m["round_total_s"] for m in host_metrics]
    mean_round = sum(rounds) / len(rounds) if rounds else 0.0
    out: dict[str, Any] = {
        "sample/total_prompts": num_prompts,
        "sample/total_sequences": sum(m["shard_rows"] for m in host_metrics),
        "sample/total_generated_tokens": sum(m["shard_tokens"] for m in host_metrics),
        "sample/num_hosts": len(host_metrics),
        "sample/inference_mode": inference_mode,
        "sample/wall_clock_s": wall_clock_s,
        "sample/gather_s": gather_s,
        "sample/gather_bytes": sum(m["gather_bytes"] for m in host_metrics),
        "sample/round_time_max_s": max(rounds, default=0.0),
        "sample/round_time_min_s": min(rounds, default=0.0),
        "sample/round_time_mean_s": mean_round,
        "sample/host_imbalance": max(rounds, default=0.0) / mean_round if mean_round > 0 else 1.0,
        "sample/decode_tokens_per_s": sum(m["tokens_generated"] for m in host_metrics) / max(rounds, default=0.0)
        if max(rounds, default=0.0) > 0
        else 0.0,
    }
    for m in host_metrics:
        for name in HOST_METRICS:
            out[f"host/{m['host']}/{name}"] = m[name]
    return out


def format_table(host_metrics: Sequence[dict[str, Any]], summary: dict[str, Any]) -> str:
    """One row per host and a totals row, as aligned text."""
    header = [title for _, title, _ in TABLE_COLUMNS]
    rows = [
        [fmt.format(m[key]) for key, _, fmt in TABLE_COLUMNS] for m in sorted(host_metrics, key=lambda m: m["host"])
    ]
    totals = ["all"]
    for key, _, fmt in TABLE_COLUMNS[1:]:
        values = [m[key] for m in host_metrics]
        if key.endswith("_s") or key == "pages_peak":
            totals.append(fmt.format(max(values, default=0)))
        elif key == "decode_tokens_per_s":
            totals.append(fmt.format(summary["sample/decode_tokens_per_s"]))
        else:
            totals.append(fmt.format(sum(values)))
    widths = [max(len(r[i]) for r in [header, *rows, totals]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows, totals]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, lines[1])
    tail = (
        f"wall clock {summary['sample/wall_clock_s']:.1f}s, round time max/mean "
        f"{summary['sample/round_time_max_s']:.1f}/{summary['sample/round_time_mean_s']:.1f}s "
        f"(imbalance {summary['sample/host_imbalance']:.2f}), gather {summary['sample/gather_s']:.2f}s "
        f"for {summary['sample/gather_bytes']} bytes"
    )
    return "\n".join(lines + [tail])


def host_metrics(
    host: int,
    started_at: float,
    phases: dict[str, tuple[float, float]],
    shard_size: int,
    stats,
    rows_resumed: int,
    rows: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """The metrics a host sends with its shard (``gather_bytes`` and the gather's end are filled in by the leader).

    ``rows`` are the shard's rows, resumed ones included: ``shard_rows`` and ``shard_tokens`` count them.
    """
    round_total = stats.prefill_s + stats.decode_s
    return {
        "host": host,
        "started_at": started_at,
        "phases": {name: list(span) for name, span in phases.items()},
        "prompts": shard_size,
        "sequences": stats.sequences,
        "rows_resumed": rows_resumed,
        "shard_rows": len(rows),
        "shard_tokens": sum(r["generated_token_count"] for r in rows),
        "tokens_generated": stats.tokens_generated,
        "model_load_s": _span(phases, "model_load"),
        "engine_build_s": _span(phases, "engine_build"),
        "prefill_s": stats.prefill_s,
        "decode_s": stats.decode_s,
        "round_total_s": round_total,
        "decode_tokens_per_s": stats.decode_tokens_per_s,
        "pages_in_use_after_decode": stats.pages_in_use_after_decode,
        "pages_free_after_decode": stats.pages_free_after_decode,
        "pages_peak": stats.pages_peak,
        "write_s": _span(phases, "write"),
        "gather_bytes": 0,
    }


def _span(phases: dict[str, tuple[float, float]], name: str) -> float:
    start, end = phases.get(name, (0.0, 0.0))
    return end - start
