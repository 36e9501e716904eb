"""Coordination over the in-process key-value store, with hosts as threads: parts drained in order and their keys
deleted, slow hosts waited for, silent and failed hosts named, and the leader's announcements (or its silence)
reaching the hosts that wait for them. The same over JAX's real store is in test_gather_jax.py."""

import json
import re
import threading
import time

import pytest

from levanter_multihost.collector import Collector
from levanter_multihost.coordination import (
    DONE,
    PREFIX,
    READY,
    CoordinationError,
    Coordinator,
    HostsDisagree,
    connect,
)
from levanter_multihost.kvstore import InMemoryKeyValue
from levanter_multihost.leader import Spool
from levanter_multihost.outputs import MergeError
from levanter_multihost.payload import PayloadError
from levanter_multihost.runplan import Timeouts

SILENT_S = 1.0
TIMEOUTS = Timeouts(heartbeat_interval_s=0.02, silent_host_s=SILENT_S)


def coordinator(kv: InMemoryKeyValue, host: int, num_hosts: int) -> Coordinator:
    return Coordinator(kv, host, num_hosts, chunk_bytes=64, timeouts=TIMEOUTS)


def part_data(host: int, batch: int) -> bytes:
    """A part's bytes, several 64-byte chunks once compressed (the transport does not look inside)."""
    return b"".join(f"{host} {batch} {i} {i * 7919 % 10007}\n".encode() for i in range(40))


def in_thread(target, *args) -> tuple[threading.Thread, list]:
    """Run ``target`` on a thread; the list gets what it raised."""
    raised: list[Exception] = []

    def run():
        try:
            target(*args)
        except Exception as e:  # noqa: BLE001 - the test asserts on what it raised
            raised.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, raised


def collect(kv: InMemoryKeyValue, num_hosts: int) -> tuple[Collector, list[tuple[int, dict, bytes]]]:
    received: list[tuple[int, dict, bytes]] = []
    leader = coordinator(kv, 0, num_hosts)
    return Collector(leader, lambda host, header, data: received.append((host, header, data))).start(), received


def sender(kv: InMemoryKeyValue, num_hosts: int, parts: int, delay_s: float = 0.0, end: bool = True):
    """A host that beats, sends ``parts`` parts (``delay_s`` before each), then its end message (or goes silent)."""

    def host(h: int) -> None:
        c = coordinator(kv, h, num_hosts)
        beat = c.start_heartbeat()
        try:
            for b in range(parts):
                time.sleep(delay_s)
                c.send_part({"kind": "batch", "batch": b}, part_data(h, b))
            if end:
                c.send_end({"host": h, "bytes_sent": c.bytes_sent})
        finally:
            beat.set()

    return host


# -- the leader's collector --------------------------------------------------------------------------------------


def test_parts_of_several_hosts_arrive_whole_and_in_order_and_their_keys_are_deleted():
    kv = InMemoryKeyValue()
    collector, received = collect(kv, 4)
    threads = [in_thread(sender(kv, 4, parts=5, delay_s=0.01), h) for h in (1, 2, 3)]
    arrivals = collector.finish()
    for thread, raised in threads:
        thread.join()
        assert raised == []
    for h in (1, 2, 3):
        mine = [(header, data) for host, header, data in received if host == h]
        assert mine == [({"kind": "batch", "batch": b}, part_data(h, b)) for b in range(5)]
        end = arrivals[h].end
        assert end["status"] == "ok" and end["parts"] == 5 and end["metrics"]["host"] == h
        assert arrivals[h].parts == 5 and arrivals[h].ended_at is not None
        assert arrivals[h].bytes == end["metrics"]["bytes_sent"] > 5 * 2 * 64  # several chunks a part
    assert sorted(arrivals) == [1, 2, 3]
    left = {key.split("/", 2)[2] for key in kv.store if key.startswith(f"{PREFIX}/host")}
    assert left == {"heartbeat", "end"}  # every chunk and manifest deleted once read


def test_a_slow_host_with_a_heartbeat_is_waited_for():
    kv = InMemoryKeyValue()
    collector, received = collect(kv, 3)
    in_thread(sender(kv, 3, parts=1), 1)
    in_thread(sender(kv, 3, parts=2, delay_s=0.75 * SILENT_S), 2)  # 1.5 x silent_host_s before its end
    arrivals = collector.finish()
    assert [host for host, _, _ in received].count(2) == 2
    assert arrivals[2].end["status"] == "ok" and collector.silent == []


def test_a_host_whose_heartbeat_stops_is_named_after_silent_host_s():
    kv = InMemoryKeyValue()
    collector, received = collect(kv, 3)
    in_thread(sender(kv, 3, parts=2), 1)
    thread, _ = in_thread(sender(kv, 3, parts=1, end=False), 2)  # one part, then no end and no heartbeat
    thread.join()
    stopped = time.monotonic()
    with pytest.raises(CoordinationError) as error:
        collector.finish()
    assert time.monotonic() - stopped >= SILENT_S - 0.25  # its last beat came at most a little before it stopped
    assert str(error.value) == (
        "Gather incomplete: host(s) [2] went silent (no heartbeat for silent_host_s=1s: dead or hung). No merged "
        "output was written."
    )
    assert [(host, header["batch"]) for host, header, _ in received if host == 2] == [(2, 0)]
    assert collector.arrivals[1].end["status"] == "ok"


def test_a_failed_host_is_named_with_its_error_and_a_host_never_heard_from_as_silent():
    kv = InMemoryKeyValue()
    collector, _ = collect(kv, 4)
    in_thread(sender(kv, 4, parts=1), 1)

    def failing(h: int) -> None:
        c = coordinator(kv, h, 4)
        with c.failures_reported():
            c.send_part({"kind": "batch", "batch": 0}, part_data(h, 0))
            raise ValueError("engine exploded on batch 1")

    thread, raised = in_thread(failing, 2)
    with pytest.raises(CoordinationError) as error:
        collector.finish()
    thread.join()
    assert [type(e) for e in raised] == [ValueError]  # reported, then raised as it was
    assert str(error.value) == (
        "Gather incomplete: host 2 failed: ValueError: engine exploded on batch 1; host(s) [3] went silent (no "
        "heartbeat for silent_host_s=1s: dead or hung). No merged output was written."
    )
    assert collector.arrivals[2].end == {
        "status": "failed",
        "parts": 1,
        "error": "ValueError: engine exploded on batch 1",
    }


def test_a_corrupted_chunk_is_named_by_host_and_chunk():
    kv = InMemoryKeyValue()
    host = coordinator(kv, 1, 2)
    host.send_part({"kind": "batch", "batch": 0}, part_data(1, 0))
    key = f"{PREFIX}/host00001/part000000/chunk000001"
    kv.store[key] = kv.store[key][:-1] + bytes([kv.store[key][-1] ^ 0xFF])
    chunks = json.loads(kv.store[f"{PREFIX}/host00001/part000000/manifest"])["num_chunks"]
    host.send_end({})
    collector, received = collect(kv, 2)
    with pytest.raises(PayloadError, match=rf"^Host 1 chunk 1/{chunks}: checksum mismatch \(corrupted\)\.$"):
        collector.finish()
    assert received == []


def test_a_bad_part_stops_the_collector_naming_its_host_and_batch():
    kv = InMemoryKeyValue()
    host = coordinator(kv, 1, 2)
    host.send_part({"kind": "batch", "batch": 4}, b'{"not": "a row"}\n')
    spool = Spool()
    try:
        collector = Collector(coordinator(kv, 0, 2), spool.add).start()
        with pytest.raises(MergeError, match=r"^host 1's batch 4 line 1: .* is not a row"):
            collector.finish()
    finally:
        spool.close()


# -- announcements -----------------------------------------------------------------------------------------------


def test_a_host_waits_for_the_leaders_announcement_while_the_leader_beats():
    kv = InMemoryKeyValue()
    leader = coordinator(kv, 0, 2)
    beat = leader.start_heartbeat()
    timer = threading.Timer(
        1.5 * SILENT_S, leader.announce, (READY, {"attempt": "0000000a", "attempts": ["0000000a"]})
    )
    timer.start()
    try:
        assert coordinator(kv, 1, 2).wait_for(READY) == {"ok": True, "attempt": "0000000a", "attempts": ["0000000a"]}
    finally:
        timer.join()
        beat.set()


def test_a_leaders_failure_reaches_a_host_waiting_for_either_announcement():
    kv = InMemoryKeyValue()
    leader = coordinator(kv, 0, 2)
    leader.announce(READY, {"attempt": "0000000a"})
    with pytest.raises(RuntimeError, match="merge failed"), leader.failures_reported():
        raise RuntimeError("merge failed")
    host = coordinator(kv, 1, 2)
    assert host.wait_for(READY)["attempt"] == "0000000a"  # announced before the failure
    with pytest.raises(CoordinationError, match=r"^The leader \(host 0\) failed: RuntimeError: merge failed$"):
        host.wait_for(DONE)


@pytest.mark.parametrize("name", [READY, DONE])
def test_a_silent_leader_is_named_by_a_host_waiting_for_it(name):
    kv = InMemoryKeyValue()
    coordinator(kv, 0, 2).start_heartbeat().set()  # one beat, then nothing
    start = time.monotonic()
    with pytest.raises(CoordinationError) as error:
        coordinator(kv, 1, 2).wait_for(name)
    assert time.monotonic() - start >= SILENT_S
    expected = (
        rf"^The leader \(host 0\) went silent while this host waited for '{name}' \(no heartbeat for \d+s > "
        r"silent_host_s 1s\): it died or hung\. .*rerun with resume: true\.$"
    )
    assert re.match(expected, str(error.value)), str(error.value)


def test_a_store_that_goes_away_is_named_as_the_leader_gone():
    class Unreachable(InMemoryKeyValue):
        """The store as a host sees it once the leader's process, which serves it, is gone."""

        def key_value_try_get_bytes(self, key: str) -> bytes:
            raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")

    with pytest.raises(CoordinationError, match=r"leader \(host 0\)"):
        coordinator(Unreachable(), 1, 2).wait_for(DONE)


def test_the_heartbeat_moves_until_it_is_stopped():
    kv = InMemoryKeyValue()
    key = f"{PREFIX}/host00003/heartbeat"
    beat = coordinator(kv, 3, 4).start_heartbeat()
    first = kv.store.get(key)
    deadline = time.monotonic() + 10
    while kv.store.get(key) in (None, first) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert int(kv.store[key]) > int(first or b"0")
    beat.set()
    time.sleep(3 * TIMEOUTS.heartbeat_interval_s)
    stopped = kv.store[key]
    time.sleep(3 * TIMEOUTS.heartbeat_interval_s)
    assert kv.store[key] == stopped


def test_one_process_gets_an_in_memory_store_and_several_need_jax_distributed():
    assert isinstance(connect(None, 0, 1, 64, TIMEOUTS).client, InMemoryKeyValue)
    with pytest.raises(RuntimeError, match="jax.distributed is not initialized but there are several hosts"):
        connect(None, 0, 2, 64, TIMEOUTS)


# -- every host samples the same run -----------------------------------------------------------------------------

RUN = {"model": "assets/tiny-addition", "prompts_sha256": "a" * 64, "num_prompts": 256, "seed": 0}


def test_hosts_that_resolved_the_same_run_agree():
    kv = InMemoryKeyValue()
    for h in (1, 2):
        coordinator(kv, h, 3).agree(dict(RUN))
    coordinator(kv, 0, 3).agree(dict(RUN))


def test_a_host_with_other_prompts_is_refused_naming_it_and_the_fields_before_anything_is_decided():
    kv = InMemoryKeyValue()
    coordinator(kv, 1, 3).agree(dict(RUN))
    coordinator(kv, 2, 3).agree({**RUN, "prompts_sha256": "b" * 64, "num_prompts": 8})
    with pytest.raises(HostsDisagree) as error:
        coordinator(kv, 0, 3).agree(dict(RUN))
    assert str(error.value) == (
        f"The hosts resolved different runs: host 2 differs in num_prompts (8 vs the leader's 256), prompts_sha256 "
        f'("{"b" * 36}... vs the leader\'s "{"a" * 36}...). Give every host the same prompts, model and config (a '
        "stale local copy on one worker?). Nothing was sampled or merged."
    )
    assert not any(key.startswith(f"{PREFIX}/{READY}") for key in kv.store)


def test_a_host_that_fails_or_goes_silent_before_its_fingerprint_is_named():
    kv = InMemoryKeyValue()
    coordinator(kv, 1, 3).send_failure("PromptError: prompts_file not found")
    with pytest.raises(CoordinationError, match="host 1 failed: PromptError: prompts_file not found"):
        coordinator(kv, 0, 3).agree(dict(RUN))
    kv = InMemoryKeyValue()
    coordinator(kv, 1, 2).client.key_value_set_bytes(f"{PREFIX}/host00001/heartbeat", b"1")
    with pytest.raises(CoordinationError, match=r"host 1 went silent before it sent its run fingerprint"):
        coordinator(kv, 0, 2).agree(dict(RUN))


def test_a_host_that_was_frozen_says_so_instead_of_only_blaming_the_leader():
    kv = InMemoryKeyValue()
    leader, host = coordinator(kv, 0, 2), coordinator(kv, 1, 2)
    assert not host._woke(0.5)  # a late wake-up is not a freeze
    assert host._woke(25.0)
    leader.announce_failure("Gather incomplete: host(s) [1] went silent")
    with pytest.raises(CoordinationError) as error:
        host.wait_for(DONE)
    assert str(error.value) == (
        "The leader (host 0) failed: Gather incomplete: host(s) [1] went silent This host itself was frozen (stopped "
        f"or starved) for 25s, and silent_host_s is {SILENT_S:g}s: the other hosts may have given up on it first."
    )
