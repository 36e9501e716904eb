"""Replica groups (``hosts_per_replica``): the group arithmetic and its checks, the planner per replica, the
summary's per-replica counts, and the sampler on 4 emulated hosts x 4 devices as 2 replicas of 2 hosts and as one
replica of all 4 (a resume of the first), token for token the 1-host run's greedy output; both read the prompts
file per replica."""

import json
import shutil
from pathlib import Path

import pytest
from multihost import REPO, launch

from levanter_multihost.capacity import EngineLimits, ModelShape, PromptDemand, RunSpec, Topology, plan_capacity
from levanter_multihost.capacity.tpu import GIB, TPU_GENERATIONS
from levanter_multihost.checks import check_values
from levanter_multihost.config import parse_command_line
from levanter_multihost.errors import ConfigError
from levanter_multihost.plan_cli import main as plan_main
from levanter_multihost.replicas import Replicas
from levanter_multihost.resolution import resolve
from levanter_multihost.summary import HostMetrics, build_summary, format_summary

TINY_CONFIG = "config/sampler/tiny_local.yaml"
LLAMA70B_2X2 = "config/sampler/llama70b_v5p32_2x2.yaml"
PROMPTS = 16
"""The first prompts of the 1-host run's (``greedy_1x4``), so rows compare by global index."""
ACROSS_HOSTS = (
    "--trainer.model_axis_size=8",
    '--trainer.tensor_parallel_axes=["mlp"]',
    "--per_host_input_min_bytes=0",
)
"""The tiny model's MLP over 8 devices: with 4 per host, every replica's model spans 2 hosts (the tiny model's 4
heads do not split 8 ways). Each replica reads only its share of the prompts file (per-host input)."""


def test_groups_of_consecutive_hosts_led_by_their_first():
    replicas = Replicas.of(2, 4)
    assert (replicas.hosts_per_replica, replicas.num_replicas, replicas.mode) == (2, 2, "replica_groups")
    assert [replicas.replica_of(h) for h in range(4)] == [0, 0, 1, 1]
    assert [list(replicas.hosts_of(r)) for r in range(2)] == [[0, 1], [2, 3]]
    assert [replicas.leads_replica(h) for h in range(4)] == [True, False, True, False]
    every = Replicas.of(0, 4)  # 0 spells every host: the global mesh
    assert (every.hosts_per_replica, every.num_replicas, every.mode) == (4, 1, "global_mesh")
    assert Replicas.of(4, 4) == every
    assert Replicas.of(1, 3).mode == "host_data_parallel" and Replicas.of(0, 1).hosts_per_replica == 1


@pytest.mark.parametrize("value", [3, -1, 8])
def test_a_group_size_that_does_not_divide_the_hosts_is_one_line_naming_the_fix(value):
    with pytest.raises(ConfigError) as info:
        Replicas.of(value, 4)
    message = str(info.value)
    assert f"hosts_per_replica ({value})" in message and "4 host(s)" in message and "(1, 2, 4)" in message
    assert "\n" not in message


def test_model_axis_size_divides_the_replicas_devices():
    config = parse_command_line(["--config_path", str(REPO / TINY_CONFIG), "--hosts_per_replica=2"])
    check_values(config, 4, 4)  # model_axis_size 4 of a replica's 8 devices
    wide = parse_command_line(["--config_path", str(REPO / TINY_CONFIG), "--hosts_per_replica=2", ACROSS_HOSTS[0]])
    check_values(wide, 4, 4)
    with pytest.raises(ConfigError, match=r"hosts_per_replica \(2\) does not split the job's 1 host"):
        check_values(config, 1, 4)
    odd = parse_command_line(
        ["--config_path", str(REPO / TINY_CONFIG), "--hosts_per_replica=2", "--trainer.model_axis_size=3"]
    )
    with pytest.raises(
        ConfigError, match=r"model_axis_size \(3\) does not divide a replica's 8 devices \(2 hosts x 4\)"
    ):
        check_values(odd, 4, 4)


def test_the_sampler_and_the_planner_refuse_a_bad_group_size_before_the_model_loads(capsys, monkeypatch):
    """The sampler's resolve checks it first; the planner exits 2 with the same line."""
    monkeypatch.chdir(REPO)
    config = parse_command_line(["--config_path", TINY_CONFIG, "--hosts_per_replica=3"])
    with pytest.raises(ConfigError, match=r"hosts_per_replica \(3\) does not split the job's 4 host\(s\)"):
        resolve(config, 0, 4, 4)
    code = plan_main(["--config_path", TINY_CONFIG, "--num_hosts", "4", "--hosts_per_replica", "3"])
    out = capsys.readouterr().out
    assert code == 2 and "hosts_per_replica (3) does not split the job's 4 host(s)" in out
    assert len(out.strip().splitlines()) == 1


def test_the_planner_plans_one_engine_per_replica():
    """4 hosts in replicas of 2: two shares, two engines; a chip's weights halve against one host's 4 chips."""
    engine = EngineLimits(max_seq_len=64, page_size=8, max_pages=64, max_seqs=8, max_seqs_in_prefill=8)
    run = RunSpec(tuple(PromptDemand(8, 8) for _ in range(20)))
    v5p = TPU_GENERATIONS["v5p"]
    plan = plan_capacity(engine, run, Topology(4, 4, v5p, "v5p-32", hosts_per_replica=2))
    assert plan.prompts_per_host == [10, 10] and plan.batches_per_host == [2, 2]
    assert plan_capacity(engine, run, Topology(4, 4, v5p, hosts_per_replica=4)).prompts_per_host == [20]
    huge = ModelShape(
        weight_bytes=200 * GIB, weight_bytes_per_chip=100 * GIB, kv_bytes_per_token=1, kv_bytes_per_token_per_chip=1
    )
    problem = plan_capacity(engine, run, Topology(4, 4, v5p, hosts_per_replica=2), huge).problems[0]
    assert problem.field == "trainer.model_axis_size" and problem.suggested == 8
    assert "replica's 8 chips" in problem.message


def test_llama70b_on_v5p32_fits_as_2_replicas_of_2_hosts(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code = plan_main(["--config_path", LLAMA70B_2X2, "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["ok"], data["problems"]
    assert (data["num_hosts"], data["hosts_per_replica"], data["num_replicas"]) == (4, 2, 2)
    assert data["prompts_per_host"] == [128, 128] and data["batches_per_host"] == [1, 1]  # per replica
    hbm = data["hbm"]
    assert hbm["bytes_per_chip_needed"] <= hbm["bytes_per_chip"] and "on 8 chip(s)" in hbm["source"]
    # 70B in bfloat16 over 8 chips: ~17.6 GB of weights a chip
    assert 16 * GIB < hbm["weight_bytes_per_chip"] < 18 * GIB
    assert data["proposal"]["sequences"] == 128  # a replica's whole share in one batch
    code = plan_main(["--config_path", LLAMA70B_2X2])
    text = " ".join(capsys.readouterr().out.split())  # the report wraps its lines
    assert code == 0 and "2 replica(s) x 2 hosts x 4 chip(s) (8 chips per replica)" in text
    assert "batches per replica" in text and "HBM per replica (8 chips)" in text and "tok/s per replica" in text
    code = plan_main(["--config_path", LLAMA70B_2X2, "--trainer.model_axis_size", "4"])
    text = " ".join(capsys.readouterr().out.split())
    assert code == 0 and "each replica holds a whole copy of the weights on every host. Set it to 8" in text


def metrics(host: int, replica: int, writes: bool, rows: int) -> HostMetrics:
    return HostMetrics(
        host=host, started_at=0.0, phases={}, prompts=rows, rows=rows, rows_kept=0, sequences=rows,
        tokens=6 * rows, tokens_generated=6 * rows, batches=1, batch_stats=[], model_load_s=1.0,
        engine_build_s=0.0, compile_s=1.0, prefill_s=1.0, decode_s=1.0, generate_s=3.0,
        decode_tokens_per_s=6.0 * rows, pages_after_prefill=1, write_s=0.0, peak_rss_bytes=1,
        replica=replica, writes_rows=writes,
    )  # fmt: skip


def test_the_summary_counts_each_replicas_rows_once():
    hosts = [metrics(0, 0, True, 8), metrics(1, 0, False, 8), metrics(2, 1, True, 7), metrics(3, 1, False, 7)]
    result = build_summary(hosts, num_prompts=15, wall_clock_s=10.0, leader_wait_s=0.0)
    assert result["sample/total_sequences"] == 15 and result["sample/tokens_sampled"] == 90
    assert (result["sample/num_replicas"], result["sample/hosts_per_replica"]) == (2, 2)
    assert result["sample/inference_mode"] == "replica_groups" and result["sample/batches"] == 2
    assert (result["replica/0/rows"], result["replica/1/rows"]) == (8, 7)
    assert [result[f"host/{h}/replica"] for h in range(4)] == [0, 0, 1, 1]
    lines = format_summary(hosts, result).splitlines()
    assert lines[0].split()[:4] == ["host", "replica", "prompts", "rows"]
    assert [line.split()[:4] for line in lines[2:6]] == [
        ["0", "0", "8", "8"], ["1", "0", "8", "0"], ["2", "1", "7", "7"], ["3", "1", "7", "0"]
    ]  # fmt: skip
    assert lines[7].split()[:4] == ["all", "-", "15", "15"]


@pytest.fixture(scope="module")
def first_prompts(tmp_path_factory) -> Path:
    lines = (REPO / "config" / "prompts" / "addition_256.txt").read_text().splitlines()[:PROMPTS]
    path = tmp_path_factory.mktemp("prompts") / "first.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory, first_prompts):
    """2 replicas x 2 hosts: each replica's MLP over its 8 devices, 8 prompts each."""
    out = tmp_path_factory.mktemp("replicas_2x2")
    return launch(out, "--hosts_per_replica=2", *ACROSS_HOSTS, f"--prompts_file={first_prompts}", hosts=4)


@pytest.fixture(scope="module")
def global_resume(tmp_path_factory, first_prompts, two_by_two):
    """One replica of all 4 hosts (``hosts_per_replica: 0``), resuming a copy of the 2x2 run that lost replica 1's
    part: it keeps replica 0's rows and samples the 8 prompts replica 1 wrote."""
    out = tmp_path_factory.mktemp("replicas_global") / "run"
    shutil.copytree(two_by_two.output_dir, out)
    lost = two_by_two.parts(2)
    assert len(lost) == 1
    (out / "parts" / lost[0].name).unlink()
    flags = ("--hosts_per_replica=0", *ACROSS_HOSTS, f"--prompts_file={first_prompts}", "--resume=true")
    return launch(out, *flags, "--overwrite=false", hosts=4)


def token_ids(rows: list[dict]) -> dict[int, list[int]]:
    return {r["global_prompt_index"]: r["generated_token_ids"] for r in rows}


@pytest.mark.multihost
def test_two_replicas_of_two_hosts_sample_the_1_host_greedy_tokens(two_by_two, greedy_1x4):
    expected = {i: ids for i, ids in token_ids(greedy_1x4.rows()).items() if i < PROMPTS}
    assert token_ids(two_by_two.rows()) == expected
    # each replica's leader wrote its replica's rows; the other hosts sampled the same batches and wrote nothing
    assert two_by_two.parts(1) == [] and two_by_two.parts(3) == []
    assert [r["global_prompt_index"] for r in two_by_two.part_rows(0)] == list(range(8))
    assert [r["global_prompt_index"] for r in two_by_two.part_rows(2)] == list(range(8, 16))
    data = two_by_two.summary()
    result = data["summary"]
    assert result["sample/inference_mode"] == "replica_groups" and result["sample/num_replicas"] == 2
    assert (result["replica/0/rows"], result["replica/1/rows"], result["sample/total_sequences"]) == (8, 8, 16)
    hosts = {m["host"]: m for m in data["hosts"]}
    assert [hosts[h]["replica"] for h in range(4)] == [0, 0, 1, 1]
    assert [hosts[h]["writes_rows"] for h in range(4)] == [True, False, True, False]
    assert all(hosts[h]["batches"] == 1 and hosts[h]["sequences"] == 8 for h in range(4))  # every host sampled
    assert "Gloo" in two_by_two.output  # the replica's collectives crossed processes
    assert "replica 1: reads prompts 8-15 of 16 from the file (per-host input)" in two_by_two.output


@pytest.mark.multihost
def test_one_replica_of_every_host_resumes_what_two_replicas_left(global_resume, greedy_1x4):
    assert token_ids(global_resume.rows()) == {
        i: ids for i, ids in token_ids(greedy_1x4.rows()).items() if i < PROMPTS
    }
    result = global_resume.summary()["summary"]
    assert (result["sample/inference_mode"], result["sample/num_replicas"]) == ("global_mesh", 1)
    assert (result["replica/0/rows"], result["replica/0/rows_kept"], result["sample/rows_kept"]) == (16, 8, 8)
    # replica 0's part of the first attempt kept, the lost prompts in one part of the resume's, both by host 0
    parts = [p.name.split(".") for p in global_resume.parts()]
    assert [(name[0], name[3]) for name in parts] == [
        ("0000000000-0000000007", "h0000b000000"),
        ("0000000008-0000000015", "h0000b000000"),
    ]
    assert parts[0][2] != parts[1][2]  # two attempts
