"""Leader-only reporting on emulated hosts: one wandb run (offline) with the run's config, its summary and capped
samples table, summary.json with the phases, the timeline picture, progress lines."""

import json
import struct

import pytest
from wandb_records import config as wandb_config
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
    others = [line for line in greedy_4x4.output.splitlines() if not line.startswith("[host 0]")]
    assert "wandb" not in " ".join(others).lower()


def test_wandb_run_holds_the_config_name_commit_and_versions(greedy_4x4):
    (run_dir,) = wandb_runs(greedy_4x4)
    config = wandb_config(run_dir)
    sampled = config["config"]
    assert (sampled["temperature"], sampled["max_new_tokens"], sampled["seed"]) == (0.0, 6, 0)
    assert sampled["hf_checkpoint"].endswith("assets/tiny-addition")
    model = sampled["model"]  # the checkpoint's own shape, not the default Llama's
    assert (model["type"], model["hidden_dim"], model["num_layers"]) == ("llama", 64, 4)
    assert config["versions"]["levanter"] == "1.2.dev1644"
    assert len(config["git_commit"]) == 40
    assert len(config["fingerprint"]) == 16
    assert config["_run_name"] == "readme-job"


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
        assert summary[f"host/{host}/generate_s"] > 0
    assert summary["sample/generate_time_max_s"] >= summary["sample/generate_time_mean_s"]
    assert summary["sample/generate_time_mean_s"] >= summary["sample/generate_time_min_s"]
    assert summary["sample/host_imbalance"] >= 1.0
    assert summary["host/0/gather_bytes"] == 0  # the leader keeps its own parts out of the store
    assert summary["sample/gather_bytes"] == sum(summary[f"host/{h}/gather_bytes"] for h in range(1, 4)) > 0
    assert summary["samples/nrows"] == 256


def test_wandb_samples_table_holds_the_first_rows(greedy_4x4):
    (run_dir,) = wandb_runs(greedy_4x4)
    (table_file,) = (run_dir / "files" / "media" / "table").glob("samples_*.table.json")
    table = json.loads(table_file.read_text())
    assert len(table["data"]) == 256  # samples_table_rows defaults to 256: the seed's run shows every row
    columns = table["columns"]
    merged = greedy_4x4.rows()
    for row, expected in zip(table["data"], merged):
        record = dict(zip(columns, row))
        assert record["global_prompt_index"] == expected["global_prompt_index"]
        assert record["generated_text"] == expected["generated_text"]
        assert record["process_index"] == expected["global_prompt_index"] // 64
    assert (run_dir / "files" / "media" / "images").exists()


def test_summary_json_agrees_with_the_merged_file_and_defines_three_throughputs(greedy_4x4):
    data = greedy_4x4.summary()
    merged = greedy_4x4.rows()
    assert data["run"]["name"] == "readme-job" and len(data["run"]["git_commit"]) == 40
    assert data["run"]["versions"]["jax"] == "0.10.2" and len(data["run"]["fingerprint"]) == 16
    s = data["summary"]
    assert s["sample/total_generated_tokens"] == sum(r["generated_token_count"] for r in merged)
    assert s["sample/total_sequences"] == len(merged) == 256
    assert [h["host"] for h in data["hosts"]] == [0, 1, 2, 3]
    for h in data["hosts"]:
        assert set(HOST_METRICS) <= set(h)
        assert (h["rows"], h["tokens"], h["batches"]) == (64, 64 * 6, 1)
        assert h["tokens_generated"] == sum(
            r["generated_token_count"] for r in merged if r["process_index"] == h["host"]
        )
        assert h["decode_tokens_per_s"] == pytest.approx(h["tokens_generated"] / h["decode_s"])
        assert h["generate_s"] == pytest.approx(h["compile_s"] + h["prefill_s"] + h["decode_s"])
    assert s["sample/job_tokens_per_s"] == pytest.approx(256 * 6 / s["sample/generate_time_max_s"])
    assert s["sample/end_to_end_tokens_per_s"] == pytest.approx(256 * 6 / s["sample/wall_clock_s"])
    assert f"job {s['sample/job_tokens_per_s']:.0f} tok/s" in greedy_4x4.output
    leader = data["leader"]["phases"]
    for before, after in [("collect", "merge"), ("merge", "timeline"), ("timeline", "tracker")]:
        assert leader[before][-1][1] <= leader[after][0][0] <= leader[after][0][1]
    assert s["sample/leader_wait_s"] == pytest.approx(leader["collect"][0][1] - leader["collect"][0][0])


def test_phases_separate_compile_prefill_decode_and_waiting(greedy_4x4, greedy_2x4):
    for run in (greedy_4x4, greedy_2x4):
        for h in run.summary()["hosts"]:
            phases = h["phases"]
            for name in ("startup", "prepare", "model_load", "engine_build", "compile", "prefill", "decode", "write"):
                assert name in phases, (h["host"], sorted(phases))
            start, _ = phases["prefill"][0]
            assert phases["compile"][0][1] <= start  # the first batch compiles before it prefills
            assert abs(sum(b["compile_s"] for b in h["batch_stats"]) - h["compile_s"]) < 1e-6
            if h["host"] != 0:
                assert "wait" in phases and "send" in phases


def test_timeline_png_has_a_bar_per_host_and_the_leader(greedy_4x4):
    png = (greedy_4x4.output_dir / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 600 and height >= 150


def test_progress_lines_come_from_every_host(greedy_4x4):
    """Each host has one short batch: it says it compiles, then how its batch went (decode rate, nothing left)."""
    lines = greedy_4x4.output.splitlines()
    for host in range(4):
        assert any(f"host {host}: batch 1/1: compiling the engine's programs" in line for line in lines)
        done = [line for line in lines if f"host {host}: batch 1/1 done, " in line]
        assert len(done) == 1 and "(100%)" in done[0] and "tok/s decoding, ETA 0s" in done[0], done
        assert " 0.0 tok/s" not in done[0]
