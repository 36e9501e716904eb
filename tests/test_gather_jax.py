"""Coordinator and Collector over JAX's real distributed key-value store: N processes on loopback, one per
emulated host (tests/gather_worker.py), each printing one RESULT line.

Only what the sampler's own runs cannot show: many chunked parts in order, a corrupted chunk, the largest shape.
A failed, killed, hung or killed leader host is shown where it matters most, by the sampler on emulated hosts
(test_faults.py, test_reliability.py), and in-process against a fake store (test_coordination.py).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from multihost import REPO, host_env

from levanter_multihost.launch_env import local_host_env

pytestmark = pytest.mark.multihost

WORKER = Path(__file__).resolve().parent / "gather_worker.py"
SILENT_HOST_S = 3.0
TIMEOUT_S = 240


@dataclass
class Hosts:
    returncodes: list[int]
    outputs: list[str]

    def result(self, host: int) -> dict:
        lines = [line for line in self.outputs[host].splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, f"host {host} printed {len(lines)} RESULT lines\n{self.log}"
        return json.loads(lines[0].split("RESULT ", 1)[1])

    @property
    def log(self) -> str:
        """Every host's exit status and output, for failure messages."""
        return "\n".join(
            f"--- host {h} (exit {rc}):\n{out[-6000:]}"
            for h, (rc, out) in enumerate(zip(self.returncodes, self.outputs, strict=True))
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_hosts(mode: str, hosts: int, tmp_path: Path) -> Hosts:
    """Start ``hosts`` worker processes forming one JAX job on a free loopback port; wait for all of them."""
    port = free_port()
    logs = [tmp_path / f"host{h}.log" for h in range(hosts)]
    procs = []
    for h in range(hosts):
        env = local_host_env(host_env(), port, hosts, h, devices_per_host=1)
        with open(logs[h], "wb") as log:
            command = [sys.executable, str(WORKER), mode, str(tmp_path / "out"), str(SILENT_HOST_S)]
            procs.append(
                subprocess.Popen(
                    command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    deadline = time.monotonic() + TIMEOUT_S
    timed_out = False
    try:
        for proc in procs:
            proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    run = Hosts([p.returncode for p in procs], [log.read_text(errors="replace") for log in logs])
    assert not timed_out, f"{mode}: hosts still running after {TIMEOUT_S}s\n{run.log}"
    return run


def test_many_parts_of_many_chunks_arrive_exactly_and_in_order(tmp_path):
    run = run_hosts("parts", 3, tmp_path)
    assert run.returncodes == [0, 0, 0], run.log
    leader = run.result(0)
    assert leader["exact"], run.log
    assert leader["parts"] == {"1": 6, "2": 6}, run.log
    for h in ("1", "2"):
        assert leader["bytes"][h] == leader["ends"][h]["metrics"]["bytes_sent"] > 6 * 30 * 1000  # >= 30 chunks each
        assert leader["ends"][h] == {"status": "ok", "parts": 6, "metrics": leader["ends"][h]["metrics"]}
    assert leader["left"] == [], run.log  # every manifest and chunk deleted once read
    assert run.result(1) == run.result(2) == {"message": {"ok": True}}


def test_a_corrupted_chunk_is_named_by_host_and_chunk_and_the_failure_reaches_the_sender(tmp_path):
    run = run_hosts("corrupt", 2, tmp_path)
    assert run.returncodes == [0, 0], run.log
    error = run.result(0)["error"]
    assert re.fullmatch(r"Host 1 chunk 2/\d+: checksum mismatch \(corrupted\)\.", error or ""), run.log
    assert run.result(1)["error"] == f"The leader (host 0) failed: PayloadError: {error}", run.log


def test_the_largest_shape_is_carried_merged_and_verified(tmp_path):
    """The seed's largest shape: 1024 prompts x 2048 tokens over 4 hosts, two parts each; the leader's own parts
    go straight to its spool, the other six through the store in 4 MiB chunks, and merged.jsonl is checked byte
    for byte against the rows as the hosts wrote them."""
    run = run_hosts("largest", 4, tmp_path)
    assert run.returncodes == [0, 0, 0, 0], run.log
    leader = run.result(0)
    assert leader["exact"] and leader["rows"] == 1024, run.log
    assert leader["samples"] == [0, 1]
    assert leader["headers"] == [[h, b, 128] for h in (1, 2, 3) for b in (0, 1)]
    assert leader["bytes"] > 3 * 2 * 1024 * 1024  # ~3 MB of compressed rows from each of hosts 1-3
