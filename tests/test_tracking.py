"""Leader-only reporting on emulated hosts: one wandb run (offline), its summary and table, summary.json, timeline."""

import json
import struct

import pytest
from wandb_records import summary_and_history

from levanter_multihost.summary import HOST_METRICS

pytestmark = pytest.mark.multihost


def wandb_runs(run):
    return sorted((run.wandb_dir / "wandb").glob("offline-run-*"))


def test_exactly_one_wandb_run_is_created_by_the_leader(greedy_4x4):
    runs = wandb_runs(greedy_4x4)
    assert len(runs) == 1, runs
    for host in (1, 2, 3):
        assert f"[host {host}]" in greedy_4x4.output
    assert "wandb" not in " ".join(l for l in greedy_4x4.output.splitlines() if not l.startswith("[host 0]")).lower()


def test_wandb_summary_matches_the_merged_file(greedy_4x4):
    (run_dir,) = wandb_runs(greedy_4x4)
    summary, history = summary_and_history(run_dir)
    merged = greedy_4x4.rows()
    assert history and history[0]["sample/total_prompts"] == 256
    assert summary["sample/total_prompts"] == 256
    assert summary["sample/total_generated_tokens"] == sum(r["generated_token_count"] for r in merged) == 256 * 6
    assert summary["sample/num_hosts"] == 4
    assert summary["sample/inference_mode"] == "host_data_parallel"
    for host in range(4):
        assert summary[f"host/{host}/tokens_generated"] == 64 * 6
        assert summary[f"host/{host}/prompts"] == 64
        assert summary[f"host/{host}/round_total_s"] > 0
    assert (
        summary["sample/round_time_max_s"]
        >= summary["sample/round_time_mean_s"]
        >= summary["sample/round_time_min_s"]
    )
    assert summary["sample/host_imbalance"] >= 1.0
    assert summary["host/0/gather_bytes"] == 0  # the leader keeps its own shard out of the store
    assert summary["sample/gather_bytes"] == sum(summary[f"host/{h}/gather_bytes"] for h in range(1, 4)) > 0
    assert summary["samples/nrows"] == 256


def test_wandb_samples_table_holds_every_row(greedy_4x4):
    (run_dir,) = wandb_runs(greedy_4x4)
    (table_file,) = (run_dir / "files" / "media" / "table").glob("samples_*.table.json")
    table = json.loads(table_file.read_text())
    assert len(table["data"]) == 256
    columns = table["columns"]
    merged = greedy_4x4.rows()
    for row, expected in zip(table["data"], merged):
        record = dict(zip(columns, row))
        assert record["global_prompt_index"] == expected["global_prompt_index"]
        assert record["generated_text"] == expected["generated_text"]
        assert record["process_index"] == expected["global_prompt_index"] // 64
    assert (run_dir / "files" / "media" / "images").exists()


def test_summary_json_agrees_with_the_merged_file(greedy_4x4):
    data = greedy_4x4.summary()
    merged = greedy_4x4.rows()
    assert data["summary"]["sample/total_generated_tokens"] == sum(r["generated_token_count"] for r in merged)
    assert data["summary"]["sample/total_sequences"] == len(merged) == 256
    assert [h["host"] for h in data["hosts"]] == [0, 1, 2, 3]
    for h in data["hosts"]:
        assert set(HOST_METRICS) <= set(h)
        assert (h["shard_rows"], h["shard_tokens"]) == (64, 64 * 6)
        assert h["tokens_generated"] == sum(
            r["generated_token_count"] for r in merged if r["process_index"] == h["host"]
        )
        assert h["pages_free_after_decode"] + h["pages_in_use_after_decode"] == 1024
    assert "Per-host results" in greedy_4x4.output and "host  prompts" in greedy_4x4.output
    leader = data["leader"]["phases"]
    for before, after in [("write", "gather"), ("gather", "collect"), ("collect", "merge"), ("merge", "timeline"),
                          ("timeline", "tracker")]:  # fmt: skip
        assert leader[before][1] <= leader[after][0] <= leader[after][1]
    assert data["summary"]["sample/gather_s"] == leader["collect"][1] - leader["collect"][0]


def test_timeline_png_has_a_bar_per_host(greedy_4x4):
    png = (greedy_4x4.output_dir / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 600 and height >= 150


def test_progress_lines_come_from_every_host(greedy_4x4):
    for host in range(4):
        assert any(f"host {host}: " in line and "tok/s, ETA" in line for line in greedy_4x4.output.splitlines())
