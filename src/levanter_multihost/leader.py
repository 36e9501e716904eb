"""What only the leader does: spool every host's parts, merge them into one ordered output (or index them: ``merge:
false``), summarize, report.

:func:`merge_and_report` is the leader's whole stage once its own share is sampled.

Covers the spool (a local temporary directory the leader's collector writes the other hosts' parts into while the
leader samples its own; its own parts go there too), the streaming merge into ``merged.jsonl`` or
``merged.parquet`` with the completeness check on the way (nothing is written unless every expected (prompt,
generation) pair arrived exactly once), the task's accuracy and the samples table from the same pass, then
``summary.json``, ``timeline.png``, the printed table and the tracker. Memory stays flat in the number of rows.
With ``merge: false`` the leader holds only each part's manifest (:class:`PartIndex`) and writes ``_index.json``
and the dataset card once the manifests cover every pair exactly once (:func:`write_index`); it reads rows only
for the samples table and from earlier attempts' parts. Leaves out the transport
(:mod:`levanter_multihost.coordination`) and the arithmetic (:mod:`.summary`).
"""

import base64
import functools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from levanter_multihost import addition, rundir, summary, tracking
from levanter_multihost.collector import Collector, HostArrivals
from levanter_multihost.outputs import (
    Completeness,
    KeySpace,
    MergeError,
    SortedRun,
    keyed_lines,
    merge_sorted,
    part_manifest,
    read_keyed,
)
from levanter_multihost.rundir import Decision, RunDir
from levanter_multihost.runplan import Reporting, RunPlan
from levanter_multihost.runtime import HostContext
from levanter_multihost.summary import HostMetrics

logger = logging.getLogger(__name__)


def merge_and_report(
    plan: RunPlan,
    ctx: HostContext,
    collector: Collector,
    spool: "Spool | PartIndex",
    own: HostMetrics,
    decision: Decision,
    fingerprint: str,
) -> None:
    """Wait for every host's parts, merge (or index) them, summarize, report; an earlier run's outputs go only once
    this run's are in."""
    with ctx.phase("collect"):
        arrivals = collector.finish()
    host_metrics = [own] + [received_metrics(a) for _, a in sorted(arrivals.items())]
    with ctx.phase("merge"):
        plan.run_dir.check_still_ours(decision.attempt)
        if isinstance(spool, PartIndex):
            merged = write_index(
                spool, plan.run_dir, plan.prompts.n_generations, decision, fingerprint, plan.reporting
            )
        else:
            merged = write_merged(spool, plan.run_dir, plan.prompts.n_generations, plan.output_format, plan.reporting)
    result = summary.build_summary(
        host_metrics,
        num_prompts=len(plan.prompts),
        wall_clock_s=time.time() - min(m.started_at for m in host_metrics),
        leader_wait_s=ctx.seconds("collect"),
    )
    if plan.reporting.task is not None:
        result["sample/task_accuracy"] = merged.correct / max(merged.rows, 1)
    with ctx.phase("timeline"):
        png = tracking.timeline_png(host_metrics, {"started_at": ctx.started_at, "phases": ctx.phases})
        plan.run_dir.write_atomic(rundir.TIMELINE, png)
    # written before the tracker too, which may be slow or fail, and again with the tracker's phase in it
    write_summary(plan.run_dir, plan.reporting, host_metrics, result, ctx.phases, ctx.started_at)
    with ctx.phase("tracker"):
        tracking.report(plan.reporting, result, merged.samples, png)
    write_summary(plan.run_dir, plan.reporting, host_metrics, result, ctx.phases, ctx.started_at)
    plan.run_dir.check_still_ours(decision.attempt)  # deleted while merging: the run failed
    output = plan.merged_name if plan.merge else rundir.INDEX
    if decision.replaces:
        plan.run_dir.remove_parts_except(decision.attempts)
        plan.run_dir.remove_outputs_except(output)
    log_results(plan.reporting, host_metrics, result, plan.run_dir.url_of(output), plan.merge)


def received_metrics(arrivals: HostArrivals) -> HostMetrics:
    """A host's metrics from its end message, with the bytes it sent and its ``wait`` phase: from its last send to
    its end message reaching the leader.

    Mixed clocks: the wait starts on the host's clock (its phases count from its own ``started_at``) and ends on
    the leader's (``ended_at`` is the leader's ``time.time()``, less the host's ``started_at``), so the skew
    between the two machines' wall clocks (NTP keeps it to milliseconds) shifts the span's end. It is drawn on the
    timeline only, never summed into a throughput.
    """
    metrics = HostMetrics.from_json(arrivals.end["metrics"])
    metrics.gather_bytes = arrivals.bytes
    sends = metrics.phases.get("send")
    metrics.phases["wait"] = [[sends[-1][1] if sends else 0.0, arrivals.ended_at - metrics.started_at]]
    return metrics


class Spool:
    """Parts as they arrive, one sorted file each in a local temporary directory; thread-safe.

    Each part is checked line by line on arrival, so a bad one is named by host, batch and line; the merge then
    streams the files back one line at a time (:func:`~levanter_multihost.outputs.read_keyed`).
    """

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="levanter_multihost_spool_")
        self.runs: list[SortedRun] = []
        self.lock = threading.Lock()

    def add(self, host: int, header: dict, data: bytes) -> None:
        where = part_name(host, header)
        keyed = keyed_lines(data, where)  # checked here, so a bad part is named as it arrives
        if not keyed:
            return
        with self.lock:
            path = os.path.join(self.dir, f"{len(self.runs):08d}.h{host:04d}.jsonl")
            with open(path, "wb") as f:
                f.write(data)
            self.runs.append(SortedRun(keyed[0][0], functools.partial(_read_keyed, path, where), where))

    def merged(self) -> Iterator[tuple[tuple[int, int], bytes]]:
        return merge_sorted(self.runs)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def part_name(host: int, header: dict) -> str:
    """How errors name a part: ``host 2's batch 5``, or ``host 1's kept rows``."""
    if "batch" in header:
        return f"host {host}'s batch {header['batch']}"
    return f"host {host}'s {header.get('kind', 'part')} rows"


def _read_keyed(path: str, where: str) -> Iterator[tuple[tuple[int, int], bytes]]:
    with open(path, "rb") as f:
        yield from read_keyed(f, where)


class PartIndex:
    """``merge: false``: this attempt's parts as their manifests arrive (:func:`~.outputs.part_manifest`), without
    their rows, and the distinct Arrow schemas among them (most parts share one); thread-safe.

    ``found`` is the parts the run directory held as this attempt began, which the hosts read as earlier rows: only
    those of earlier attempts are indexed with this attempt's, so a part a failed attempt's straggler writes later
    (rows this attempt samples again) is not.
    """

    def __init__(self, found: list[rundir.Part]):
        self.found = found
        self.manifests: list[dict] = []
        self.schemas: set[str] = set()
        self.lock = threading.Lock()

    def add(self, host: int, header: dict, data: bytes) -> None:
        if data or "ranges" not in header:
            raise MergeError(
                f"{part_name(host, header)} came as rows, not as a manifest: set `merge` alike everywhere."
            )
        schema = header.pop("schema")
        with self.lock:
            self.manifests.append({**header, "host": host})
            if schema is not None:
                self.schemas.add(schema)

    def close(self) -> None:
        """Nothing to clean up: the parts stay, they are the output."""


@dataclass
class MergeResult:
    rows: int = 0
    correct: int = 0
    samples: list[dict] = field(default_factory=list)


def write_merged(
    spool: Spool, run_dir: RunDir, n_generations, output_format: str, reporting: Reporting
) -> MergeResult:
    """Merge the spool into the run directory's merged output; score and sample rows on the way.

    Parsed as JSON only where needed: every row for a task's accuracy, the first ``samples_table_rows`` for the
    table. Raises :class:`~levanter_multihost.outputs.MergeError` (nothing written) if rows are missing,
    duplicated or unexpected. JSONL streams through; Parquet is built as one Arrow table from the merged lines
    (so its memory grows with the rows), its column types inferred over every row.
    """
    result = MergeResult()
    completeness = Completeness(n_generations)
    longest = 0
    local = os.path.join(spool.dir, "merged.jsonl")  # local first: a Parquet writer needs the whole file
    with open(local, "wb") as out:
        for key, line in spool.merged():
            completeness.see(key)
            out.write(line)
            result.rows += 1
            longest = max(longest, len(line))
            need_row = reporting.task is not None or len(result.samples) < reporting.samples_table_rows
            if need_row:
                row = json.loads(line)
                if reporting.task is not None:
                    result.correct += task_score(reporting.task, row)
                if len(result.samples) < reporting.samples_table_rows:
                    result.samples.append(row)
    completeness.check()
    if output_format == "parquet":
        import pyarrow.json as paj
        import pyarrow.parquet as pq

        # a row longer than the reader's block (1 MiB by default) would fail to parse
        block = max(1 << 20, 2 * longest)
        table = paj.read_json(local, read_options=paj.ReadOptions(block_size=block))
        with run_dir.open_atomic(rundir.MERGED_PARQUET) as f:
            pq.write_table(table, f)
    else:
        with open(local, "rb") as src, run_dir.open_atomic(rundir.MERGED_JSONL) as f:
            shutil.copyfileobj(src, f, 16 * 1024 * 1024)
    return result


def write_index(
    index: PartIndex, run_dir: RunDir, n_generations, decision: Decision, fingerprint: str, reporting: Reporting
) -> MergeResult:
    """Write ``_index.json`` and the dataset card (README.md) over this attempt's parts and the earlier attempts'.

    Earlier attempts' parts (those there as this attempt began) are read here, one at a time, for their manifests.
    Raises
    :class:`~levanter_multihost.outputs.MergeError` (nothing written) unless every expected (prompt, generation)
    pair is in exactly one part and every part is in the run directory as its manifest describes. The samples
    table is the first rows in key order, read from the parts that hold them.
    """
    space = KeySpace(n_generations)
    score = functools.partial(task_score, reporting.task) if reporting.task is not None else None
    earlier = [
        part_manifest(p.name, run_dir.read_part(p), space, score)
        for p in index.found
        if p.fingerprint == fingerprint and p.attempt in decision.attempts[:-1]
    ]
    listed = {p.name: p for p in run_dir.list_parts()}
    for m in index.manifests:
        part = listed.get(m["part"])
        if part is None or part.size not in (-1, m["bytes"]):
            found = "is not there" if part is None else f"has {part.size} bytes"
            raise MergeError(
                f"{m['part']}, host {m['host']}'s batch {m['batch']}, {found} in {run_dir.url} (its manifest says "
                f"{m['bytes']} bytes): every host must write to the run directory the leader reads (a bucket URL)."
            )
    manifests = sorted(earlier + index.manifests, key=lambda m: (m["first"] is None, m["first"] or ()))
    rows = space.check_coverage((m["part"], m["ranges"]) for m in manifests)
    files = [{k: m[k] for k in ("part", "rows", "bytes", "sha256", "first", "last")} for m in manifests if m["rows"]]
    features = dataset_features(index.schemas | {m["schema"] for m in earlier if m["rows"]})
    record = {"fingerprint": fingerprint, "attempts": list(decision.attempts), "rows": rows, "files": files}
    run_dir.write_atomic(rundir.INDEX, json.dumps(record, indent=1).encode("utf-8"))
    run_dir.write_atomic(rundir.CARD, dataset_card([f["part"] for f in files], features).encode("utf-8"))
    result = MergeResult(rows=rows, correct=sum(m.get("correct", 0) for m in manifests))
    # the pairs are complete, so the first n in key order are the ordinals below n: read only the parts holding them
    n = reporting.samples_table_rows
    for m in manifests:
        if m["ranges"] and m["ranges"][0][0] < n:
            for key, line in keyed_lines(run_dir.read_bytes(m["part"]), m["part"]):
                if space.ordinal(key, m["part"]) < n:
                    result.samples.append(json.loads(line))
    result.samples.sort(key=lambda row: (row["global_prompt_index"], row["generation_index"]))
    return result


def dataset_features(schemas: set[str]) -> dict:
    """The ``dataset_info`` of the card: the parts' Arrow schemas unified (a column null in one part and text in
    another is text), as ``datasets`` writes them, so every part loads with the same types."""
    import datasets
    import pyarrow as pa
    from datasets.info import DatasetInfosDict

    try:
        schema = pa.unify_schemas(
            [pa.ipc.read_schema(pa.py_buffer(base64.b64decode(s))) for s in schemas], promote_options="permissive"
        )
    except (pa.ArrowTypeError, pa.ArrowInvalid) as e:
        raise MergeError(f"The parts' columns have types that do not unify ({e}): set merge: true.") from None
    card: dict = {}
    infos = DatasetInfosDict({"default": datasets.DatasetInfo(features=datasets.Features.from_arrow_schema(schema))})
    infos.to_dataset_card_data(card)
    return card["dataset_info"]


def dataset_card(files: list[str], dataset_info: dict) -> str:
    """README.md: front matter naming exactly the index's part files (never a glob, so a stray or replaced part is
    not read) and their features, so ``datasets.load_dataset(output_dir)`` loads the run; then what it is."""
    front = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": files}]}],
        "dataset_info": dataset_info,
    }
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
        f"Rows sampled by levanter-multihost: {len(files)} JSONL part files, listed with their rows and SHA-256 in "
        f"`{rundir.INDEX}`. Rows come part by part; sort by (global_prompt_index, generation_index) for the merged "
        "order.\n"
    )


def task_score(task: str, row: dict) -> bool:
    if task == "addition":
        return addition.score(row["generated_text"], row["prompt"])
    raise ValueError(f"task ({task!r}) is not a known task.")


def write_summary(
    run_dir: RunDir,
    reporting: Reporting,
    host_metrics: list[HostMetrics],
    result: dict,
    leader_phases: dict,
    started_at: float,
) -> None:
    """``summary.json``: the run's name, id, fingerprint, git commit and versions, the totals, every host's metrics,
    and the leader's own phases."""
    run = {
        "name": reporting.run_name,
        "id": reporting.run_id,
        **{k: v for k, v in reporting.config.items() if k != "config"},
    }
    data = {
        "run": run,
        "summary": result,
        "hosts": [m.to_json() for m in host_metrics],
        "leader": {"started_at": started_at, "phases": {k: list(v) for k, v in leader_phases.items()}},
    }
    run_dir.write_atomic(rundir.SUMMARY, json.dumps(data, indent=2).encode("utf-8"))


def log_results(
    reporting: Reporting, host_metrics: list[HostMetrics], result: dict[str, Any], output_url: str, merged: bool
) -> None:
    logger.info("Per-host results:\n%s", summary.format_summary(host_metrics, result))
    if reporting.task is not None:
        logger.info("Task %s: %.1f%% exact answers", reporting.task, 100 * result["sample/task_accuracy"])
    logger.info("%s %d rows into %s", "Merged" if merged else "Indexed", result["sample/total_sequences"], output_url)
