"""Each host's metrics and the run summary the leader builds from them.

Three throughputs, each defined once (the table, ``summary.json``, wandb and the README use these):

- ``decode_tokens_per_s`` (per host): tokens the host sampled / its decode seconds (decode rounds, compiling
  excluded);
- ``sample/job_tokens_per_s``: tokens sampled by all hosts / the longest host's generate seconds (compile,
  prefill and decode of all its batches) — what the slice delivers while it samples;
- ``sample/end_to_end_tokens_per_s``: tokens of every merged row / the wall clock from the first host's start to
  the merged output.

No JAX import.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from levanter_multihost.replicas import Replicas
from levanter_multihost.tables import format_table

HOST_METRICS = (
    "replica",
    "prompts",
    "rows",
    "rows_kept",
    "sequences",
    "tokens",
    "tokens_generated",
    "batches",
    "model_load_s",
    "engine_build_s",
    "compile_s",
    "prefill_s",
    "decode_s",
    "generate_s",
    "decode_tokens_per_s",
    "pages_after_prefill",
    "write_s",
    "peak_rss_bytes",
    "gather_bytes",
)
"""Scalar per-host metrics, logged as ``host/<i>/<name>``."""
REPLICA_COUNTS = ("rows", "rows_kept", "tokens", "batches")
"""Per replica, its leader's counts (the rows it wrote), logged as ``replica/<r>/<name>``."""
TABLE_COLUMNS = (
    ("host", "host", "{}"),
    ("replica", "replica", "{}"),
    ("prompts", "prompts", "{:d}"),
    ("rows", "rows", "{:d}"),
    ("tokens_generated", "sampled tok", "{:d}"),
    ("batches", "batches", "{:d}"),
    ("model_load_s", "load s", "{:.1f}"),
    ("compile_s", "compile s", "{:.1f}"),
    ("prefill_s", "prefill s", "{:.1f}"),
    ("decode_s", "decode s", "{:.1f}"),
    ("decode_tokens_per_s", "decode tok/s", "{:.0f}"),
    ("gather_bytes", "sent B", "{:d}"),
)


@dataclass(frozen=True)
class BatchRecord:
    """What one batch took, as ``summary.json`` lists it per host (``batch_stats``)."""

    batch: int
    sequences: int
    tokens: int
    compile_s: float
    """Compiling (or fetching from the persistent cache) during the batch: prefill's and the first round's."""
    prefill_s: float
    decode_s: float
    write_s: float
    """Writing the batch's part into the run directory."""
    pages_after_prefill: int
    outer_rounds: int
    waves: int


@dataclass
class HostMetrics:
    """What a host reports with its end message (JSON across hosts: :meth:`to_json`, :meth:`from_json`)."""

    host: int
    started_at: float
    """``time.time()`` on the host when its process was created; its phases count from here."""
    phases: dict[str, list[list[float]]]
    """Phase name -> [start, end] spans in seconds since ``started_at``, on the host's own clock."""
    prompts: int
    """Prompts of its share (whose kept rows it delivers)."""
    rows: int
    rows_kept: int
    sequences: int
    """Sequences it sampled."""
    tokens: int
    tokens_generated: int
    """Tokens it sampled (``tokens`` adds the kept rows')."""
    batches: int
    batch_stats: list[BatchRecord]
    model_load_s: float
    engine_build_s: float
    compile_s: float
    prefill_s: float
    decode_s: float
    generate_s: float
    decode_tokens_per_s: float
    pages_after_prefill: int
    write_s: float
    peak_rss_bytes: int
    gather_bytes: int = 0
    """Bytes it sent the leader; filled in by the leader."""
    replica: int = 0
    """The replica group it samples in (its own, ``hosts_per_replica`` 1)."""
    writes_rows: bool = True
    """It leads its replica: it writes and sends the replica's rows (the others sample the same batches with it
    and count them too, so the job's totals take only the rows' writers)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "HostMetrics":
        return cls(**{**data, "batch_stats": [BatchRecord(**b) for b in data["batch_stats"]]})


def host_metrics(
    host: int,
    started_at: float,
    phases: dict[str, list[list[float]]],
    prompts: int,
    batches: Sequence[BatchRecord],
    rows_kept: int,
    tokens_kept: int,
    replica: int = 0,
    writes_rows: bool = True,
) -> HostMetrics:
    """A host's metrics from its phases and its batches (``gather_bytes`` is filled in by the leader)."""
    sampled = sum(b.sequences for b in batches)
    tokens = sum(b.tokens for b in batches)
    compile_s = sum(b.compile_s for b in batches)
    prefill_s = sum(b.prefill_s for b in batches)
    decode_s = sum(b.decode_s for b in batches)
    return HostMetrics(
        host=host,
        started_at=started_at,
        phases={name: list(span) for name, span in phases.items()},
        prompts=prompts,
        rows=rows_kept + sampled,
        rows_kept=rows_kept,
        sequences=sampled,
        tokens=tokens_kept + tokens,
        tokens_generated=tokens,
        batches=len(batches),
        batch_stats=list(batches),
        model_load_s=_span(phases, "model_load"),
        engine_build_s=_span(phases, "engine_build"),
        compile_s=compile_s,
        prefill_s=prefill_s,
        decode_s=decode_s,
        generate_s=compile_s + prefill_s + decode_s,
        decode_tokens_per_s=tokens / decode_s if decode_s > 0 else 0.0,
        pages_after_prefill=max((b.pages_after_prefill for b in batches), default=0),
        write_s=sum(b.write_s for b in batches),
        peak_rss_bytes=peak_rss_bytes(),
        replica=replica,
        writes_rows=writes_rows,
    )


def build_summary(
    host_metrics: Sequence[HostMetrics], *, num_prompts: int, wall_clock_s: float, leader_wait_s: float
) -> dict[str, Any]:
    """Flat summary: ``sample/*`` totals (rows and tokens once per replica: its leader's), ``replica/<r>/<count>``
    for every replica and ``host/<i>/<metric>`` for every host, idle hosts included."""
    writers = [m for m in host_metrics if m.writes_rows]
    times = [m.generate_s for m in host_metrics]
    mean = sum(times) / len(times) if times else 0.0
    slowest = max(times, default=0.0)
    sampled = sum(m.tokens_generated for m in writers)
    tokens = sum(m.tokens for m in writers)
    replicas = Replicas(len(host_metrics) // max(len(writers), 1), len(host_metrics))
    out: dict[str, Any] = {
        "sample/total_prompts": num_prompts,
        "sample/total_sequences": sum(m.rows for m in writers),
        "sample/total_generated_tokens": tokens,
        "sample/tokens_sampled": sampled,
        "sample/rows_kept": sum(m.rows_kept for m in writers),
        "sample/num_hosts": len(host_metrics),
        "sample/num_replicas": replicas.num_replicas,
        "sample/hosts_per_replica": replicas.hosts_per_replica,
        "sample/inference_mode": replicas.mode,
        "sample/batches": sum(m.batches for m in writers),
        "sample/wall_clock_s": wall_clock_s,
        "sample/leader_wait_s": leader_wait_s,
        "sample/gather_bytes": sum(m.gather_bytes for m in host_metrics),
        "sample/generate_time_max_s": slowest,
        "sample/generate_time_min_s": min(times, default=0.0),
        "sample/generate_time_mean_s": mean,
        "sample/host_imbalance": slowest / mean if mean > 0 else 1.0,
        "sample/job_tokens_per_s": sampled / slowest if slowest > 0 else 0.0,
        "sample/end_to_end_tokens_per_s": tokens / wall_clock_s if wall_clock_s > 0 else 0.0,
    }
    for m in writers:
        for name in REPLICA_COUNTS:
            out[f"replica/{m.replica}/{name}"] = getattr(m, name)
    for m in host_metrics:
        for name in HOST_METRICS:
            out[f"host/{m.host}/{name}"] = getattr(m, name)
    return out


def format_summary(host_metrics: Sequence[HostMetrics], summary: dict[str, Any]) -> str:
    """One row per host (its replica, and the rows it wrote: a replica's other hosts write none), a totals row
    (sums over the rows' writers; slowest host for times), and the three throughputs."""
    hosts = [
        {**m.to_json(), **({} if m.writes_rows else {"rows": 0, "tokens_generated": 0})}
        for m in sorted(host_metrics, key=lambda m: m.host)
    ]
    totals: dict[str, Any] = {"host": "all", "replica": None}
    for key, _, _ in TABLE_COLUMNS[2:]:
        if key.endswith("_s"):
            totals[key] = None if key == "decode_tokens_per_s" else max(m[key] for m in hosts)
        else:  # a replica's prompts and batches once, as its rows
            totals[key] = sum(m[key] for m in hosts if m["writes_rows"])
    table = format_table(hosts, TABLE_COLUMNS, totals)
    tail = (
        f"decode tok/s per host (above); job {summary['sample/job_tokens_per_s']:.0f} tok/s (sampled tokens / "
        f"slowest host's generate time {summary['sample/generate_time_max_s']:.1f}s, imbalance "
        f"{summary['sample/host_imbalance']:.2f}); end to end {summary['sample/end_to_end_tokens_per_s']:.0f} tok/s "
        f"over {summary['sample/wall_clock_s']:.1f}s; the leader waited {summary['sample/leader_wait_s']:.2f}s "
        f"after its own share for the others' last parts ({summary['sample/gather_bytes']} bytes sent to it in all)"
    )
    return table + "\n" + tail


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (``ru_maxrss`` is KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _span(phases: dict[str, list[list[float]]], name: str) -> float:
    return sum(end - start for start, end in phases.get(name, []))
