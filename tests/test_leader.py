"""The leader's spool and merge: parts arriving from several threads merged into merged.jsonl or merged.parquet
(read back with pandas and with ``datasets``), the addition task scored and the samples taken on the way, rows
parsed only when needed, and nothing written unless every expected row arrived exactly once."""

import json
import os
import threading

import pandas as pd
import pyarrow.parquet as pq
import pytest
from levanter.tracker import NoopConfig
from multihost import parse_jsonl

from levanter_multihost import leader
from levanter_multihost.addition import accuracy
from levanter_multihost.outputs import ROW_FIELDS, MergeError, row_line
from levanter_multihost.rundir import MERGED_JSONL, MERGED_PARQUET, RunDir
from levanter_multihost.runplan import Reporting
from levanter_multihost.sharding import balanced_shards

NUM_PROMPTS = 14
N_GENERATIONS = [(p * 5) % 4 for p in range(NUM_PROMPTS)]  # 0 to 3 a prompt
PROMPTS = [f"{p}+{p + 1}=" for p in range(NUM_PROMPTS)]
HOSTS = 3
EXTRA_COLUMNS = ["id", "source"]


def line(prompt: int, generation: int, host: int, text_bytes: int = 0) -> bytes:
    """A row as a host writes it; its answer is wrong when (prompt + generation) % 3 == 0."""
    answer = 2 * prompt + 1 if (prompt + generation) % 3 else 0
    ids = list(range(prompt + generation + 1))
    row = {
        "global_prompt_index": prompt,
        "generation_index": generation,
        "process_index": host,
        "prompt": PROMPTS[prompt],
        "prompt_token_count": len(PROMPTS[prompt]),
        "generated_token_ids": ids,
        "generated_text": f"{answer}.\u2028é" + "x" * text_bytes,
        "generated_token_count": len(ids),
        "finish_reason": "stop" if generation % 2 else "length",
        "stop_reason": "." if generation % 2 else None,
    }
    return row_line(row, f', "id": "q{prompt}", "source": "unit"'.encode())


def owner() -> dict[int, int]:
    shards = balanced_shards([p % 4 + 1 for p in range(NUM_PROMPTS)], HOSTS)  # interleaved, as hosts get them
    return {p: host for host, prompts in enumerate(shards) for p in prompts}


def parts() -> list[tuple[int, dict, bytes]]:
    """Every host's parts: its prompts in order, 2 a batch, every generation of a prompt in its part."""
    out = []
    for host in range(HOSTS):
        mine = sorted(p for p, h in owner().items() if h == host)
        for b in range(0, len(mine), 2):
            data = b"".join(line(p, g, host) for p in mine[b : b + 2] for g in range(N_GENERATIONS[p]))
            out.append((host, {"kind": "batch", "batch": b // 2}, data))
    return out


def expected() -> bytes:
    return b"".join(line(p, g, owner()[p]) for p in range(NUM_PROMPTS) for g in range(N_GENERATIONS[p]))


def reporting(samples: int = 0, task: str | None = None) -> Reporting:
    return Reporting(
        tracker=NoopConfig(),
        run_name="test",
        run_id=None,
        config={},
        samples_table_rows=samples,
        task=task,
        progress_interval_s=0.0,
    )


@pytest.fixture
def spool():
    """A spool filled as the leader fills it: its own parts on this thread, the others' on the collector's."""
    s = leader.Spool()
    others = [p for p in parts() if p[0] != 0]
    collector = threading.Thread(target=lambda: [s.add(*p) for p in others])
    collector.start()
    for p in parts():
        if p[0] == 0:
            s.add(*p)
    collector.join()
    yield s
    s.close()


def test_jsonl_output_is_every_part_merged_byte_for_byte(spool, tmp_path):
    out = RunDir(str(tmp_path / "out"))
    result = leader.write_merged(spool, out, N_GENERATIONS, "jsonl", reporting())
    assert out.read_bytes(MERGED_JSONL) == expected()
    assert result.rows == sum(N_GENERATIONS) and result.samples == [] and result.correct == 0
    assert os.listdir(tmp_path / "out") == [MERGED_JSONL]


def test_parquet_output_reads_back_with_pandas_and_datasets(spool, tmp_path):
    import datasets

    out = RunDir(str(tmp_path / "out"))
    leader.write_merged(spool, out, N_GENERATIONS, "parquet", reporting())
    path = str(tmp_path / "out" / MERGED_PARQUET)
    rows = parse_jsonl(expected())
    assert pq.read_table(path).to_pylist() == rows
    frame = pd.read_parquet(path)
    assert list(frame.columns) == [*ROW_FIELDS, *EXTRA_COLUMNS]
    assert frame["generated_text"].tolist() == [r["generated_text"] for r in rows]  # U+2028 kept inside the text
    assert [list(ids) for ids in frame["generated_token_ids"]] == [r["generated_token_ids"] for r in rows]
    assert [None if pd.isna(v) else v for v in frame["stop_reason"]] == [r["stop_reason"] for r in rows]
    dataset = datasets.Dataset.from_parquet(path, cache_dir=str(tmp_path / "hf_cache"))
    assert dataset.column_names == [*ROW_FIELDS, *EXTRA_COLUMNS]
    assert dataset.to_list() == rows
    assert os.listdir(tmp_path / "out") == [MERGED_PARQUET]


def test_parquet_holds_rows_longer_than_the_json_readers_block(tmp_path):
    s = leader.Spool()
    try:
        data = line(0, 0, 0, text_bytes=3 << 20) + line(1, 0, 0)
        s.add(0, {"kind": "batch", "batch": 0}, data)
        leader.write_merged(s, RunDir(str(tmp_path)), [1, 1], "parquet", reporting())
    finally:
        s.close()
    assert pq.read_table(tmp_path / MERGED_PARQUET).to_pylist() == parse_jsonl(data)


def test_addition_accuracy_is_scored_on_the_way(spool, tmp_path):
    result = leader.write_merged(spool, RunDir(str(tmp_path)), N_GENERATIONS, "jsonl", reporting(task="addition"))
    rows = parse_jsonl(expected())
    assert result.correct == round(accuracy(rows) * len(rows))
    assert 0 < result.correct < result.rows == len(rows)


@pytest.mark.parametrize("samples", [0, 3, 1000])
def test_samples_are_the_first_merged_rows_up_to_samples_table_rows(spool, tmp_path, samples):
    result = leader.write_merged(spool, RunDir(str(tmp_path)), N_GENERATIONS, "jsonl", reporting(samples=samples))
    assert result.samples == parse_jsonl(expected())[:samples]


@pytest.mark.parametrize("samples, task, parsed", [(0, None, 0), (2, None, 2), (2, "addition", sum(N_GENERATIONS))])
def test_rows_are_parsed_only_when_something_needs_them(spool, tmp_path, monkeypatch, samples, task, parsed):
    calls = []
    loads = json.loads
    monkeypatch.setattr(leader.json, "loads", lambda data, *a, **k: calls.append(1) or loads(data, *a, **k))
    leader.write_merged(spool, RunDir(str(tmp_path)), N_GENERATIONS, "jsonl", reporting(samples, task))
    assert len(calls) == parsed


@pytest.mark.parametrize("output_format", ["jsonl", "parquet"])
def test_a_missing_row_raises_and_writes_no_merged_output(tmp_path, output_format):
    s = leader.Spool()
    try:
        for i, p in enumerate(parts()):
            if i != 3:  # a part that never arrived
                s.add(*p)
        (tmp_path / MERGED_JSONL).write_bytes(b"an earlier run's rows\n")
        with pytest.raises(MergeError, match=r"^Cannot merge: \d+ missing \(prompt, generation\) pairs, first"):
            leader.write_merged(s, RunDir(str(tmp_path)), N_GENERATIONS, output_format, reporting())
    finally:
        s.close()
    assert os.listdir(tmp_path) == [MERGED_JSONL]  # nothing new, no temporary file
    assert (tmp_path / MERGED_JSONL).read_bytes() == b"an earlier run's rows\n"


def test_a_part_received_twice_is_named_as_duplicated_rows(spool, tmp_path):
    host, header, data = parts()[2]
    spool.add(host, header, data)
    with pytest.raises(MergeError, match=r"^Cannot merge: \d+ duplicated \(prompt, generation\) pairs, first"):
        leader.write_merged(spool, RunDir(str(tmp_path)), N_GENERATIONS, "jsonl", reporting())
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "header, name",
    [
        ({"kind": "batch", "batch": 5, "rows": 2}, "host 2's batch 5"),
        ({"kind": "kept", "rows": 2}, "host 2's kept rows"),
    ],
)
def test_a_bad_part_is_named_by_host_and_batch_when_it_arrives(header, name):
    s = leader.Spool()
    try:
        with pytest.raises(MergeError, match=rf"^{name} line 2: b'not a row' is not a row"):
            s.add(2, header, line(0, 0, 2) + b"not a row\n")
        with pytest.raises(MergeError, match=rf"^{name}: does not end with a newline"):
            s.add(2, header, line(0, 0, 2)[:-1])
        assert s.runs == [] and os.listdir(s.dir) == []
    finally:
        s.close()


def test_empty_parts_are_skipped_and_close_removes_the_spool():
    s = leader.Spool()
    s.add(1, {"kind": "kept", "rows": 0}, b"")
    assert s.runs == [] and list(s.merged()) == []
    s.close()
    assert not os.path.exists(s.dir)
