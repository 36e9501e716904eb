"""The leader's finish over an in-process store: its own shard kept, the others' merged by line, the summary from
host metrics, the leader's phases in summary.json, and merged rows parsed only when something needs them."""

import json
import time
from types import SimpleNamespace

import pytest
from levanter.tracker import NoopConfig

from levanter_multihost import leader, outputs, tracking
from levanter_multihost.addition import accuracy
from levanter_multihost.gather import InMemoryKeyValue, KvGather
from levanter_multihost.generation import GenerationStats
from levanter_multihost.runtime import HostContext
from levanter_multihost.sharding import balanced_shards
from levanter_multihost.summary import host_metrics

NUM_PROMPTS = 9
PROMPTS = [f"{p}+{p}=" for p in range(NUM_PROMPTS)]


def row(prompt: int, host: int) -> dict:
    text = f"{2 * prompt}." if prompt % 3 else "0."  # prompts 3 and 6 answered wrong
    ids = list(range(prompt + 1))
    return {
        "global_prompt_index": prompt,
        "generation_index": 0,
        "process_index": host,
        "prompt": PROMPTS[prompt],
        "prompt_token_count": 4,
        "generated_token_ids": ids,
        "generated_text": text,
        "generated_token_count": len(ids),
        "finish_reason": "stop",
    }


def assignment() -> list[list[int]]:
    """Interleaved shards, as the balanced strategy makes them."""
    return balanced_shards([p % 4 + 1 for p in range(NUM_PROMPTS)], 3)


def finish(tmp_path, monkeypatch, task=None):
    """Run ``finish_as_leader`` for 3 hosts (noop tracker unless patched); return its summary, summary.json and the
    byte sizes of what was parsed into rows."""
    ctx = HostContext(host=0, num_hosts=3, started_at=time.time(), phases={"write": (0.0, 0.001)})
    kv = KvGather(InMemoryKeyValue(), "run", num_hosts=3)
    for host, prompts in enumerate(assignment()):
        rows = [row(p, host) for p in prompts]
        stats = GenerationStats(sequences=len(rows), tokens_generated=sum(r["generated_token_count"] for r in rows))
        header = {"metrics": host_metrics(host, ctx.started_at, ctx.phases, len(prompts), stats, 0, rows)}
        if host == 0:
            own = (header, outputs.jsonl_bytes(rows))
        else:
            kv.send(host, header, outputs.jsonl_bytes(rows))
    parses = []
    parse = outputs.parse_jsonl
    monkeypatch.setattr(outputs, "parse_jsonl", lambda data: parses.append(len(data)) or parse(data))
    config = SimpleNamespace(
        output_dir=str(tmp_path),
        n_generations=1,
        gather_timeout_s=5.0,
        inference_mode="host_data_parallel",
        task=task,
        trainer=SimpleNamespace(tracker=NoopConfig(), id=None),
        skip_samples_table=False,
    )
    job = SimpleNamespace(prompts=SimpleNamespace(texts=PROMPTS))
    result = leader.finish_as_leader(config, ctx, job, kv, *own)
    assert kv.client.store == {"run/done": b"ok:"}  # every payload read and deleted, done published
    return result, json.loads((tmp_path / outputs.SUMMARY_NAME).read_text()), parses


def test_leader_merges_its_own_shard_with_the_others_and_parses_nothing_without_a_task(tmp_path, monkeypatch):
    result, written, parses = finish(tmp_path, monkeypatch)
    merged = (tmp_path / outputs.MERGED_NAME).read_bytes()
    owner = {p: host for host, ps in enumerate(assignment()) for p in ps}
    assert merged == outputs.jsonl_bytes(row(p, owner[p]) for p in range(NUM_PROMPTS))
    assert parses == []
    assert result["sample/total_sequences"] == NUM_PROMPTS
    assert result["sample/total_generated_tokens"] == sum(p + 1 for p in range(NUM_PROMPTS))
    assert result["host/0/gather_bytes"] == 0
    assert result["sample/gather_bytes"] == result["host/1/gather_bytes"] + result["host/2/gather_bytes"] > 0
    assert "sample/task_accuracy" not in result
    assert written["summary"] == result
    assert [h["host"] for h in written["hosts"]] == [0, 1, 2]
    phases = written["leader"]["phases"]
    arrivals = [h["phases"]["gather"][1] for h in written["hosts"]]
    assert arrivals[0] <= phases["collect"][0] <= arrivals[1] <= arrivals[2] <= phases["collect"][1]
    assert set(phases) >= {"write", "collect", "merge", "timeline", "tracker"}
    assert phases["collect"][1] <= phases["merge"][0] <= phases["timeline"][0] <= phases["tracker"][0]
    assert result["sample/gather_s"] == phases["collect"][1] - phases["collect"][0]


def test_task_accuracy_parses_the_merged_rows_once_and_the_tracker_reuses_them(tmp_path, monkeypatch):
    seen = []

    def report(tracker_config, run_id, summary, rows, png, skip_samples_table):
        seen.extend([rows(), rows()])

    monkeypatch.setattr(tracking, "report", report)
    result, _, parses = finish(tmp_path, monkeypatch, task="addition")
    assert len(parses) == 1
    rows = outputs.parse_jsonl((tmp_path / outputs.MERGED_NAME).read_bytes())
    assert result["sample/task_accuracy"] == accuracy(rows) == pytest.approx(7 / 9)
    assert seen == [rows, rows]
