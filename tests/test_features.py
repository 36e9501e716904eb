"""What evals and RL rollouts need, on emulated hosts: stop strings and EOS, logprobs, chat prompts, carried input
columns, per-row overrides, several generations, JSONL / Parquet / dataset inputs and Parquet output.

The same rows go through two runs (JSONL on 3 hosts sharded by cost, a dataset directory on 1 host in batches of 3
into Parquet); every sampled sequence must come out the same. A Parquet input reads as the dataset does
(test_prompt_files.py).
"""

import math

import pytest
from conftest import FEATURE_ROWS

from levanter_multihost.outputs import ROW_FIELDS

pytestmark = pytest.mark.multihost

STOPS = ("9", "0")
DOT, DOT_ID = ".", 18  # an EOS token of the checkpoint's generation_config.json: stop_reason is its text
DIGIT0 = 4  # "0"; the digits follow in order


def generations(rows):
    """What sampling decided, per (prompt, generation): tokens, text, finish, and logprobs rounded."""
    return {
        (r["global_prompt_index"], r["generation_index"]): (
            r["generated_token_ids"],
            r["generated_text"],
            r["finish_reason"],
            r["stop_reason"],
            [round(x, 4) for x in r["generated_logprobs"]],
        )
        for r in rows
    }


def parquet_rows(run):
    import pandas as pd

    frame = pd.read_parquet(run.output_dir / "merged.parquet")
    return [{k: _plain(v) for k, v in row.items()} for row in frame.to_dict("records")]


def _plain(value):
    """pandas/pyarrow values as JSON would hold them."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def test_every_option_gives_the_same_sequences_on_1_and_3_hosts(features_3, features_1):
    three = generations(features_3.rows())
    assert three == generations(parquet_rows(features_1))
    expected = sorted((p, g) for p, row in enumerate(FEATURE_ROWS) for g in range(row.get("n_generations", 2)))
    assert sorted(three) == expected  # n_generations 2, and 3 for the row that overrides it


def test_input_columns_are_carried_through_after_the_output_fields(features_3):
    for row, given in zip([r for r in features_3.rows() if r["generation_index"] == 0], FEATURE_ROWS):
        carried = {k: v for k, v in given.items() if k not in ("prompt", "messages")}
        assert list(row)[: len(ROW_FIELDS) + 1] == [*ROW_FIELDS, "generated_logprobs"]
        assert {k: row[k] for k in list(row)[len(ROW_FIELDS) + 1 :]} == carried
    r5 = next(r for r in features_3.rows() if r["id"] == "r5")
    assert r5["meta"] == {"source": "held-out", "tags": ["a", "b"]}


def test_chat_rows_are_rendered_with_the_template(features_3):
    rows = {r["id"]: r for r in features_3.rows() if r["generation_index"] == 0}
    assert rows["r1"]["prompt"] == "7+5=" and rows["r1"]["prompt_token_count"] == 4
    assert rows["r6"]["prompt"] == "15+5="  # the system message, then the user's, as the template writes them


def test_per_row_overrides_win_over_the_config(features_3, greedy_1x4):
    rows = {(r["id"], r["generation_index"]): r for r in features_3.rows()}
    assert all(rows[("r2", g)]["generated_token_count"] <= 3 for g in (0, 1))
    assert {g for (i, g) in rows if i == "r4"} == {0, 1, 2}
    greedy = next(r for r in greedy_1x4.rows() if r["prompt"] == "2269+795=")
    for g in (0, 1):  # temperature 0 for this row: both generations are the greedy answer, cut at the first stop
        ids = rows[("r3", g)]["generated_token_ids"]
        assert ids == greedy["generated_token_ids"][: len(ids)]


def test_the_first_stop_to_appear_wins_and_is_left_out_of_the_text(features_3):
    rows = features_3.rows()
    reasons = {r["stop_reason"] for r in rows if r["finish_reason"] == "stop"}
    assert reasons <= {*STOPS, DOT} and len(reasons) >= 2, reasons
    for r in rows:
        text = r["generated_text"]
        assert not any(s in text for s in STOPS), r  # cut before the earliest stop string
        if r["stop_reason"] == DOT:  # EOS: the last token, never in the text
            assert r["generated_token_ids"][-1] == DOT_ID and "." not in text
        elif r["stop_reason"] in STOPS:  # the engine stopped on the string's token, which the ids keep
            assert r["generated_token_ids"][-1] == DIGIT0 + int(r["stop_reason"])
        else:
            assert r["finish_reason"] == "length" and r["generated_token_count"] == (3 if r["id"] == "r2" else 6)


def test_logprobs_are_one_per_token_and_finite(features_3):
    for r in features_3.rows():
        assert len(r["generated_logprobs"]) == r["generated_token_count"]
        assert all(math.isfinite(x) and x <= 1e-6 for x in r["generated_logprobs"])


def test_parquet_output_loads_with_pandas_and_datasets(features_1):
    import datasets

    path = str(features_1.output_dir / "merged.parquet")
    assert not (features_1.output_dir / "merged.jsonl").exists()
    rows = parquet_rows(features_1)
    loaded = datasets.load_dataset("parquet", data_files=path, split="train")
    assert len(loaded) == len(rows) == 21
    assert loaded[0]["global_prompt_index"] == 0 and loaded[0]["id"] == "r0"
    assert [r["id"] for r in rows[:2]] == ["r0", "r0"]


def test_the_merged_jsonl_loads_with_datasets_in_one_call(features_3):
    import datasets

    loaded = datasets.load_dataset("json", data_files=str(features_3.output_dir / "merged.jsonl"), split="train")
    assert len(loaded) == 21 and loaded["id"][:3] == ["r0", "r0", "r1"]
