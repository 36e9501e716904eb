"""Faults on emulated hosts with the real engine: a host killed mid-generation, resume, the leader killed, load.

One uninterrupted 1024-prompt run is the reference every resumed run must match exactly.
"""

import shutil

import draccus
import pytest
from multihost import TINY_CONFIG, launch, launch_and_kill

from levanter_multihost.config import SampleLmMultihostConfig
from levanter_multihost.resume import ResumeError
from levanter_multihost.sample_lm_multihost import main

pytestmark = pytest.mark.multihost

GATHER_TIMEOUT_S = 20
FLAGS = (
    "--prompts_file=config/prompts/addition_1024.txt",
    "--trainer.model_axis_size=1",
    "--progress_interval_s=0.05",
    f"--gather_timeout_s={GATHER_TIMEOUT_S}",
)


def tokens(rows):
    return [(r["global_prompt_index"], r["generation_index"], r["generated_token_ids"]) for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """1024 prompts on 4 hosts (256 each), nothing killed."""
    return launch(tmp_path_factory.mktemp("uninterrupted"), *FLAGS, hosts=4, devices_per_host=1)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """The same run with host 2 SIGKILLed while it decodes, and a copy of what it left for a second resume."""
    out = tmp_path_factory.mktemp("killed")
    run, seconds_after_kill = launch_and_kill(out, 2, *FLAGS, "--overwrite=false")
    copy = tmp_path_factory.mktemp("killed_copy") / "out"
    shutil.copytree(out, copy)
    return run, seconds_after_kill, copy


def test_1024_prompts_on_four_hosts_complete_with_every_row(uninterrupted):
    merged = uninterrupted.rows()
    assert [(r["global_prompt_index"], r["generation_index"]) for r in merged] == [(i, 0) for i in range(1024)]
    assert all(r["generated_token_count"] == 6 for r in merged)
    assert [len(uninterrupted.rows(f"host_{h:04d}_of_0004.jsonl")) for h in range(4)] == [256] * 4


def test_killed_host_is_named_within_the_timeout_and_nothing_partial_is_merged(killed):
    run, seconds_after_kill, _ = killed
    assert run.returncode != 0
    assert seconds_after_kill < GATHER_TIMEOUT_S + 40, run.tail()
    assert f"host(s) [2] sent no rows and no heartbeat for gather_timeout_s={GATHER_TIMEOUT_S}s" in run.output
    for host in (0, 1, 3):
        rows = run.rows(f"host_{host:04d}_of_0004.jsonl")
        assert [r["global_prompt_index"] for r in rows] == list(range(256 * host, 256 * (host + 1)))
    assert not (run.output_dir / "host_0002_of_0004.jsonl").exists()
    assert not (run.output_dir / "merged.jsonl").exists()


def test_resume_on_four_hosts_samples_only_the_missing_rows_and_matches(killed, uninterrupted):
    run, _, _ = killed
    resumed = launch(run.output_dir, *FLAGS, "--resume=true", "--overwrite=false", hosts=4, devices_per_host=1)
    assert tokens(resumed.rows()) == tokens(uninterrupted.rows())
    hosts = {h["host"]: h for h in resumed.summary()["hosts"]}
    for host in (0, 1, 3):
        assert (hosts[host]["rows_resumed"], hosts[host]["sequences"]) == (256, 0)
    assert (hosts[2]["rows_resumed"], hosts[2]["sequences"]) == (0, 256)


def test_resume_on_two_hosts_matches(killed, uninterrupted):
    _, _, copy = killed
    resumed = launch(copy, *FLAGS, "--resume=true", "--overwrite=false", hosts=2, devices_per_host=1)
    assert tokens(resumed.rows()) == tokens(uninterrupted.rows())
    hosts = {h["host"]: h for h in resumed.summary()["hosts"]}
    assert (hosts[0]["rows_resumed"], hosts[0]["sequences"]) == (512, 0)
    assert (hosts[1]["rows_resumed"], hosts[1]["sequences"]) == (256, 256)


def test_resume_refuses_outputs_of_another_config(killed, monkeypatch):
    _, _, copy = killed
    args = [*FLAGS, f"--output_dir={copy}", "--resume=true", "--overwrite=false", "--seed=5"]
    config = draccus.parse(SampleLmMultihostConfig, config_path=str(TINY_CONFIG), args=args)
    with pytest.raises(ResumeError, match=r"Cannot resume: .* \(differs in \['seed'\]\)"):
        main(config)


def test_leader_killed_the_others_end_within_the_timeout_keeping_whole_shards(tmp_path):
    run, seconds_after_kill = launch_and_kill(tmp_path, 0, *FLAGS)
    assert run.returncode != 0
    assert seconds_after_kill < GATHER_TIMEOUT_S + 40, run.tail()
    assert not (tmp_path / "merged.jsonl").exists()
    for host in (1, 2, 3):
        shard = tmp_path / f"host_{host:04d}_of_0004.jsonl"
        if shard.exists():
            assert len(run.rows(shard.name)) == 256
