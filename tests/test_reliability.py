"""Faults on emulated hosts with the real engine: a host killed mid-batch, resume on other host counts and batch
sizes, the leader killed.

The reference every resumed run must match byte for byte is the README job on 2 hosts (``greedy_2x4``): the same
256 prompts and settings, so the same fingerprint, whatever the devices per host and batch size.
"""

import shutil

import pytest
from multihost import launch, launch_and_kill

pytestmark = pytest.mark.multihost

SILENT_S = 10
BATCH = 16
FLAGS = ("--trainer.model_axis_size=1", "--progress_interval_s=0.05", f"--silent_host_timeout_s={SILENT_S}",
         f"--batch_size={BATCH}", "--overwrite=false")  # fmt: skip


def tokens(rows):
    return [(r["global_prompt_index"], r["generation_index"], r["generated_token_ids"]) for r in rows]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """256 prompts on 2 hosts in batches of 16, host 1 SIGKILLed in its fourth batch, and a copy of what it left."""
    out = tmp_path_factory.mktemp("killed")
    run, seconds_after_kill = launch_and_kill(out, 1, *FLAGS, after_parts=3, hosts=2)
    copy = tmp_path_factory.mktemp("killed_copy") / "out"
    shutil.copytree(out, copy)
    return run, seconds_after_kill, copy


def test_a_killed_host_loses_at_most_its_current_batch_and_is_named(killed):
    run, seconds_after_kill, _ = killed
    assert run.returncode != 0
    assert seconds_after_kill < SILENT_S + 40, run.tail()
    assert f"host(s) [1] went silent (no heartbeat for silent_host_s={SILENT_S}s" in run.output, run.tail()
    assert [r["global_prompt_index"] for r in run.part_rows(0)] == list(range(128))
    durable = run.part_rows(1)
    assert len(durable) >= 3 * BATCH and len(durable) % BATCH == 0  # whole batches only
    assert [r["global_prompt_index"] for r in durable] == list(range(128, 128 + len(durable)))
    assert not (run.output_dir / "merged.jsonl").exists()


def test_resume_samples_only_the_missing_rows_and_matches_an_uninterrupted_run_byte_for_byte(killed, greedy_2x4):
    run, _, _ = killed
    missing = 128 - len(run.part_rows(1))
    resumed = launch(run.output_dir, *FLAGS, "--resume=true", hosts=2, devices_per_host=1)
    assert (resumed.output_dir / "merged.jsonl").read_bytes() == (greedy_2x4.output_dir / "merged.jsonl").read_bytes()
    hosts = {h["host"]: h for h in resumed.summary()["hosts"]}
    assert (hosts[0]["rows_kept"], hosts[0]["sequences"], hosts[0]["model_load_s"]) == (128, 0, 0)
    assert (hosts[1]["rows_kept"], hosts[1]["sequences"]) == (128 - missing, missing)
    assert hosts[1]["sequences"] <= missing + BATCH  # sampled on resume <= missing + one batch


def test_resume_on_one_host_with_another_batch_size_matches(killed, greedy_2x4):
    _, _, copy = killed
    resumed = launch(copy, *FLAGS, "--resume=true", "--batch_size=50", hosts=1, devices_per_host=1)
    assert tokens(resumed.rows()) == tokens(greedy_2x4.rows())
    (host,) = resumed.summary()["hosts"]
    assert host["rows_kept"] + host["sequences"] == 256 and host["rows_kept"] >= 128 + 3 * BATCH
    assert host["batches"] == -(-host["sequences"] // 50)


def test_leader_killed_the_others_end_within_the_timeout_keeping_whole_parts(tmp_path):
    run, seconds_after_kill = launch_and_kill(tmp_path, 0, *FLAGS, hosts=2)
    assert run.returncode != 0
    assert seconds_after_kill < SILENT_S + 40, run.tail()
    # JAX's store lives in the leader's process: its death ends the others, by JAX's own fatal error if not ours
    assert any(m in run.output for m in ("The leader (host 0) went silent", "lost contact with the leader",
                                         "JAX distributed service detected fatal errors")), run.tail()  # fmt: skip
    assert not (tmp_path / "merged.jsonl").exists()
    rows = run.part_rows(1)  # whatever host 1 finished is there, in whole batches
    assert [r["global_prompt_index"] for r in rows] == list(range(128, 128 + len(rows)))
    assert len(rows) % BATCH == 0
