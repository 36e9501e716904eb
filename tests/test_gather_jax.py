"""The gather through the real JAX distributed key-value store, with three processes on loopback."""

import json
import subprocess
import sys

import pytest
from multihost import REPO, host_env

pytestmark = pytest.mark.multihost


def run_gather(mode: str, hosts: int = 3) -> dict:
    command = [sys.executable, "infra/launch.py", "--local_hosts", str(hosts), "--devices_per_host", "1", "--",
               sys.executable, "tests/gather_worker.py", mode]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=host_env(), capture_output=True, text=True, timeout=180)
    lines = [line for line in proc.stdout.splitlines() if "RESULT " in line]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    return json.loads(lines[0].split("RESULT ", 1)[1])


def test_many_chunk_payloads_arrive_exactly():
    result = run_gather("ok")
    assert result["ok"], result
    assert result["hosts"] == [0, 1, 2]
    for host in range(3):
        rows = result["rows"][str(host)]
        assert [r["global_prompt_index"] for r in rows] == [host * 1000 + i for i in range(40)]
        assert rows[7]["generated_token_ids"] == list(range(7, 307))
        assert result["headers"][str(host)] == {"metrics": {"host": host}}
        assert result["chunks"][str(host)] > 2 * 1000  # several 1000-byte chunks


def test_corrupted_chunk_is_named():
    result = run_gather("corrupt")
    assert not result["ok"]
    assert "Host 1 chunk 2/" in result["error"] and "checksum mismatch" in result["error"]


def test_silent_host_is_named_after_the_timeout():
    result = run_gather("silent")
    assert not result["ok"]
    assert "host(s) [2] sent no rows and no heartbeat for gather_timeout_s=3s" in result["error"]


def test_largest_shape_is_carried_and_verified():
    """The seed's largest shape: 1024 prompts x 2048 tokens over 4 hosts, the leader's own shard kept, the other
    three carried, merged line by line and every row checked."""
    result = run_gather("largest", hosts=4)
    assert result == {"rows": 1024, "exact": True, "headers": True, "bytes": result["bytes"]}
    assert result["bytes"] > 3 * 2 * 1024 * 1024  # ~3 MB of compressed shard from each of hosts 1-3
