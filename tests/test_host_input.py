"""Per-host input: each host reads and tokenizes only its share of a large prompts file, and the job's prompts are the
ones every host reading the whole file would have had, whatever the host count. Resolved without a model."""

import json

import draccus
import numpy as np
import pytest
from conftest import FEATURE_FLAGS, FEATURE_ROWS
from multihost import TINY_CONFIG

from levanter_multihost import host_input
from levanter_multihost.config import SampleLmMultihostConfig
from levanter_multihost.host_input import HostInput, scan
from levanter_multihost.host_work import earlier_rows, host_prompts, keep_earlier_rows, work_items
from levanter_multihost.prompts import PromptError
from levanter_multihost.resolution import resolve
from levanter_multihost.rundir import fingerprint_hash
from levanter_multihost.sharding import cost_ranges

COLUMNS = ("max_new_tokens", "temperature", "n_generations", "top_k", "top_p", "min_p", "seed")


def plan(tmp_path, rows_file, *args: str, num_hosts: int = 1, host: int = 0):
    flags = [f for f in FEATURE_FLAGS if not f.startswith("--trainer.model_axis_size")]
    # a directory is a dataset saved with save_to_disk
    source = (
        [f"--prompts_dataset={rows_file}", "--prompts_file=null"]
        if rows_file.is_dir()
        else [f"--prompts_file={rows_file}"]
    )
    config = draccus.parse(
        SampleLmMultihostConfig,
        config_path=str(TINY_CONFIG),
        args=[f"--output_dir={tmp_path / 'out'}", *source, *flags, *args],
    )
    return resolve(config, host=host, num_hosts=num_hosts, local_devices=4)


@pytest.fixture
def rows_file(tmp_path):
    """FEATURE_ROWS (text and chat rows, carried columns, every override) three times over: 30 lines."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in FEATURE_ROWS * 3))
    return path


@pytest.fixture
def tables(tmp_path):
    """The 30 rows of ``rows_file`` as a Parquet file in row groups of 7 and as a dataset saved with save_to_disk."""
    import datasets
    import pandas as pd

    frame = pd.DataFrame(FEATURE_ROWS * 3)
    frame.to_parquet(tmp_path / "rows.parquet", row_group_size=7)
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "rows_dataset"))
    return {"parquet": tmp_path / "rows.parquet", "dataset": tmp_path / "rows_dataset"}


def test_the_scan_finds_every_line_and_hashes_the_bytes_in_any_chunk_size(tmp_path, monkeypatch):
    path = tmp_path / "p.txt"
    data = b"1+1=\n22+2=\r\n\xc3\xa9+3=\n4+4="  # a CRLF line, a two-byte character, no final newline
    path.write_bytes(data)
    whole = scan(str(path))
    assert whole.offsets.tolist() == [0, 5, 12, 18, 22]
    assert whole.row_bytes.tolist() == [5, 7, 6, 4]
    monkeypatch.setattr(host_input, "SCAN_CHUNK_BYTES", 3)
    assert scan(str(path)).offsets.tolist() == whole.offsets.tolist()
    assert scan(str(path)).sha256 == whole.sha256
    path.write_bytes(data.replace(b"22+2", b"22+3"))
    assert scan(str(path)).sha256 != whole.sha256


@pytest.mark.parametrize("num_hosts", [1, 2, 3, 4, 7])
def test_cost_ranges_cover_every_prompt_once_in_order_within_half_a_prompt_of_an_equal_part(num_hosts):
    rng = np.random.default_rng(num_hosts)
    costs = rng.integers(0, 500, size=1000)
    ranges = cost_ranges(costs, num_hosts)
    assert [i for r in ranges for i in r] == list(range(1000))
    part = costs.sum() / num_hosts
    for h in range(num_hosts):
        boundary = costs.sum() * (h + 1) / num_hosts  # host h's part ends here; its load ends within half a prompt
        assert abs(costs[: ranges[h].stop].sum() - boundary) <= costs.max() / 2 + 1e-9
    assert max(costs[r.start : r.stop].sum() for r in ranges) <= part + costs.max()
    assert cost_ranges(np.zeros(10), 4) == [range(2), range(2, 5), range(5, 7), range(7, 10)]


def shares(tmp_path, rows_file, num_hosts: int, earlier=frozenset(), *args: str):
    """Every host's prompts, as each host of ``num_hosts`` reads them (per-host input from the first byte on)."""
    out = []
    for host in range(num_hosts):
        source = plan(tmp_path, rows_file, "--per_host_input_min_bytes=0", *args, num_hosts=num_hosts, host=host)
        assert isinstance(source.prompts, HostInput)
        out.append(host_prompts(source.prompts, host, num_hosts, source.shard_strategy, set(earlier)))
    return out


@pytest.mark.parametrize("strategy", ["contiguous", "balanced"])
def test_every_host_count_reads_the_prompts_and_work_of_the_whole_file(tmp_path, rows_file, strategy):
    """The prompts a job's hosts read, put together, are the ones one host reading the whole file has: texts,
    tokens, every per-prompt value and carried column; and each prompt is sampled once, with the same work item
    (its tokens, generations, seed: the row it becomes)."""
    whole = plan(tmp_path, rows_file, f"--shard_strategy={strategy}")
    assert whole.prompts.first == 0 and not isinstance(whole.prompts, HostInput)
    expected = work_items(whole.prompts, list(range(len(whole.prompts))), set())
    for num_hosts in (1, 2, 3, 4):
        per_host = shares(tmp_path, rows_file, num_hosts, set(), f"--shard_strategy={strategy}")
        assert [p for _, share, _ in per_host for p in share] == list(range(30))
        assert all(share == sampled for _, share, sampled in per_host)
        assert [t for prompts, _, _ in per_host for t in prompts.texts] == whole.prompts.texts
        flat = np.concatenate([prompts.tokens.flat for prompts, _, _ in per_host])
        assert flat.tolist() == whole.prompts.tokens.flat.tolist()
        for column in COLUMNS:
            got = np.concatenate([getattr(prompts, column) for prompts, _, _ in per_host])
            assert got.tolist() == getattr(whole.prompts, column).tolist(), column
        assert [e for prompts, _, _ in per_host for e in prompts.extra_json] == whole.prompts.extra_json
        items = [item for prompts, share, sampled in per_host for item in work_items(prompts, sampled, set())]
        assert items == expected


@pytest.mark.parametrize("kind", ["parquet", "dataset"])
def test_a_parquet_file_or_saved_dataset_read_per_host_holds_the_prompts_read_whole(tmp_path, tables, kind):
    """Each host reads only the Parquet row groups (or the memory-mapped dataset rows) of its share; put together
    they are the prompts, tokens, per-prompt values, carried columns and work of the input read whole, and the
    leader's pass reads every row's n_generations from that column alone."""
    path = tables[kind]
    whole = plan(tmp_path, path, "--shard_strategy=balanced")
    assert not isinstance(whole.prompts, HostInput) and len(whole.prompts) == 30
    expected = work_items(whole.prompts, list(range(30)), set())
    for num_hosts in (1, 3, 4):
        per_host = shares(tmp_path, path, num_hosts, set(), "--shard_strategy=balanced")
        assert [p for _, share, _ in per_host for p in share] == list(range(30))
        if num_hosts == 4:  # cut by cost, not count
            assert [share for _, share, _ in per_host] != cost_ranges(np.ones(30), 4)
        assert [t for prompts, _, _ in per_host for t in prompts.texts] == whole.prompts.texts
        flat = np.concatenate([prompts.tokens.flat for prompts, _, _ in per_host])
        assert flat.tolist() == whole.prompts.tokens.flat.tolist()
        for column in COLUMNS:
            got = np.concatenate([getattr(prompts, column) for prompts, _, _ in per_host])
            assert got.tolist() == getattr(whole.prompts, column).tolist(), column
        assert [e for prompts, _, _ in per_host for e in prompts.extra_json] == whole.prompts.extra_json
        assert [i for prompts, _, sampled in per_host for i in work_items(prompts, sampled, set())] == expected
    source = plan(tmp_path, path, "--per_host_input_min_bytes=0").prompts
    assert source.n_generations.tolist() == whole.prompts.n_generations.tolist()
    chat_rows = [i for i, row in enumerate(FEATURE_ROWS * 3) if row.get("messages")]
    assert chat_rows and all(source.index.row_bytes[i] > 1 for i in chat_rows)  # a chat's contents counted


def test_a_parquet_row_names_its_row_and_a_changed_table_its_fingerprint(tmp_path, tables):
    import pandas as pd

    frame = pd.DataFrame(FEATURE_ROWS * 3)
    frame.loc[25, "max_new_tokens"] = -1
    bad = tmp_path / "bad.parquet"
    frame.to_parquet(bad, row_group_size=7)
    source = plan(tmp_path, bad, "--per_host_input_min_bytes=0", num_hosts=4, host=3).prompts
    with pytest.raises(PromptError, match=r"bad.parquet row 25: `max_new_tokens` is -1"):
        source.read_share(source.share(3, 4, set()))
    first = plan(tmp_path, tables["parquet"], "--per_host_input_min_bytes=0").fingerprint["prompts_sha256"]
    assert plan(tmp_path, bad, "--per_host_input_min_bytes=0").fingerprint["prompts_sha256"] != first
    for kind in ("parquet", "dataset"):  # under the threshold: read whole, as before
        assert not isinstance(plan(tmp_path, tables[kind]).prompts, HostInput)


def test_the_leader_reads_every_rows_n_generations_and_the_job_its_prompt_count(tmp_path, rows_file):
    whole = plan(tmp_path, rows_file)
    per_host = plan(tmp_path, rows_file, "--per_host_input_min_bytes=0")
    assert len(per_host.prompts) == len(whole.prompts) == 30
    assert per_host.prompts.n_generations.tolist() == whole.prompts.n_generations.tolist()
    assert per_host.fingerprint["num_prompts"] == 30


def test_a_resume_spreads_the_missing_work_over_every_host(tmp_path, rows_file):
    """Prompts 0-19 kept; the 10 left go to every host, and the rows kept are verified by the host holding them."""
    earlier = {
        (p, g) for p in range(20) for g in range(2 if FEATURE_ROWS[p % 10].get("n_generations") is None else 3)
    }
    per_host = shares(tmp_path, rows_file, 4, earlier, "--shard_strategy=contiguous")
    assert [p for _, share, _ in per_host for p in share] == list(range(30))
    sampled = [[i.global_index for i in work_items(prompts, s, earlier)] for prompts, _, s in per_host]
    assert sorted(p for s in sampled for p in s) == list(range(20, 30))
    assert all(s for s in sampled)  # every host samples part of what is missing


def test_two_hosts_given_different_files_have_different_fingerprints(tmp_path, rows_file):
    """The leader compares fingerprints: a file that differs in one byte is caught without anyone reading it
    whole; the same bytes elsewhere are the same run."""
    first = plan(tmp_path, rows_file, "--per_host_input_min_bytes=0").fingerprint
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(rows_file.read_bytes())
    assert plan(tmp_path, copy, "--per_host_input_min_bytes=0").fingerprint == first
    copy.write_bytes(rows_file.read_bytes().replace(b"12+30=", b"12+31="))
    assert (
        plan(tmp_path, copy, "--per_host_input_min_bytes=0").fingerprint["prompts_sha256"]
        != (first["prompts_sha256"])
    )


def test_a_bad_row_fails_the_host_that_reads_it_naming_its_line_in_the_file(tmp_path, rows_file):
    lines = rows_file.read_text().splitlines()
    lines[25] = '{"prompt": "1+1=", "max_new_tokens": -1}'
    rows_file.write_text("\n".join(lines) + "\n")
    failed = []
    for host in range(4):
        source = plan(tmp_path, rows_file, "--per_host_input_min_bytes=0", num_hosts=4, host=host).prompts
        share = source.share(host, 4, set())
        try:
            source.read_share(share)
        except PromptError as e:
            assert 25 in share and str(e).endswith(
                "rows.jsonl line 26: `max_new_tokens` is -1; it must be a positive integer <= 2**31 - 1."
            )
            failed.append(host)
    assert failed == [3]


def test_small_files_and_inline_prompts_are_read_whole_as_before(tmp_path, rows_file):
    assert not isinstance(plan(tmp_path, rows_file).prompts, HostInput)  # 30 lines: under the default size
    inline = plan(tmp_path, rows_file, "--per_host_input_min_bytes=0", '--prompts=["1+2="]')
    assert not isinstance(inline.prompts, HostInput)
    assert not isinstance(plan(tmp_path, rows_file, "--per_host_input_min_bytes=null").prompts, HostInput)


@pytest.mark.multihost
def test_the_feature_run_on_three_hosts_read_its_jsonl_per_host_and_resumes_from_its_rows(
    features_3, eos_checkpoint, feature_inputs
):
    """The 3-host feature run reads its JSONL per host (its rows equal the 1-host dataset run's, test_features).
    Resumed on 2 hosts, each host verifies and keeps exactly the rows of its share, and nothing is left to sample."""
    for host in range(3):
        assert f"replica {host}: reads prompts" in features_3.output  # each host its own replica
    args = [
        f"--hf_checkpoint={eos_checkpoint}",
        f"--prompts_file={feature_inputs / 'rows.jsonl'}",
        *FEATURE_FLAGS,
        "--shard_strategy=balanced",
        "--per_host_input_min_bytes=0",
        f"--output_dir={features_3.output_dir}",
    ]
    config = draccus.parse(SampleLmMultihostConfig, config_path=str(TINY_CONFIG), args=args)
    kept = []
    for host in range(2):
        resumed = resolve(config, host=host, num_hosts=2, local_devices=1)
        fingerprint = fingerprint_hash(resumed.fingerprint)
        attempts = tuple(resumed.run_dir.read_run_file()["attempts"])
        earlier = earlier_rows(resumed.run_dir, attempts, fingerprint)
        prompts, share, to_sample = host_prompts(resumed.prompts, host, 2, resumed.shard_strategy, earlier)
        keys, _ = keep_earlier_rows(
            resumed.run_dir,
            attempts,
            fingerprint,
            share,
            prompts,
            resumed.sampling.stop,
            resumed.tokenizer,
            lambda header, data: None,
            len(resumed.prompts),
        )
        assert keys == {key for key in earlier if key[0] in share} and not work_items(prompts, to_sample, keys)
        kept.append(keys)
    assert not kept[0] & kept[1] and kept[0] | kept[1] == {
        (r["global_prompt_index"], r["generation_index"]) for r in features_3.rows()
    }


def test_a_file_whose_hosts_would_score_some_rows_and_generate_others_fails_at_the_merge(tmp_path):
    """Each host checks that its rows all have a `completion` or none do; across hosts the leader's pass checks."""
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": f"{i}+1=", **({"completion": f"{i + 1}."} if i < 15 else {})} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = plan(tmp_path, path, "--per_host_input_min_bytes=0", "--n_generations=1", num_hosts=2).prompts
    assert [len(source.read_share(source.share(h, 2, set()))) for h in range(2)] == [15, 15]
    with pytest.raises(PromptError, match=r"Row 15 has no `completion`, but row 0 does"):
        _ = source.n_generations
