"""Faults injected into running jobs on emulated hosts: signals (one to a host of an overwrite, which must leave
the old merged file), a frozen leader, two runs in one directory, and an engine whose own checks poison its state.

Every run samples 1024 addition prompts on 2 hosts of 1 device in batches of 32, long enough to be interrupted
(256 for the run that is held still and then left to finish).
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import draccus
import pytest
from multihost import REPO, TINY_CONFIG, Background, cache_flags, host_env

from levanter_multihost import host_work
from levanter_multihost.generation import EngineStateError
from levanter_multihost.launch_env import ENV_PROCESS_ID
from levanter_multihost.sample_lm_multihost import SampleLmMultihostConfig, main

pytestmark = pytest.mark.multihost

SILENT_S = 8
PROMPTS_256 = "config/prompts/addition_256.txt"
FLAGS = (
    "--prompts_file=config/prompts/addition_1024.txt",
    "--batch_size=32",
    "--progress_interval_s=0.2",
    f"--silent_host_timeout_s={SILENT_S}",
    "--task=null",
)


def test_sigterm_to_the_launcher_stops_every_host_keeping_their_batches(tmp_path):
    job = Background(tmp_path, *FLAGS)
    job.wait_for_parts(3)
    os.kill(job.proc.pid, signal.SIGTERM)
    run = job.wait(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, run.tail()
    assert not (tmp_path / "merged.jsonl").exists()
    for part in run.parts():  # whatever was written is whole
        assert part.read_bytes().endswith(b"\n")
    assert len(run.parts()) >= 3
    assert "Traceback" not in run.output, run.tail()


def test_sigterm_to_a_host_of_an_overwrite_stops_it_the_leader_names_it_and_the_old_merged_file_stays(tmp_path):
    old = b'{"old": "merged output"}\n'
    (tmp_path / "merged.jsonl").write_bytes(old)
    job = Background(tmp_path, *FLAGS, "--overwrite=true")
    victim = job.pid(1)
    job.wait_for_parts(2, host=1)
    os.kill(victim, signal.SIGTERM)
    run = job.wait(timeout=120)
    assert run.returncode != 0
    assert "host 1 failed: Stopped: Stopped by signal SIGTERM" in run.output, run.tail()
    assert f"[launch] host 1 exited with status {128 + signal.SIGTERM}" in run.output, run.tail()
    assert len(run.parts(1)) >= 2
    assert (tmp_path / "merged.jsonl").read_bytes() == old  # an overwrite replaces it only once its merge is in
    assert not (tmp_path / ".lock").exists()


def frozen_until(tmp_path, host: int, said: str):
    """Run, freeze ``host`` (SIGSTOP) once host 1 wrote a part, let it go (SIGCONT) once the job says ``said``."""
    job = Background(tmp_path, *FLAGS)
    pid = job.pid(host)
    job.wait_for_parts(1, host=1)
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + SILENT_S + 120
        while said not in job.output and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the launcher may have killed it already
            os.kill(pid, signal.SIGCONT)
    run = job.wait(timeout=120)
    assert said in run.output, run.tail()
    return run


def test_a_frozen_leader_is_named_by_the_others(tmp_path):
    run = frozen_until(tmp_path, 0, "The leader (host 0) went silent")
    assert run.returncode != 0


def test_a_second_run_into_the_same_directory_is_refused_naming_the_first(tmp_path):
    # held still for a while, then left to finish: 256 prompts are enough
    first = Background(tmp_path, *FLAGS, "--silent_host_timeout_s=300", f"--prompts_file={PROMPTS_256}")
    hosts = [first.pid(0), first.pid(1)]
    first.wait_for_parts(1)
    for pid in hosts:  # held still, so the first run is certainly running while the second starts
        os.kill(pid, signal.SIGSTOP)
    try:
        second = Background(tmp_path, *FLAGS, "--overwrite=true", hosts=1).wait(timeout=120)
    finally:
        for pid in hosts:
            os.kill(pid, signal.SIGCONT)
    assert second.returncode == 2, second.tail()
    assert "is in use by run" in second.output and f"delete {tmp_path}/.lock" in second.output, second.tail()
    assert first.wait(timeout=180).returncode == 0
    assert (tmp_path / "merged.jsonl").exists() and not (tmp_path / ".lock").exists()
    merged = (tmp_path / "merged.jsonl").read_bytes()
    # the lock is free again: a resume of the finished run keeps every row
    resumed = Background(
        tmp_path, *FLAGS, "--resume=true", "--overwrite=false", f"--prompts_file={PROMPTS_256}", hosts=1
    ).wait(timeout=180)
    assert resumed.returncode == 0, resumed.tail()
    assert (tmp_path / "merged.jsonl").read_bytes() == merged and not (tmp_path / ".lock").exists()


def test_an_engine_whose_checks_poison_its_state_fails_the_run_with_no_merged_file(tmp_path, monkeypatch):
    """Pages too few for the batch the packer is made to give: 'Out of free pages' poisons the page table."""
    import jax
    from equinox import _errors

    from levanter_multihost import seams

    monkeypatch.setattr(_errors, "EQX_ON_ERROR", _errors.EQX_ON_ERROR)  # restored after, for later in-process tests
    monkeypatch.delenv("EQX_ON_ERROR", raising=False)
    seams.checks_as_nan()
    jax.clear_caches()  # programs traced by earlier tests in this process carry the "raise" checks
    args = [
        f"--output_dir={tmp_path}",
        '--prompts=["4821+377=", "9999+9999=", "1+2=", "12+30="]',
        "--task=null",
        "--engine.max_pages=6",
        "--engine.max_seqs=4",
        "--trainer.model_axis_size=1",
        *cache_flags(),
    ]
    config = draccus.parse(SampleLmMultihostConfig, config_path=str(TINY_CONFIG), args=args)
    monkeypatch.setattr(host_work, "batches", lambda items, engine: [items])  # one batch, whatever the planner says
    monkeypatch.setattr("levanter_multihost.capacity_inputs.check_capacity", lambda plan, **k: plan)
    with pytest.raises(
        EngineStateError, match=r"host 0, batch 0: the engine's page table is poisoned .* engine.max_pages"
    ):
        main(config)
    jax.clear_caches()  # and the ones traced here carry "nan"
    assert not (tmp_path / "merged.jsonl").exists()
    assert not list((tmp_path / "parts").glob("*.jsonl"))


@pytest.mark.slow
def test_two_hosts_given_different_prompt_files_are_refused_naming_the_host_before_anything_is_written(tmp_path):
    """A stale copy of the prompts on one worker: each host reads its own file (the launcher's host index picks it)."""
    prompts = (REPO / "config" / "prompts" / "addition_256.txt").read_text().splitlines()
    (tmp_path / "p0.txt").write_text("\n".join(prompts[:64]) + "\n")
    (tmp_path / "p1.txt").write_text("\n".join(prompts[64:128]) + "\n")
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(REPO / "infra" / "launch.py"),
        "--local_hosts",
        "2",
        "--devices_per_host",
        "1",
        "--",
        "bash",
        "-c",
        f'exec "{sys.executable}" -m levanter_multihost.sample_lm_multihost --config_path '
        f"{TINY_CONFIG} --output_dir={out} --trainer.model_axis_size=1 "
        f"--prompts_file={tmp_path}/p${{{ENV_PROCESS_ID}}}.txt " + " ".join(cache_flags()),
    ]
    run = subprocess.run(command, cwd=REPO, env=host_env(), capture_output=True, text=True, timeout=300, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 2, output[-10000:]
    assert output.count("The hosts resolved") == 1  # said once, by the leader; host 1 exits 2 quietly
    assert "The hosts resolved different runs: host 1 differs in prompts_sha256 (" in output, output[-10000:]
    assert "Nothing was sampled or merged." in output and "Traceback" not in output, output[-10000:]
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []  # no lock, no run.json, no part


@pytest.mark.slow
def test_a_run_directory_deleted_mid_run_fails_the_run(tmp_path, monkeypatch):
    from levanter_multihost.rundir import RunDir, RunDirError

    out = tmp_path / "out"
    write_part = RunDir.write_part

    def write_then_delete(self, *args):
        part = write_part(self, *args)
        shutil.rmtree(out)  # someone cleans up the run directory while the run writes it
        return part

    monkeypatch.setattr(RunDir, "write_part", write_then_delete)
    args = [f"--output_dir={out}", '--prompts=["4821+377=", "1+2="]', "--trainer.model_axis_size=1", *cache_flags()]
    with pytest.raises(RunDirError, match=r"was deleted or replaced while this run wrote it"):
        main(draccus.parse(SampleLmMultihostConfig, config_path=str(TINY_CONFIG), args=args))
    assert not (out / "merged.jsonl").exists()


@pytest.mark.slow
def test_a_host_frozen_past_the_timeout_says_it_was_frozen_when_it_wakes(tmp_path):
    run = frozen_until(tmp_path, 1, "host(s) [1] went silent")
    assert "[host 1]" in run.output and "This host itself was frozen (stopped or starved) for" in run.output, (
        run.tail()
    )
    assert run.returncode != 0
