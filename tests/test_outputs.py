"""Shard files and their line-by-line merge: field order, sorting, and every incomplete or unreadable case named."""

import pytest

from levanter_multihost.outputs import ROW_FIELDS, MergeError, jsonl_bytes, merge_jsonl, parse_jsonl
from levanter_multihost.sharding import balanced_shards


def row(prompt: int, generation: int = 0, host: int = 0) -> dict:
    ids = [prompt, generation, 7]
    return {
        "global_prompt_index": prompt,
        "generation_index": generation,
        "process_index": host,
        "prompt": f'{prompt}+{generation}= {{"global_prompt_index": 99}}\n',
        "prompt_token_count": 4,
        "generated_token_ids": ids,
        "generated_text": "é\u2028\r" + str(prompt),
        "generated_token_count": len(ids),
        "finish_reason": "length",
    }


def shards_of(assignment: list[list[int]], n_generations: int = 1) -> list[bytes]:
    """Each host's shard file: its prompts' rows, sorted, as the sampler writes them."""
    return [
        jsonl_bytes(row(p, g, host) for p in sorted(prompts) for g in range(n_generations))
        for host, prompts in enumerate(assignment)
    ]


def test_rows_are_written_in_field_order_whatever_order_they_come_in():
    scrambled = dict(reversed(list(row(3).items())))
    (line,) = jsonl_bytes([scrambled]).split(b"\n")[:-1]
    assert line.startswith(b'{"global_prompt_index": 3, "generation_index": 0, "process_index": 0, "prompt": ')
    assert tuple(parse_jsonl(line)[0]) == ROW_FIELDS
    assert parse_jsonl(line)[0] == row(3)


def test_a_row_with_missing_or_unknown_fields_is_refused():
    bad = row(1)
    del bad["finish_reason"]
    bad["extra"] = 1
    with pytest.raises(ValueError, match=r"lacks fields \['finish_reason'\], has unknown fields \['extra'\]"):
        jsonl_bytes([bad])


def test_contiguous_shards_merge_in_order_and_byte_for_byte():
    assignment = [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    shards = shards_of(assignment)
    merged = merge_jsonl(shards, num_prompts=10, n_generations=1)
    assert merged == b"".join(shards)
    assert parse_jsonl(merged) == [row(p, 0, host) for host, prompts in enumerate(assignment) for p in prompts]


def test_balanced_shards_interleave_and_merge_sorted():
    costs = [(7 * p) % 11 + 1 for p in range(40)]
    assignment = balanced_shards(costs, 3)
    assert assignment[0] != list(range(len(assignment[0])))  # interleaved, not contiguous
    merged = merge_jsonl(shards_of(assignment), num_prompts=40, n_generations=1)
    rows = parse_jsonl(merged)
    assert [r["global_prompt_index"] for r in rows] == list(range(40))
    owner = {p: host for host, ps in enumerate(assignment) for p in ps}
    assert rows == [row(p, 0, owner[p]) for p in range(40)]


def test_several_generations_per_prompt_sort_by_prompt_then_generation():
    merged = merge_jsonl(shards_of([[1, 3], [0, 2]], n_generations=3), num_prompts=4, n_generations=3)
    pairs = [(r["global_prompt_index"], r["generation_index"]) for r in parse_jsonl(merged)]
    assert pairs == [(p, g) for p in range(4) for g in range(3)]


def test_prompt_indices_sort_as_numbers_not_text():
    merged = merge_jsonl(shards_of([[10, 2], [1, 100] + list(range(3, 10)) + list(range(11, 100)) + [0]]), 101, 1)
    assert [r["global_prompt_index"] for r in parse_jsonl(merged)] == list(range(101))


def test_empty_shards_merge():
    assert merge_jsonl([b"", jsonl_bytes([row(0)]), b""], num_prompts=1, n_generations=1) == jsonl_bytes([row(0)])
    assert merge_jsonl([b""], num_prompts=0, n_generations=1) == b""


def test_missing_rows_are_named():
    expected = r"Cannot merge: 2 missing \(prompt, generation\) pairs, first \[\(2, 0\), \(5, 0\)\]\.$"
    with pytest.raises(MergeError, match=expected):
        merge_jsonl(shards_of([[0, 1], [3, 4]]), num_prompts=6, n_generations=1)


def test_a_missing_generation_is_named():
    shards = shards_of([[0], [1]], n_generations=2)
    shards[1] = jsonl_bytes([row(1, 0, 1)])
    with pytest.raises(MergeError, match=r"1 missing \(prompt, generation\) pairs, first \[\(1, 1\)\]"):
        merge_jsonl(shards, num_prompts=2, n_generations=2)


def test_duplicated_rows_are_named():
    with pytest.raises(MergeError, match=r"Cannot merge: 1 duplicated, first \[\(1, 0\)\]\.$"):
        merge_jsonl(shards_of([[0, 1], [1, 2]]), num_prompts=3, n_generations=1)


def test_unexpected_rows_are_named():
    with pytest.raises(MergeError, match=r"Cannot merge: 2 unexpected, first \[\(0, 1\), \(3, 0\)\]\.$"):
        merge_jsonl([jsonl_bytes([row(0), row(0, 1), row(1), row(2), row(3)])], num_prompts=3, n_generations=1)


@pytest.mark.parametrize(
    "line",
    [
        b'{"generation_index": 0, "global_prompt_index": 1, "process_index": 1}',  # fields out of order
        b'{"global_prompt_index":1,"generation_index":0,"process_index":1}',  # compact separators
        b'{"global_prompt_index": 01, "generation_index": 0, "process_index": 1}',  # not a JSON number
        b'{"global_prompt_index": -1, "generation_index": 0, "process_index": 1}',
        b'{"global_prompt_index": 1.0, "generation_index": 0, "process_index": 1}',
        b'{"global_prompt_index": 1, "generation_index": 0, "process_index": 1, "prompt": "cut',  # truncated
        b" " + jsonl_bytes([row(1, 0, 1)]).rstrip(b"\n"),
        b"",
    ],
)
def test_a_malformed_line_is_named_by_host_and_line(line):
    shards = [jsonl_bytes([row(0)]), jsonl_bytes([row(2, 0, 1)]) + line + b"\n"]
    with pytest.raises(MergeError, match=r"^Host 1 line 2: .* is not a row as outputs.jsonl_bytes writes it"):
        merge_jsonl(shards, num_prompts=3, n_generations=1)


def test_a_shard_without_its_last_newline_is_named():
    shards = shards_of([[0], [1]])
    shards[1] = shards[1][:-1]
    with pytest.raises(MergeError, match=r"Host 1: shard does not end with a newline"):
        merge_jsonl(shards, num_prompts=2, n_generations=1)
