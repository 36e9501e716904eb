"""Kill and resume: SIGKILL one host mid-run, resume, and compare with an uninterrupted run byte for byte.

    uv run python bench/resume.py                        # ~5 min on 2 cores; JSON to bench/results/resume.json
    uv run python bench/resume.py --prompts 1024 --kill_after_parts 2 --out /tmp/resume.json

Workload: ``--prompts`` (default 4,096) addition prompts (``addition.make_prompts``), ``tiny_local.yaml``
otherwise, ``--batch_size`` 64, on 4 emulated hosts (1 CPU device each, two to a core here), with
``overwrite: false`` and ``--silent_host_timeout_s`` 20 (the default 300 s would only make the survivors wait
longer). Three runs, each through the real launcher and sampler, one compilation cache:

1. killed: ``infra/launch.py --keep_going`` (the survivors run on, as on a slice where nobody stops them); once
   host ``--kill_host`` (default 2, not the leader) has written ``--kill_after_parts`` part files
   (``output_dir/parts/*.hNNNN*``), the bench sends SIGKILL to that host's process (found by its
   ``LEVANTER_MULTIHOST_PROCESS_ID`` among the launcher's session). The survivors finish their shares, the
   leader finds the host silent and fails the run: no merged output.
2. resumed: the same command with ``--resume=true``: the leader keeps the rows on disk (verified row by row),
   the hosts sample only what is missing.
3. reference: an uninterrupted run of the same config into a fresh directory.

Reported: the killed run's exit status, its part files and rows on disk per host, the rows missing; on resume,
the rows kept (summary ``hosts[].rows_kept``) and sampled (``hosts[].sequences``) per host, and the bound rows
sampled <= missing + one batch; merged.jsonl of the resumed run against the reference, byte for byte.
"""

import argparse
import hashlib
import os
import shutil
import signal
import time

from _common import (
    RESULTS,
    SCRATCH,
    Report,
    addition_prompts,
    cache_flag,
    cores,
    launch,
    pinning_note,
    wait_for_quiet,
    write_config,
)


def session_host_pid(session: int, host: int) -> int | None:
    """The pid of emulated host ``host`` under the launcher whose session is ``session``."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) != session:  # fields after the name: state, ppid, pgrp, session
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if f"LEVANTER_MULTIHOST_PROCESS_ID={host}".encode() in env and b"bench_sampler.py" in cmdline:
            return int(name)
    return None


def parts_on_disk(out, host: int | None = None) -> list:
    tag = "" if host is None else f".h{host:04d}b"
    return sorted(p for p in (out / "parts").glob("*.jsonl") if tag in p.name)


def rows_in(paths) -> int:
    return sum(p.read_bytes().count(b"\n") for p in paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4096)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--kill_host", type=int, default=2)
    parser.add_argument("--kill_after_parts", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS / "resume.json"))
    args = parser.parse_args()
    report = Report("resume", args)
    core_list = cores()
    work = SCRATCH / "resume"
    shutil.rmtree(work, ignore_errors=True)
    prompts = addition_prompts(args.prompts, work / f"addition_{args.prompts}.txt")
    config = write_config(
        work / "config.yaml",
        prompts_file=str(prompts),
        task="addition",
        overwrite=False,
        progress_interval_s=0,
        samples_table_rows=0,
        batch_size=args.batch_size,
        silent_host_timeout_s=20,
    )
    flags = [cache_flag(work / "jax_cache")]
    killed_dir, reference_dir = work / "killed", work / "reference"
    print(f"{args.hosts} hosts: {pinning_note(args.hosts, core_list)}", flush=True)

    wait_for_quiet()
    reference = launch(config, reference_dir, args.hosts, *flags, core_list=core_list)  # also fills the cache

    kill = {}

    def watch(proc, elapsed):
        if kill or len(parts_on_disk(killed_dir, args.kill_host)) < args.kill_after_parts:
            return
        pid = session_host_pid(proc.pid, args.kill_host)
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        kill.update(pid=pid, at_s=elapsed, parts_then=len(parts_on_disk(killed_dir, args.kill_host)))
        print(
            f"SIGKILL to host {args.kill_host} (pid {pid}) at {elapsed:.1f} s, "
            f"{kill['parts_then']} of its parts on disk",
            flush=True,
        )

    wait_for_quiet()
    killed = launch(
        config,
        killed_dir,
        args.hosts,
        *flags,
        core_list=core_list,
        launcher_flags=["--keep_going"],
        watch=watch,
        check=False,
        log_name="killed_run.log",
    )
    after_kill = {h: parts_on_disk(killed_dir, h) for h in range(args.hosts)}
    on_disk = rows_in(parts_on_disk(killed_dir))
    missing = args.prompts - on_disk
    merged_after_kill = (killed_dir / "merged.jsonl").exists()

    wait_for_quiet()
    resumed = launch(
        config, killed_dir, args.hosts, *flags, "--resume=true", core_list=core_list, log_name="resumed_run.log"
    )
    sampled = sum(m["sequences"] for m in resumed["host_metrics"])
    kept = sum(m["rows_kept"] for m in resumed["host_metrics"])
    merged = (killed_dir / "merged.jsonl").read_bytes()
    expected = (reference_dir / "merged.jsonl").read_bytes()

    host_rows = []
    for m in resumed["host_metrics"]:
        h = m["host"]
        host_rows.append(
            {
                "host": h,
                "parts_after_kill": len(after_kill[h]),
                "rows_after_kill": rows_in(after_kill[h]),
                "rows_kept": m["rows_kept"],
                "sampled": m["sequences"],
                "batches": m["batches"],
                "generate_s": m["generate_s"],
            }
        )
    result = {
        "killed_host": args.kill_host,
        "killed_exit_status": killed["returncode"],
        "killed_at_s": kill.get("at_s"),
        "killed_wall_s": killed["wall_outside_s"],
        "merged_after_kill": merged_after_kill,
        "rows_on_disk": on_disk,
        "rows_missing": missing,
        "rows_kept_on_resume": kept,
        "rows_sampled_on_resume": sampled,
        "bound_missing_plus_batch": missing + args.batch_size,
        "within_bound": sampled <= missing + args.batch_size,
        "resumed_rows": merged.count(b"\n"),
        "identical_to_reference": merged == expected,
        "sha256_resumed": hashlib.sha256(merged).hexdigest(),
        "sha256_reference": hashlib.sha256(expected).hexdigest(),
        "resume_wall_s": resumed["wall_outside_s"],
        "reference_wall_s": reference["wall_outside_s"],
        "resume_generate_max_s": resumed["summary"]["sample/generate_time_max_s"],
        "reference_generate_max_s": reference["summary"]["sample/generate_time_max_s"],
    }
    report.table("Per host: parts after the kill, then the resume", host_rows, HOST_COLUMNS)
    report.table("Kill and resume", [result], COLUMNS)
    with open(killed["log"], errors="replace") as f:
        tail = [line for line in f.read().splitlines() if "ERROR" in line][-5:]
    report.write(
        args.out, result=result, hosts=host_rows, kill=kill, killed_log_errors=tail, at=time.strftime("%H:%M:%S")
    )


HOST_COLUMNS = [
    ("host", "host", "{:d}"),
    ("parts_after_kill", "parts after kill", "{:d}"),
    ("rows_after_kill", "rows after kill", "{:d}"),
    ("rows_kept", "kept on resume", "{:d}"),
    ("sampled", "sampled on resume", "{:d}"),
    ("batches", "batches on resume", "{:d}"),
    ("generate_s", "generate s", "{:.1f}"),
]
COLUMNS = [
    ("killed_exit_status", "killed run status", "{}"),
    ("rows_on_disk", "rows on disk", "{:d}"),
    ("rows_missing", "missing", "{:d}"),
    ("rows_kept_on_resume", "kept", "{:d}"),
    ("rows_sampled_on_resume", "sampled on resume", "{:d}"),
    ("bound_missing_plus_batch", "missing + 1 batch", "{:d}"),
    ("within_bound", "within bound", "{}"),
    ("identical_to_reference", "merged.jsonl identical", "{}"),
]

if __name__ == "__main__":
    main()
