"""Faults on emulated hosts with the real engine: a host killed mid-batch, resume, the leader killed.

One uninterrupted 1024-prompt run (4 hosts, 8 batches of 32 each) is the reference every resumed run must match.
"""

import shutil

import pytest
from multihost import launch, launch_and_kill

pytestmark = pytest.mark.multihost

SILENT_S = 20
BATCH = 32
FLAGS = (
    "--prompts_file=config/prompts/addition_1024.txt",
    "--trainer.model_axis_size=1",
    "--progress_interval_s=0.05",
    f"--silent_host_timeout_s={SILENT_S}",
    f"--batch_size={BATCH}",
    "--overwrite=false",
)


def tokens(rows):
    return [(r["global_prompt_index"], r["generation_index"], r["generated_token_ids"]) for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """1024 prompts on 4 hosts (256 each, 8 batches of 32), nothing killed."""
    return launch(tmp_path_factory.mktemp("uninterrupted"), *FLAGS, hosts=4, devices_per_host=1)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """The same run with host 2 SIGKILLed in its fourth batch, and a copy of what it left for a second resume."""
    out = tmp_path_factory.mktemp("killed")
    run, seconds_after_kill = launch_and_kill(out, 2, *FLAGS, after_parts=3)
    copy = tmp_path_factory.mktemp("killed_copy") / "out"
    shutil.copytree(out, copy)
    return run, seconds_after_kill, copy


def test_1024_prompts_on_four_hosts_complete_in_batches_with_every_row(uninterrupted):
    merged = uninterrupted.rows()
    assert [(r["global_prompt_index"], r["generation_index"]) for r in merged] == [(i, 0) for i in range(1024)]
    assert all(r["generated_token_count"] == 6 for r in merged)
    assert [len(uninterrupted.parts(h)) for h in range(4)] == [8] * 4


def test_a_killed_host_loses_at_most_its_current_batch_and_is_named(killed):
    run, seconds_after_kill, _ = killed
    assert run.returncode != 0
    assert seconds_after_kill < SILENT_S + 40, run.tail()
    assert f"host(s) [2] went silent (no heartbeat for silent_host_s={SILENT_S}s" in run.output
    for host in (0, 1, 3):
        rows = run.part_rows(host)
        assert [r["global_prompt_index"] for r in rows] == list(range(256 * host, 256 * (host + 1)))
    durable = run.part_rows(2)
    assert len(durable) >= 3 * BATCH and len(durable) % BATCH == 0  # whole batches only
    assert [r["global_prompt_index"] for r in durable] == list(range(512, 512 + len(durable)))
    assert not (run.output_dir / "merged.jsonl").exists()


def test_resume_on_four_hosts_samples_only_the_missing_rows_and_matches_byte_for_byte(killed, uninterrupted):
    run, _, _ = killed
    missing = 256 - len(run.part_rows(2))
    resumed = launch(run.output_dir, *FLAGS, "--resume=true", hosts=4, devices_per_host=1)
    assert (resumed.output_dir / "merged.jsonl").read_bytes() == (uninterrupted.output_dir / "merged.jsonl").read_bytes()
    hosts = {h["host"]: h for h in resumed.summary()["hosts"]}
    for host in (0, 1, 3):
        assert (hosts[host]["rows_kept"], hosts[host]["sequences"], hosts[host]["model_load_s"]) == (256, 0, 0)
    assert (hosts[2]["rows_kept"], hosts[2]["sequences"]) == (256 - missing, missing)
    assert hosts[2]["sequences"] <= missing + BATCH  # sampled on resume <= missing + one batch


def test_resume_on_two_hosts_with_another_batch_size_matches(killed, uninterrupted):
    _, _, copy = killed
    resumed = launch(copy, *FLAGS, "--resume=true", "--batch_size=50", hosts=2, devices_per_host=1)
    assert tokens(resumed.rows()) == tokens(uninterrupted.rows())
    hosts = {h["host"]: h for h in resumed.summary()["hosts"]}
    assert (hosts[0]["rows_kept"], hosts[0]["sequences"]) == (512, 0)
    assert hosts[1]["rows_kept"] + hosts[1]["sequences"] == 512
    assert hosts[1]["batches"] == -(-hosts[1]["sequences"] // 50)


def test_leader_killed_the_others_end_within_the_timeout_keeping_whole_parts(tmp_path):
    run, seconds_after_kill = launch_and_kill(tmp_path, 0, *FLAGS)
    assert run.returncode != 0
    assert seconds_after_kill < SILENT_S + 40, run.tail()
    # JAX's store lives in the leader's process: its death ends the others, by JAX's own fatal error if not ours
    assert any(m in run.output for m in ("The leader (host 0) went silent", "lost contact with the leader",
                                         "JAX distributed service detected fatal errors")), run.tail()  # fmt: skip
    assert not (tmp_path / "merged.jsonl").exists()
    for host in (1, 2, 3):  # whatever each host finished is there, in whole batches
        rows = run.part_rows(host)
        assert [r["global_prompt_index"] for r in rows] == list(range(256 * host, 256 * host + len(rows)))
        assert len(rows) % BATCH == 0
