"""End to end on emulated hosts: parts, the merged output, and outputs independent of host count, batch size and
how the model is sharded."""

import json

import pytest
from multihost import REPO, read_jsonl
from transformers import AutoTokenizer

from levanter_multihost.addition import accuracy, extract_answer
from levanter_multihost.capacity import EngineLimits, PromptDemand, forecast
from levanter_multihost.outputs import ROW_FIELDS
from levanter_multihost.sharding import contiguous_shard

pytestmark = pytest.mark.multihost

MAX_NEW_TOKENS = 6
NUM_PROMPTS = 256
PROMPTS = (REPO / "config" / "prompts" / "addition_256.txt").read_text().splitlines()


def tokens(rows):
    return [(r["global_prompt_index"], r["generation_index"], r["generated_token_ids"]) for r in rows]


def test_four_hosts_write_one_part_of_64_each_and_a_merged_file_in_order(greedy_4x4):
    for host in range(4):
        (part,) = greedy_4x4.parts(host)
        rows = read_jsonl(part)
        assert [r["global_prompt_index"] for r in rows] == contiguous_shard(NUM_PROMPTS, 4, host)
        assert {r["process_index"] for r in rows} == {host}
        assert part.name.startswith(f"{64 * host:010d}-{64 * host + 63:010d}.")
    merged = greedy_4x4.rows()
    assert [(r["global_prompt_index"], r["generation_index"]) for r in merged] == [(i, 0) for i in range(256)]
    assert [r["prompt"] for r in merged] == PROMPTS
    for r in merged:
        assert tuple(r) == ROW_FIELDS
        assert r["generated_token_count"] == MAX_NEW_TOKENS == len(r["generated_token_ids"])
        assert (r["finish_reason"], r["stop_reason"]) == ("length", None)


def test_merged_rows_equal_the_part_rows(greedy_4x4, greedy_2x4):
    for run in (greedy_4x4, greedy_2x4):
        assert sorted(run.part_rows(), key=lambda r: r["global_prompt_index"]) == run.rows()


def test_several_batches_per_host_each_made_durable_as_a_part(greedy_2x4):
    for host in (0, 1):
        parts = greedy_2x4.parts(host)
        assert len(parts) == 6  # 128 prompts in batches of at most 24 sequences
        sizes = [len(read_jsonl(p)) for p in parts]
        assert sum(sizes) == 128 and max(sizes) <= 24
        assert [int(p.name.split("b")[-1].split(".")[0]) for p in parts] == list(range(6))
    hosts = {h["host"]: h for h in greedy_2x4.summary()["hosts"]}
    assert [hosts[h]["batches"] for h in (0, 1)] == [6, 6]
    assert all(b["sequences"] <= 24 for h in hosts.values() for b in h["batch_stats"])


def test_greedy_outputs_do_not_depend_on_host_count_batch_size_or_sharding(greedy_4x4, greedy_2x4, greedy_1x4):
    """4 hosts in one batch each, 2 in batches of 24, 1 in batches of 100 with q/k/v, vocab and the KV cache whole."""
    assert tokens(greedy_4x4.rows()) == tokens(greedy_2x4.rows()) == tokens(greedy_1x4.rows())
    assert {r["process_index"] for r in greedy_2x4.rows()} == {0, 1}
    assert len(greedy_1x4.parts()) == 3


def test_an_fsspec_url_run_directory_works_end_to_end(greedy_2x4):
    assert "file://" in greedy_2x4.output and "Merged 256 rows into file://" in greedy_2x4.output
    assert json.loads((greedy_2x4.output_dir / "run.json").read_text())["fields"]["num_prompts"] == 256
    assert (greedy_2x4.output_dir / "summary.json").exists() and (greedy_2x4.output_dir / "timeline.png").exists()


def test_compilation_cache_is_filled_by_one_run_and_reused_by_the_next_on_every_host(
    shared_compile_cache, greedy_4x4, greedy_2x4
):
    entries = [p.name for p in shared_compile_cache.glob("*-cache")]
    for program in ("_run_prefill", "_run_generation_loop"):
        # an entry for each host of the 4x4 run (JAX alone writes from process 0 only), and more from other runs
        assert sum(program in n for n in entries) >= 4, entries
    lines = greedy_2x4.output.splitlines()
    for host in (0, 1):
        for program in ("jit__run_prefill", "jit__run_generation_loop"):
            hit = f"Persistent compilation cache hit for '{program}'"
            assert any(line.startswith(f"[host {host}]") and hit in line for line in lines), greedy_2x4.tail()


def test_tiny_model_answers_held_out_additions_on_four_hosts_as_on_one(greedy_4x4, greedy_1x4):
    four, one = greedy_4x4.rows(), greedy_1x4.rows()
    assert accuracy(four) >= 0.95
    assert [extract_answer(r["generated_text"]) for r in four] == [extract_answer(r["generated_text"]) for r in one]
    summary = greedy_4x4.summary()["summary"]
    assert summary["sample/task_accuracy"] == accuracy(four)
    assert "Task addition:" in greedy_4x4.output and "exact answers" in greedy_4x4.output


def test_the_planner_forecasts_what_the_engine_did_in_every_batch(greedy_4x4, greedy_2x4):
    """One admission wave, the pages after prefill and the decode rounds of every batch, as forecast in closed form."""
    limits = EngineLimits(
        max_seq_len=32,
        page_size=8,
        max_pages=1024,
        max_seqs=256,
        max_seqs_in_prefill=256,
        max_prefill_size=4096,
        max_queued_tokens=256,
        max_tokens_per_round=256,
        max_rounds=8,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(REPO / "assets" / "tiny-addition"))
    counts = [len(ids) for ids in tokenizer(PROMPTS, add_special_tokens=False)["input_ids"]]
    for run in (greedy_4x4, greedy_2x4):
        for host in run.summary()["hosts"]:
            rows = run.part_rows(host["host"])
            first = 0
            for batch in host["batch_stats"]:
                batch_rows = rows[first : first + batch["sequences"]]
                first += batch["sequences"]
                demands = [PromptDemand(counts[r["global_prompt_index"]], MAX_NEW_TOKENS) for r in batch_rows]
                expected = forecast(limits, demands)
                observed = (batch["waves"], batch["pages_after_prefill"], batch["outer_rounds"])
                assert observed == (1, expected.pages_after_prefill, expected.outer_rounds), (host["host"], batch)
                assert all(r["finish_reason"] == "length" for r in batch_rows)
