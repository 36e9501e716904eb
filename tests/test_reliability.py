"""Faults on emulated hosts with the real engine: a host killed mid-batch, resume on other host counts and batch
sizes, the leader killed.

The killed run and its resume on 4 hosts leave the parts as the output (``merge: false``): only manifests reach the
leader, and the resumed run directory loads with ``datasets.load_dataset`` into the uninterrupted merged rows; the
resume on 1 host merges the same parts (``merge: true``).

The reference every resumed run must match is the README job on 2 hosts (``greedy_2x4``): the same 256 prompts and
settings, so the same fingerprint, whatever the devices per host and batch size; every field matches but
``process_index`` (a resume spreads the missing rows over all its hosts).
"""

import json
import shutil

import pytest
from multihost import launch, launch_and_kill
from test_sharded_output import load

from levanter_multihost.rundir import INDEX

pytestmark = pytest.mark.multihost

SILENT_S = 10
BATCH = 8
FLAGS = (
    "--trainer.model_axis_size=1",
    "--progress_interval_s=0.05",
    f"--silent_host_timeout_s={SILENT_S}",
    f"--batch_size={BATCH}",
    "--overwrite=false",
)
SHARDED = "--merge=false"


def tokens(rows):
    return [(r["global_prompt_index"], r["generation_index"], r["generated_token_ids"]) for r in rows]


def without_host(rows):
    """Every field but ``process_index``: which host sampled a row is all that another host count changes."""
    return [{k: v for k, v in r.items() if k != "process_index"} for r in rows]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """256 prompts on 4 hosts in batches of 8, host 1 SIGKILLed after its third batch, and a copy of what it left."""
    out = tmp_path_factory.mktemp("killed")
    run, seconds_after_kill = launch_and_kill(out, 1, *FLAGS, SHARDED, after_parts=3, hosts=4)
    copy = tmp_path_factory.mktemp("killed_copy") / "out"
    shutil.copytree(out, copy)
    return run, seconds_after_kill, copy


def whole_batches_from(rows: list[dict], first: int) -> int:
    """How many rows ``rows`` holds, checked to be whole batches of consecutive prompts from ``first``."""
    assert [r["global_prompt_index"] for r in rows] == list(range(first, first + len(rows)))
    assert len(rows) % BATCH == 0
    return len(rows)


def test_a_killed_host_loses_at_most_its_current_batch_and_is_named(killed):
    run, seconds_after_kill, _ = killed
    assert run.returncode != 0
    assert seconds_after_kill < SILENT_S + 40, run.tail()
    assert f"host(s) [1] went silent (no heartbeat for silent_host_s={SILENT_S}s" in run.output, run.tail()
    assert 3 * BATCH <= whole_batches_from(run.part_rows(1), 64) < 64
    for host in (0, 2, 3):  # the others stopped when the leader gave up, each with whole batches
        whole_batches_from(run.part_rows(host), 64 * host)
    assert not (run.output_dir / "merged.jsonl").exists() and not (run.output_dir / INDEX).exists()


def test_resume_spreads_the_missing_rows_over_every_host_and_matches_an_uninterrupted_run(killed, greedy_2x4):
    run, _, _ = killed
    missing = 256 - len(run.part_rows())
    resumed = launch(run.output_dir, *FLAGS, SHARDED, "--resume=true", hosts=4, devices_per_host=1)
    assert without_host(load(run.output_dir)) == without_host(greedy_2x4.rows())
    assert not (run.output_dir / "merged.jsonl").exists()
    assert json.loads((run.output_dir / INDEX).read_text())["rows"] == 256
    assert (
        resumed.summary()["summary"]["sample/task_accuracy"]
        == greedy_2x4.summary()["summary"]["sample/task_accuracy"]
    )
    hosts = sorted(resumed.summary()["hosts"], key=lambda h: h["host"])
    sampled = [h["sequences"] for h in hosts]
    assert sum(sampled) == missing and max(sampled) - min(sampled) <= 1 and min(sampled) > 0, sampled
    assert sum(h["rows_kept"] for h in hosts) == 256 - missing


def test_resume_on_one_host_with_another_batch_size_matches(killed, greedy_2x4):
    _, _, copy = killed
    resumed = launch(copy, *FLAGS, "--resume=true", "--batch_size=50", hosts=1, devices_per_host=1)
    assert tokens(resumed.rows()) == tokens(greedy_2x4.rows())
    (host,) = resumed.summary()["hosts"]
    assert host["rows_kept"] + host["sequences"] == 256 and host["rows_kept"] >= 3 * BATCH
    assert host["batches"] == -(-host["sequences"] // 50)


def test_leader_killed_the_others_end_within_the_timeout_keeping_whole_parts(tmp_path):
    run, seconds_after_kill = launch_and_kill(tmp_path, 0, *FLAGS, hosts=2)
    assert run.returncode != 0
    assert seconds_after_kill < SILENT_S + 40, run.tail()
    # JAX's store lives in the leader's process: its death ends the others, by JAX's own fatal error if not ours
    assert any(
        m in run.output
        for m in (
            "The leader (host 0) went silent",
            "lost contact with the leader",
            "JAX distributed service detected fatal errors",
        )
    ), run.tail()
    assert not (tmp_path / "merged.jsonl").exists()
    rows = run.part_rows(1)  # whatever host 1 finished is there, in whole batches
    assert [r["global_prompt_index"] for r in rows] == list(range(128, 128 + len(rows)))
    assert len(rows) % BATCH == 0
