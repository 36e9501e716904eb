"""``merge: false``: the parts are the output. Hosts send manifests (names, rows, SHA-256, keys as ranges) instead of
rows; the leader checks every (prompt, generation) is in exactly one part, then writes ``_index.json`` and a dataset
card that ``datasets.load_dataset`` reads the run directory with: the same rows as the merged output of the same
parts, whatever other files lie in ``parts/``.

The parts are the leader tests' (``test_leader``): 14 prompts with 0 to 3 generations on 3 hosts, interleaved.
"""

import functools
import hashlib
import json
import os

import datasets
import draccus
import pandas as pd
import pyarrow as pa
import pyarrow.json as paj
import pytest
from multihost import TINY_CONFIG, parse_jsonl
from test_leader import N_GENERATIONS, expected, parts, reporting

from levanter_multihost import leader
from levanter_multihost.addition import accuracy
from levanter_multihost.checks import check_values
from levanter_multihost.config import SampleLmMultihostConfig
from levanter_multihost.errors import ConfigError
from levanter_multihost.outputs import KeySpace, MergeError, keyed_lines, manifests_only, part_manifest
from levanter_multihost.rundir import CARD, INDEX, MERGED_JSONL, Decision, RunDir

FINGERPRINT = "0123456789abcdef"
EARLIER, NOW, REPLACED = "aaaaaaaa", "bbbbbbbb", "cccccccc"
DECISION = Decision(NOW, (EARLIER, NOW), replaces=False)


def by_key(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["global_prompt_index"], r["generation_index"]))


def load(run_dir) -> list[dict]:
    """The run directory as ``datasets`` loads it in one call, in the merged order."""
    cache = os.path.join(os.path.dirname(str(run_dir)), "hf_cache")
    return by_key(datasets.load_dataset(str(run_dir), split="train", cache_dir=cache).to_list())


def write_part(out: RunDir, host: int, header: dict, data: bytes, attempt: str):
    keys = [key for key, _ in keyed_lines(data, "a part")]
    return out.write_part(data, keys[0][0], keys[-1][0], FINGERPRINT, attempt, host, header["batch"])


def write_parts(out: RunDir, earlier: int = 0, task: str | None = None) -> leader.PartIndex:
    """Every part into ``parts/``: the first ``earlier`` as an earlier attempt's (on disk only, as a resume finds
    them), the rest as this attempt's, each announced to the index by its host's manifest (scored for ``task``)."""
    score = functools.partial(leader.task_score, task) if task is not None else None
    written = [p for p in parts() if p[2]]
    for host, header, data in written[:earlier]:
        write_part(out, host, header, data, EARLIER)
    index = leader.PartIndex(out.list_parts())  # this attempt begins
    space = KeySpace(N_GENERATIONS)
    for host, header, data in written[earlier:]:
        part = write_part(out, host, header, data, NOW)
        send = manifests_only(functools.partial(index.add, host), space, score)
        send({**header, "rows": data.count(b"\n"), "part": part.name}, data)
    return index


def test_keys_are_ranges_of_the_expected_pairs_in_order():
    space = KeySpace([2, 0, 3])
    assert space.total == 5
    assert [space.key(o) for o in range(5)] == [(0, 0), (0, 1), (2, 0), (2, 1), (2, 2)]
    assert space.ranges([(0, 1), (2, 0), (2, 2)], "p") == [[1, 3], [4, 5]]
    with pytest.raises(MergeError, match=r"^p: \(prompt, generation\) \(1, 0\) is not one this run samples"):
        space.ranges([(1, 0)], "p")
    with pytest.raises(MergeError, match=r"^p: \(2, 0\) comes again or out of order"):
        space.ranges([(2, 0), (2, 0)], "p")


def test_coverage_counts_rows_and_names_missing_and_duplicated_pairs_with_their_parts():
    space = KeySpace([2, 0, 3])
    assert space.check_coverage([("b", [[2, 5]]), ("a", [[0, 2]])]) == 5
    with pytest.raises(MergeError, match=r"^Cannot index the parts: 2 missing .* first \[\(0, 1\), \(2, 0\)\]\.$"):
        space.check_coverage([("a", [[0, 1], [3, 5]])])
    with pytest.raises(MergeError, match=r"1 duplicated .* first \[\(2, 0\)\] \(both in a and b\)\.$"):
        space.check_coverage([("a", [[0, 3]]), ("b", [[2, 5]])])


def test_a_manifest_is_the_part_without_its_rows():
    _, header, data = parts()[0]
    manifest = part_manifest("parts/x.jsonl", data, KeySpace(N_GENERATIONS), score=lambda row: True)
    rows = parse_jsonl(data)
    assert manifest["rows"] == manifest["correct"] == len(rows)
    assert manifest["bytes"] == len(data) and manifest["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["first"] == [rows[0]["global_prompt_index"], 0]
    delivered = []
    send = manifests_only(lambda h, d: delivered.append((h, d)), KeySpace(N_GENERATIONS), None)
    send({**header, "part": "parts/x.jsonl"}, data)
    send({"kind": "kept", "rows": len(rows)}, data)  # kept rows: the leader indexes earlier parts itself
    ((sent, payload),) = delivered
    assert payload == b"" and sent["ranges"] == manifest["ranges"] and sent["batch"] == header["batch"]
    with pytest.raises(MergeError, match=r"host 0's batch 0 came as rows, not as a manifest"):
        leader.PartIndex([]).add(0, header, data)


@pytest.mark.parametrize("samples", [3, 1000])
def test_the_indexed_run_directory_loads_as_the_merged_rows(tmp_path, samples):
    out = RunDir(str(tmp_path / "out"))
    index = write_parts(out, earlier=2, task="addition")
    result = leader.write_index(index, out, N_GENERATIONS, DECISION, FINGERPRINT, reporting(samples, "addition"))
    rows = parse_jsonl(expected())
    assert load(tmp_path / "out") == rows
    assert result.rows == len(rows) and result.samples == rows[:samples]
    assert result.correct == round(accuracy(rows) * len(rows))
    record = json.loads(out.read_bytes(INDEX))
    assert record["rows"] == len(rows) and record["attempts"] == [EARLIER, NOW]
    assert len(record["files"]) == len([p for p in parts() if p[2]])
    for f in record["files"]:
        data = out.read_bytes(f["part"])
        assert hashlib.sha256(data).hexdigest() == f["sha256"] and data.count(b"\n") == f["rows"]
    # a column null in some parts and text in others loads as text: the card types it
    stop_reasons = [{r["stop_reason"] for r in parse_jsonl(out.read_bytes(f["part"]))} for f in record["files"]]
    assert {None} in stop_reasons and any("." in s for s in stop_reasons)
    # as docs/usage.md loads it with pandas and pyarrow, through datasets and without
    loaded = datasets.load_dataset(out.url, split="train", cache_dir=str(tmp_path / "hf_cache"))
    assert sorted(loaded.to_pandas()["generated_text"]) == sorted(r["generated_text"] for r in rows)
    assert by_key(loaded.with_format("arrow")[:].to_pylist()) == rows
    files = [f"{out.url}/{f['part']}" for f in record["files"]]
    frame = pd.concat([pd.read_json(f, lines=True, dtype=False) for f in files], ignore_index=True)
    assert sorted(frame["generated_text"]) == sorted(r["generated_text"] for r in rows)
    table = pa.concat_tables([paj.read_json(f) for f in files], promote_options="permissive")
    assert by_key(table.to_pylist()) == rows


def test_stray_and_replaced_parts_are_not_in_the_dataset(tmp_path):
    """A row written twice appears once: only the parts of this attempt and of the earlier ones it read as it began
    (this fingerprint's) are indexed, by name."""
    out = RunDir(str(tmp_path / "out"))
    index = write_parts(out, earlier=3)
    host, _, data = parts()[0]
    out.write_part(data, 0, 13, FINGERPRINT, REPLACED, host, 0)  # a replaced run's part, not yet removed
    out.write_part(data, 0, 13, "fedcba9876543210", EARLIER, host, 0)  # another run's
    (tmp_path / "out" / "parts" / "0000000000-0000000013.x.jsonl.tmp-1a2b3c4d").write_bytes(data)
    out.write_part(data, 0, 13, FINGERPRINT, EARLIER, host, 77)  # a failed attempt's straggler, written since
    leader.write_index(index, out, N_GENERATIONS, DECISION, FINGERPRINT, reporting())
    assert load(tmp_path / "out") == parse_jsonl(expected())


def test_a_row_in_two_indexed_parts_writes_no_index(tmp_path):
    out = RunDir(str(tmp_path / "out"))
    index = write_parts(out, earlier=2)
    host, header, data = parts()[0]  # sampled again by this attempt, though an earlier part holds it
    part = write_part(out, host, {**header, "batch": 99}, data, NOW)
    manifests_only(functools.partial(index.add, host), KeySpace(N_GENERATIONS), None)(
        {**header, "part": part.name}, data
    )
    with pytest.raises(MergeError, match=rf"duplicated .*\(both in parts/\S+{EARLIER}\S+ and {part.name}\)"):
        leader.write_index(index, out, N_GENERATIONS, DECISION, FINGERPRINT, reporting())
    assert not out.exists(INDEX) and not out.exists(CARD)


def test_a_part_its_manifest_names_must_be_in_the_run_directory(tmp_path):
    out = RunDir(str(tmp_path / "out"))
    index = write_parts(out)
    gone = index.manifests[1]["part"]
    os.remove(out.path(gone))
    with pytest.raises(MergeError, match=rf"^{gone}, host \d's batch \d, is not there in .*a bucket URL"):
        leader.write_index(index, out, N_GENERATIONS, DECISION, FINGERPRINT, reporting())
    assert not out.exists(INDEX)


def test_a_replaced_runs_merged_output_goes_and_a_users_readme_stays(tmp_path):
    out = RunDir(str(tmp_path))
    for name in (MERGED_JSONL, CARD):
        (tmp_path / name).write_text("earlier\n")
    out.remove_outputs_except(INDEX)
    assert sorted(os.listdir(tmp_path)) == [CARD]
    (tmp_path / INDEX).write_text("{}")
    out.remove_outputs_except(MERGED_JSONL)
    assert os.listdir(tmp_path) == []


def test_merge_false_takes_jsonl_parts_only():
    config = draccus.parse(SampleLmMultihostConfig, config_path=str(TINY_CONFIG), args=["--merge=false"])
    check_values(config, 1, 4)
    config = draccus.parse(
        SampleLmMultihostConfig, config_path=str(TINY_CONFIG), args=["--merge=false", "--output_format=parquet"]
    )
    with pytest.raises(ConfigError, match=r"^output_format \('parquet'\) is the merged file's, but merge is false"):
        check_values(config, 1, 4)
