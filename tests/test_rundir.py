"""The run directory on a local path and on an fsspec URL (``memory://``): atomic writes, part names, the
fresh / resume / refuse decision, removing a replaced run's parts, and the one-run-at-a-time lock."""

import datetime
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from levanter_multihost import processes, runlock
from levanter_multihost.rundir import (
    LOCK,
    LOCK_STALE_BEATS,
    MERGED_JSONL,
    RUN_FILE,
    Decision,
    Part,
    RunDir,
    RunDirError,
    fingerprint_hash,
)

FIELDS = {"model": "tiny-addition", "seed": 0, "stop": ["."], "max_new_tokens": 6}
FP = fingerprint_hash(FIELDS)


@pytest.fixture(params=["local", "memory"])
def run_dir(request, tmp_path):
    if request.param == "local":
        yield RunDir(str(tmp_path / "out"))
        return
    d = RunDir(f"memory://test_rundir_{uuid.uuid4().hex[:8]}/out")
    yield d
    d.fs.rm(d.root.rsplit("/", 1)[0], recursive=True)


def files(d: RunDir) -> list[str]:
    """Every file under the run directory, relative to it."""
    if not d.fs.exists(d.root):
        return []
    return sorted(path.split(d.root + "/", 1)[1] for path in d.fs.find(d.root))


def write_parts(d: RunDir, attempt: str, *specs: tuple[int, int, int, int]) -> list[Part]:
    """Parts (first, last, host, batch) of ``attempt``, each holding the name's range as text."""
    return [
        d.write_part(f"{first}-{last}\n".encode(), first, last, FP, attempt, host, batch)
        for first, last, host, batch in specs
    ]


# -- files -------------------------------------------------------------------------------------------------------


def test_write_atomic_writes_and_replaces_whole_files(run_dir):
    run_dir.write_atomic("a/b.txt", b"first")
    run_dir.write_atomic("a/b.txt", b"second")
    assert run_dir.read_bytes("a/b.txt") == b"second"
    assert run_dir.exists("a/b.txt") and not run_dir.exists("a/c.txt")
    assert files(run_dir) == ["a/b.txt"]
    assert run_dir.url_of("a/b.txt") == run_dir.url + "/a/b.txt"


def test_a_failed_write_leaves_no_file_and_no_temporary_one(run_dir):
    run_dir.write_atomic("kept.txt", b"old")
    for name in ("new.txt", "kept.txt"):
        with pytest.raises(RuntimeError, match="disk on fire"), run_dir.open_atomic(name) as f:
            f.write(b"half a file")
            raise RuntimeError("disk on fire")
    assert files(run_dir) == ["kept.txt"]
    assert run_dir.read_bytes("kept.txt") == b"old"


def test_list_parts_reads_the_names_and_ignores_temporary_and_foreign_files(run_dir):
    written = write_parts(run_dir, "0000000a", (40, 79, 1, 0), (0, 39, 0, 0), (80, 80, 0, 1))
    name = written[0].path.rsplit("/", 1)[1]
    for foreign in (
        f"{name}.tmp-1a2b3c4d",
        f"old-{name}",
        "README.md",
        name.replace(".jsonl", ".json"),
        name.replace(FP, FP.upper()),
    ):
        with run_dir.fs.open(run_dir.path(f"parts/{foreign}"), "wb") as f:
            f.write(b"x")
    parts = run_dir.list_parts()
    assert parts == sorted(written)
    assert [(p.first, p.last, p.host, p.batch) for p in parts] == [(0, 39, 0, 0), (40, 79, 1, 0), (80, 80, 0, 1)]
    assert {(p.fingerprint, p.attempt) for p in parts} == {(FP, "0000000a")}
    assert [run_dir.read_part(p) for p in parts] == [b"0-39\n", b"40-79\n", b"80-80\n"]
    assert name == f"0000000040-0000000079.{FP}.0000000a.h0001b000000.jsonl"


def test_list_parts_of_a_directory_without_parts_is_empty(run_dir):
    assert run_dir.list_parts() == []
    run_dir.write_atomic(MERGED_JSONL, b"")
    assert run_dir.list_parts() == []


def test_remove_parts_except_keeps_only_the_given_attempts(run_dir):
    write_parts(run_dir, "000000aa", (0, 9, 0, 0), (10, 19, 1, 0))
    kept = write_parts(run_dir, "000000bb", (0, 4, 0, 0)) + write_parts(run_dir, "000000cc", (5, 9, 1, 3))
    assert run_dir.remove_parts_except(("000000bb", "000000cc")) == 2
    assert run_dir.list_parts() == sorted(kept)
    assert run_dir.remove_parts_except(("000000bb", "000000cc")) == 0


# -- fresh, resume or refuse -------------------------------------------------------------------------------------


def test_an_empty_or_unrelated_directory_is_a_fresh_run(run_dir):
    assert run_dir.decide(FIELDS, resume=False, overwrite=False, attempt="00000001") == Decision(
        "00000001", ("00000001",), replaces=False
    )
    run_dir.write_atomic("notes.txt", b"mine")
    assert run_dir.decide(FIELDS, resume=True, overwrite=True, attempt="00000002").replaces is False


def test_earlier_outputs_are_refused_with_what_is_there_and_the_three_ways_on(run_dir):
    run_dir.record(FIELDS, Decision("00000001", ("00000001",), False))
    run_dir.write_atomic(MERGED_JSONL, b"")
    write_parts(run_dir, "00000001", (0, 9, 0, 0), (10, 19, 1, 0))
    with pytest.raises(RunDirError) as error:
        run_dir.decide(FIELDS, resume=False, overwrite=False, attempt="00000002")
    assert str(error.value) == (
        f"output_dir ({run_dir.url}) holds outputs of an earlier run (merged.jsonl, run.json, 2 part file(s) in "
        "parts/). Set resume: true to continue it, overwrite: true to replace it (once this run's merge is "
        "written), or choose another output_dir."
    )


def test_resuming_the_same_run_accumulates_its_attempts(run_dir):
    attempts: tuple[str, ...] = ()
    for attempt in ("00000001", "00000002", "00000003"):
        decision = run_dir.decide(FIELDS, resume=True, overwrite=False, attempt=attempt)
        attempts += (attempt,)
        assert decision == Decision(attempt, attempts, replaces=False)
        run_dir.record(FIELDS, decision)
        write_parts(run_dir, attempt, (len(attempts), len(attempts), 0, 0))
    assert json.loads(run_dir.read_bytes(RUN_FILE)) == {
        "fingerprint": FP,
        "fields": FIELDS,
        "attempts": list(attempts),
    }


def test_resuming_another_config_is_refused_naming_the_fields_that_differ(run_dir):
    run_dir.record(FIELDS, Decision("00000001", ("00000001",), False))
    changed = {**FIELDS, "seed": 1, "stop": (".",), "temperature": 0.7}  # a tuple is the list run.json holds
    with pytest.raises(RunDirError) as error:
        run_dir.decide(changed, resume=True, overwrite=False, attempt="00000002")
    assert str(error.value) == (
        f"Cannot resume: output_dir ({run_dir.url}) holds a run with fingerprint {FP}, this config has "
        f"{fingerprint_hash(changed)} (differs in ['seed', 'temperature']). Outputs of different configs are never "
        "mixed: use another output_dir or overwrite: true."
    )


def test_resuming_parts_without_run_json_is_refused(run_dir):
    write_parts(run_dir, "00000001", (0, 9, 0, 0))
    with pytest.raises(RunDirError) as error:
        run_dir.decide(FIELDS, resume=True, overwrite=False, attempt="00000002")
    assert str(error.value) == (
        f"Cannot resume: output_dir ({run_dir.url}) has no run.json to check its outputs (1 part file(s) in parts/) "
        "against this run. Use overwrite: true or another output_dir."
    )


@pytest.mark.parametrize("content, problem", [(b"{cut", "is not valid JSON"), (b"[1]", "is not a JSON object")])
def test_an_unreadable_run_json_is_named_on_resume_and_replaced_on_overwrite(run_dir, content, problem):
    run_dir.write_atomic(RUN_FILE, content)
    with pytest.raises(RunDirError, match=rf"^{run_dir.url_of(RUN_FILE)} {problem}.*Use overwrite: true\.$"):
        run_dir.decide(FIELDS, resume=True, overwrite=False, attempt="00000002")
    decision = run_dir.decide(FIELDS, resume=True, overwrite=True, attempt="00000002")
    assert decision == Decision("00000002", ("00000002",), replaces=True)


def test_overwrite_replaces_another_run_and_starts_a_new_list_of_attempts(run_dir):
    run_dir.record({**FIELDS, "seed": 5}, Decision("00000001", ("00000001",), False))
    write_parts(run_dir, "00000001", (0, 9, 0, 0))
    decision = run_dir.decide(FIELDS, resume=False, overwrite=True, attempt="00000002")
    assert decision == Decision("00000002", ("00000002",), replaces=True)
    assert len(run_dir.list_parts()) == 1  # deciding writes nothing; the parts go once the new merge is in


def test_the_fingerprint_ignores_key_order():
    assert fingerprint_hash(dict(reversed(list(FIELDS.items())))) == FP
    assert fingerprint_hash({**FIELDS, "seed": 1}) != FP
    assert len(FP) == 16 and int(FP, 16) >= 0


def test_an_unwritable_directory_is_named(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    d = RunDir(str(tmp_path / "file" / "out"))
    with pytest.raises(RunDirError, match=rf"^output_dir \({d.url}\) is not writable: .* Choose another output_dir"):
        d.check_writable(host=0)
    RunDir(str(tmp_path / "fine")).check_writable(host=0)
    assert os.listdir(tmp_path / "fine") == []  # the probe is removed


# -- the lock ----------------------------------------------------------------------------------------------------


def holder(d: RunDir) -> dict:
    return json.loads(d.read_bytes(LOCK))


def plant_lock(d: RunDir, **fields) -> None:
    d.write_atomic(
        LOCK,
        json.dumps(
            {
                "attempt": "0ther000",
                "host": socket.gethostname(),
                "boot": processes.boot_id(),
                "pid": os.getpid(),
                "beat": 0,
                "time": time.time(),
                **fields,
            }
        ).encode(),
    )


def age_lock(d: RunDir, seconds: float) -> None:
    """Make the storage stamp ``.lock`` as written ``seconds`` ago."""
    if d.is_local:
        then = os.stat(d.path(LOCK)).st_mtime - seconds
        os.utime(d.path(LOCK), (then, then))
    else:
        entry = d.fs.store[d.path(LOCK)]
        entry.modified = entry.modified - datetime.timedelta(seconds=seconds)


class RemoteHolder:
    """A run on another machine holding the lock: it rewrites it every ``refresh_s``, bumping the beat, with its
    own clock ``skew_s`` off this machine's."""

    def __init__(self, d: RunDir, refresh_s: float, skew_s: float):
        self.d, self.refresh_s, self.skew_s = d, refresh_s, skew_s
        self.stop = threading.Event()
        self.beat = 0
        self.write()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def write(self) -> None:
        plant_lock(
            self.d, host="another-machine", boot="another-boot", pid=1, beat=self.beat, time=time.time() + self.skew_s
        )

    def run(self) -> None:
        while not self.stop.wait(self.refresh_s):
            self.beat += 1
            self.write()

    def freeze(self) -> None:
        self.stop.set()
        self.thread.join()


def test_a_held_lock_refuses_a_second_run_naming_the_holder_and_is_released_at_exit(run_dir):
    with run_dir.lock("00000001"):
        assert holder(run_dir)["attempt"] == "00000001" and holder(run_dir)["pid"] == os.getpid()
        with pytest.raises(RunDirError) as error, run_dir.lock("00000002"):
            pass
        assert holder(run_dir)["attempt"] == "00000001"
    assert str(error.value) == (
        f"output_dir ({run_dir.url}) is in use by run 00000001 (pid {os.getpid()} on {socket.gethostname()}, alive "
        f"on this machine). Wait for it, choose another output_dir, or delete {run_dir.url}/.lock if that run is gone."
    )
    assert not run_dir.exists(LOCK)
    with pytest.raises(ValueError, match="inside"), run_dir.lock("00000003"):
        raise ValueError("inside")
    assert not run_dir.exists(LOCK)


def test_a_live_process_on_this_machine_holds_its_lock_however_old_it_looks(run_dir):
    plant_lock(run_dir, time=time.time() - 86400)
    age_lock(run_dir, 86400)
    with pytest.raises(RunDirError, match="alive on this machine"), run_dir.lock("00000001", refresh_s=0.01):
        pass


def test_a_lock_of_a_dead_process_on_this_machine_is_taken_over(run_dir, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    plant_lock(run_dir, pid=dead.pid)
    with caplog.at_level(logging.WARNING), run_dir.lock("00000001"):
        assert holder(run_dir)["attempt"] == "00000001"
    assert (
        f"Taking over the stale lock of run 0ther000 in {run_dir.url}: its process {dead.pid} on this machine is gone"
    ) in caplog.text
    assert not run_dir.exists(LOCK)


def test_a_reused_pid_is_not_taken_for_the_holder(run_dir):
    plant_lock(run_dir, pid_start=1)  # this process's pid, but a process that started at another time
    with run_dir.lock("00000001"):
        assert holder(run_dir)["attempt"] == "00000001"


@pytest.mark.parametrize("skew_s", [-86400.0, 0.0, 86400.0])
def test_two_runs_whatever_their_clocks_the_second_is_refused_while_the_first_lives_then_resumes(
    run_dir, skew_s, monkeypatch
):
    """The holder on another machine, its clock a day off ours (and ours a day off the storage's): refused while
    its beat moves, taken over once it has been still for LOCK_STALE_BEATS refresh periods."""
    monkeypatch.setattr(time, "time", lambda real=time.time: real() - skew_s)  # the reader's clock is off too
    first = RemoteHolder(run_dir, refresh_s=0.05, skew_s=skew_s)
    try:
        for _ in range(3):
            refused = pytest.raises(
                RunDirError, match=r"in use by run 0ther000 \(pid 1 on another-machine, its beat is"
            )
            with refused, run_dir.lock("00000002", refresh_s=1.0):
                pass
            time.sleep(0.1)
    finally:
        first.freeze()
    assert holder(run_dir)["attempt"] == "0ther000"  # a refused run leaves the holder's lock alone
    age_lock(run_dir, LOCK_STALE_BEATS * 1.0 + 1)
    with run_dir.lock("00000002", refresh_s=1.0):
        assert holder(run_dir)["attempt"] == "00000002"
    assert not run_dir.exists(LOCK)


def test_without_storage_times_the_beat_is_watched_on_this_machines_clock(run_dir, monkeypatch, caplog):
    monkeypatch.setattr(runlock, "_storage_age", lambda run_dir, name: None)
    first = RemoteHolder(run_dir, refresh_s=0.02, skew_s=-86400.0)
    try:
        refused = pytest.raises(RunDirError, match="its beat moved while this run watched")
        with refused, run_dir.lock("00000002", refresh_s=0.1):
            pass
    finally:
        first.freeze()
    with caplog.at_level(logging.WARNING), run_dir.lock("00000002", refresh_s=0.02):
        assert holder(run_dir)["attempt"] == "00000002"
    assert f"its beat did not move for {LOCK_STALE_BEATS * 0.02:g}s" in caplog.text


def test_a_lock_that_is_not_a_file_is_refused(run_dir):
    run_dir.fs.makedirs(run_dir.path(LOCK), exist_ok=True)
    run_dir.fs.touch(run_dir.path(f"{LOCK}/inside"))
    refused = pytest.raises(
        RunDirError, match=r"\.lock is a directory, not a lock file: no run can hold it. Remove it"
    )
    with refused, run_dir.lock("00000001"):
        pass
    assert run_dir.fs.isdir(run_dir.path(LOCK))


def test_the_holder_bumps_its_beat_while_it_runs(run_dir):
    with run_dir.lock("00000001", refresh_s=0.02):
        deadline = time.monotonic() + 30
        while holder(run_dir)["beat"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert holder(run_dir)["beat"] >= 2
        assert holder(run_dir)["attempt"] == "00000001"
    assert not run_dir.exists(LOCK)


def test_no_lock_is_left_behind_by_a_rewrite_in_flight_at_exit(run_dir):
    for i in range(30):
        with run_dir.lock(f"{i:08x}", refresh_s=0.0005):
            time.sleep(0.002)
        assert not run_dir.exists(LOCK), f"attempt {i}: the lock came back after its release"


def test_a_lock_taken_over_by_another_run_is_left_to_it_and_fails_the_run(run_dir):
    failed = pytest.raises(RunDirError, match=r"Another run took over the lock of output_dir .* so both wrote there")
    with failed, run_dir.lock("00000001", refresh_s=0.01):
        plant_lock(run_dir)
        time.sleep(0.1)
    assert holder(run_dir)["attempt"] == "0ther000"


# -- outputs where the run says ------------------------------------------------------------------------------------


def test_an_output_dir_that_does_not_persist_or_is_empty_is_refused(tmp_path):
    with pytest.raises(RunDirError, match=r"output_dir \(memory://x/out\) is in this process's memory"):
        RunDir("memory://x/out").check_usable(host=0)
    with pytest.raises(RunDirError, match=r"output_dir is empty: the run would write into the working directory"):
        RunDir("").check_usable(host=0)


@pytest.mark.parametrize("name", ["merged.jsonl", "merged.parquet", "run.json", "summary.json", ".lock", "parts"])
def test_a_path_the_run_writes_taken_by_the_wrong_kind_of_thing_is_refused(tmp_path, name):
    d = RunDir(str(tmp_path / "out"))
    wrong = tmp_path / "out" / name
    wrong.parent.mkdir()
    if name == "parts":
        wrong.write_text("")
    else:
        wrong.mkdir()
    kinds = ("file", "directory") if name == "parts" else ("directory", "file")
    with pytest.raises(
        RunDirError, match=rf"/out/{re.escape(name)} is a {kinds[0]}, but this run writes a {kinds[1]}"
    ):
        d.check_usable(host=0)


def test_a_directory_named_like_a_part_is_refused(run_dir):
    write_parts(run_dir, "aaaaaaaa", (0, 39, 0, 0))
    run_dir.fs.makedirs(run_dir.path(f"parts/0000000040-0000000079.{FP}.aaaaaaaa.h0001b000000.jsonl"))
    run_dir.fs.touch(run_dir.path(f"parts/0000000040-0000000079.{FP}.aaaaaaaa.h0001b000000.jsonl/x"))
    with pytest.raises(RunDirError, match=r"h0001b000000.jsonl is named like a part but is a directory"):
        run_dir.list_parts()


def test_a_run_directory_deleted_or_replaced_mid_run_is_a_failure(run_dir):
    decision = run_dir.decide(FIELDS, resume=False, overwrite=False, attempt="aaaaaaaa")
    run_dir.record(FIELDS, decision)
    run_dir.check_still_ours("aaaaaaaa")
    run_dir.record(FIELDS, Decision("bbbbbbbb", ("bbbbbbbb",), replaces=True))
    with pytest.raises(
        RunDirError,
        match=r"was deleted or replaced while this run wrote it: its run.json no longer "
        r"lists attempt aaaaaaaa",
    ):
        run_dir.check_still_ours("aaaaaaaa")
    run_dir.fs.rm(run_dir.root, recursive=True)
    with pytest.raises(RunDirError, match="was deleted or replaced"):
        run_dir.check_still_ours("bbbbbbbb")


def test_a_bucket_without_credentials_is_one_line(tmp_path, monkeypatch):
    d = RunDir(str(tmp_path / "out"))

    def refused(*args, **kwargs):
        raise RuntimeError("Anonymous caller does not have storage.objects.create access\n" + "  at frame\n" * 56)

    monkeypatch.setattr(d.fs, "makedirs", refused)
    with pytest.raises(RunDirError) as error:
        d.check_usable(host=0)
    assert "\n" not in str(error.value)
    assert "is not writable: Anonymous caller does not have storage.objects.create access. Choose" in str(error.value)
