"""Output rows and the streaming merge of sorted parts: field order, line splitting, ordering, lazy opening, and
every unreadable, unsorted or incomplete case named."""

import io
import json

import numpy as np
import pytest
from multihost import parse_jsonl

from levanter_multihost.outputs import (
    OPTIONAL_FIELDS,
    ROW_FIELDS,
    Completeness,
    MergeError,
    SortedRun,
    keyed_lines,
    merge_sorted,
    read_keyed,
    row_line,
)
from levanter_multihost.sharding import balanced_shards


def jsonl_bytes(rows) -> bytes:
    return b"".join(row_line(r) for r in rows)


def check_complete(keys, n_generations) -> None:
    completeness = Completeness(n_generations)
    for key in keys:
        completeness.see(key)
    completeness.check()


TRICKY_TEXT = "é\u2028\u2029\u0085\x1c\r" + '{"global_prompt_index": 99}\n'
"""Characters ``str.splitlines`` splits at (``json.dumps(..., ensure_ascii=False)`` leaves the first four as
they are), and text that looks like a line's start."""


def row(prompt: int, generation: int = 0, host: int = 0) -> dict:
    ids = [prompt, generation, 7]
    return {
        "global_prompt_index": prompt,
        "generation_index": generation,
        "process_index": host,
        "prompt": f"{prompt}+{generation}= " + TRICKY_TEXT,
        "prompt_token_count": 4,
        "generated_token_ids": ids,
        "generated_text": TRICKY_TEXT + str(prompt),
        "generated_token_count": len(ids),
        "finish_reason": "length",
        "stop_reason": None,
    }


def part(keys, host: int = 0) -> bytes:
    return jsonl_bytes(row(p, g, host) for p, g in keys)


def run_of(data: bytes, where: str = "a part") -> SortedRun:
    keyed = keyed_lines(data, where)
    return SortedRun(keyed[0][0], lambda: iter(keyed_lines(data, where)), where)


def merged(runs) -> bytes:
    return b"".join(line for _, line in merge_sorted(runs))


# -- rows --------------------------------------------------------------------------------------------------------


def test_rows_are_written_in_field_order_whatever_order_they_come_in():
    full = {**row(3), "stop_reason": ".", "generated_logprobs": [-0.5, -1.25, 0.0]}
    scrambled = dict(reversed(list(full.items())))
    line = row_line(scrambled)
    assert line.startswith(b'{"global_prompt_index": 3, "generation_index": 0, "process_index": 0, "prompt": ')
    assert line.endswith(b"}\n") and line.count(b"\n") == 1
    (parsed,) = parse_jsonl(line)
    assert tuple(parsed) == ROW_FIELDS + OPTIONAL_FIELDS
    assert parsed == full


def test_optional_fields_present_and_carried_columns_follow_the_row_fields():
    extra = b', "id": "q-7", "source": {"split": "test"}, "row_fields": 2'
    only_logprobs = {**row(1), "generated_logprobs": [-1.0, -2.0, -3.0]}
    (parsed,) = parse_jsonl(row_line(dict(reversed(list(only_logprobs.items()))), extra))
    assert list(parsed) == [*ROW_FIELDS, "generated_logprobs", "id", "source", "row_fields"]
    assert parsed == {**only_logprobs, "id": "q-7", "source": {"split": "test"}, "row_fields": 2}
    (plain,) = parse_jsonl(row_line(row(1), extra))
    assert list(plain) == [*ROW_FIELDS, "id", "source", "row_fields"]
    assert row_line(row(1), None) == row_line(row(1), b"") == jsonl_bytes([row(1)])


def test_a_row_with_missing_or_unknown_fields_is_refused():
    bad = row(1)
    del bad["finish_reason"]
    bad["extra"] = 1
    with pytest.raises(ValueError, match=r"lacks fields \['finish_reason'\], has unknown fields \['extra'\]"):
        row_line(bad)


def test_lines_are_split_at_newline_bytes_only():
    data = jsonl_bytes([row(0), row(1)])
    assert len(data.decode("utf-8").splitlines()) > 2  # what a str split would get wrong
    assert parse_jsonl(data) == [row(0), row(1)]
    assert [key for key, _ in keyed_lines(data, "p")] == [(0, 0), (1, 0)]
    assert [key for key, _ in read_keyed(io.BytesIO(data), "p")] == [(0, 0), (1, 0)]
    assert b"".join(line for _, line in keyed_lines(data, "p")) == data


# -- merge -------------------------------------------------------------------------------------------------------


def batches_of(assignment: list[list[int]], n_generations: list[int], batch: int) -> list[tuple[int, bytes]]:
    """Each host's parts: its prompts in global order cut into batches, every generation of a prompt in the part."""
    parts = []
    for host, prompts in enumerate(assignment):
        prompts = sorted(prompts)
        for b in range(0, len(prompts), batch):
            keys = [(p, g) for p in prompts[b : b + batch] for g in range(n_generations[p])]
            parts.append((host, part(keys, host)))
    return parts


def test_interleaved_parts_merge_byte_for_byte_in_prompt_then_generation_order():
    n_generations = [(p * 5) % 4 for p in range(60)]  # 0 to 3 generations a prompt
    assignment = balanced_shards([(7 * p) % 11 + 1 for p in range(60)], 3)
    assert assignment[0] != list(range(len(assignment[0])))  # interleaved, not contiguous
    owner = {p: host for host, prompts in enumerate(assignment) for p in prompts}
    parts = batches_of(assignment, n_generations, batch=4)
    out = merged([run_of(data, f"host {host}") for host, data in reversed(parts)])
    expected = [(p, g) for p in range(60) for g in range(n_generations[p])]
    assert out == b"".join(row_line(row(p, g, owner[p])) for p, g in expected)
    check_complete([key for key, _ in keyed_lines(out, "merged")], n_generations)


def test_prompt_indices_sort_as_numbers_not_text():
    runs = [run_of(part([(2, 0), (10, 0), (100, 0)])), run_of(part([(1, 0), (9, 0), (11, 0), (99, 0)]))]
    assert [key[0] for key, _ in merge_sorted(runs)] == [1, 2, 9, 10, 11, 99, 100]


def test_a_part_is_opened_only_when_its_first_key_can_come_up():
    parts = [part([(p, 0) for p in range(lo, lo + 5)]) for lo in (10, 0, 20, 3)]  # the last overlaps the second
    all_keys = sorted(key for data in parts for key, _ in keyed_lines(data, "p"))
    yielded: list[tuple[int, int]] = []
    opened: list[tuple[tuple[int, int], int]] = []

    def counting(data: bytes) -> SortedRun:
        first = keyed_lines(data, "p")[0][0]
        return SortedRun(first, lambda: opened.append((first, len(yielded))) or iter(keyed_lines(data, "p")))

    merge = merge_sorted([counting(data) for data in parts])
    yielded.append(next(merge)[0])
    assert [first for first, _ in opened] == [(0, 0)]  # one part open for the first line
    yielded.extend(key for key, _ in merge)
    assert yielded == all_keys
    for first, seen in opened:  # opened once every earlier line was out, and no later
        assert seen == sum(key < first for key in all_keys), (first, seen)
    assert sorted(first for first, _ in opened) == [(0, 0), (3, 0), (10, 0), (20, 0)]


def test_empty_input_and_empty_parts_merge():
    assert merged([]) == b""
    empty = SortedRun((0, 0), lambda: iter(()))
    assert merged([empty, run_of(part([(1, 0)])), SortedRun((5, 0), lambda: iter(()))]) == part([(1, 0)])
    assert keyed_lines(b"", "p") == []


def test_an_unsorted_part_is_refused_by_name():
    runs = [run_of(part([(0, 0), (3, 0)])), run_of(part([(1, 0), (4, 0), (2, 0)]), "host 1's batch 7")]
    with pytest.raises(MergeError, match=r"^host 1's batch 7 is not sorted: \(2, 0\) after \(4, 0\)\.$"):
        merged(runs)


def test_a_part_that_starts_before_its_declared_first_key_is_refused():
    data = part([(0, 0), (1, 0)])
    with pytest.raises(MergeError, match=r"host 2's batch 0 starts at \(0, 0\), not at \(1, 0\) as declared"):
        merged([run_of(part([(1, 1)])), SortedRun((1, 0), lambda: iter(keyed_lines(data, "x")), "host 2's batch 0")])


@pytest.mark.parametrize(
    "line",
    [
        b'{"generation_index": 0, "global_prompt_index": 1, "process_index": 1}',  # fields out of order
        b'{"global_prompt_index":1,"generation_index":0,"process_index":1}',  # compact separators
        b'{"global_prompt_index": 01, "generation_index": 0, "process_index": 1}',  # not a JSON number
        b'{"global_prompt_index": -1, "generation_index": 0, "process_index": 1}',
        b'{"global_prompt_index": 1.0, "generation_index": 0, "process_index": 1}',
        b'{"global_prompt_index": 1, "generation_index": 0, "process_index": 1, "prompt": "cut',  # truncated
        b" " + row_line(row(1, 0, 1)).rstrip(b"\n"),
        b"",
    ],
)
def test_a_malformed_line_is_named_by_part_and_line(line):
    data = part([(0, 0)]) + line + b"\n"
    expected = r"^host 1's batch 3 line 2: .* is not a row as outputs.row_line writes it"
    with pytest.raises(MergeError, match=expected):
        keyed_lines(data, "host 1's batch 3")
    with pytest.raises(MergeError, match=expected):
        list(read_keyed(io.BytesIO(data), "host 1's batch 3"))


def test_a_part_without_its_last_newline_is_named():
    data = part([(0, 0), (1, 0)])[:-1]
    with pytest.raises(MergeError, match=r"^host 2's batch 0: does not end with a newline \(truncated\?\)"):
        keyed_lines(data, "host 2's batch 0")
    with pytest.raises(MergeError, match=r"^host 2's batch 0 line 2: does not end with a newline \(truncated\?\)"):
        list(read_keyed(io.BytesIO(data), "host 2's batch 0"))


# -- completeness ------------------------------------------------------------------------------------------------

N_GENERATIONS = [2, 0, 3, 1]
"""Per prompt: prompt 1 asks for no generation."""
EXPECTED = [(0, 0), (0, 1), (2, 0), (2, 1), (2, 2), (3, 0)]


def test_every_expected_pair_once_is_complete():
    check_complete(EXPECTED, N_GENERATIONS)
    check_complete(EXPECTED, np.array(N_GENERATIONS))  # as PromptSet holds them
    check_complete([], [0, 0])


PAIRS = r"\(prompt, generation\) pairs, first "


@pytest.mark.parametrize(
    "keys, message",
    [
        ([(0, 0), (2, 0), (2, 2), (3, 0)], rf"^Cannot merge: 2 missing {PAIRS}\[\(0, 1\), \(2, 1\)\]\.$"),
        (EXPECTED[:3], rf"^Cannot merge: 3 missing {PAIRS}\[\(2, 1\), \(2, 2\), \(3, 0\)\]\.$"),
        (EXPECTED[:3] + [(2, 0)] + EXPECTED[3:], rf"^Cannot merge: 1 duplicated {PAIRS}\[\(2, 0\)\]\.$"),
        (
            EXPECTED[:2] + [(1, 0)] + EXPECTED[2:] + [(3, 1), (4, 0)],
            rf"^Cannot merge: 3 unexpected {PAIRS}\[\(1, 0\), \(3, 1\), \(4, 0\)\]\.$",
        ),
        (
            [(0, 0), (0, 0), (0, 2)] + EXPECTED[2:5],
            (
                rf"^Cannot merge: 2 missing {PAIRS}\[\(0, 1\), \(3, 0\)\]; 1 duplicated {PAIRS}\[\(0, 0\)\]; "
                rf"1 unexpected {PAIRS}\[\(0, 2\)\]\.$"
            ),
        ),
    ],
)
def test_missing_duplicated_and_unexpected_pairs_are_named(keys, message):
    with pytest.raises(MergeError, match=message):
        check_complete(keys, N_GENERATIONS)


def test_the_message_counts_every_pair_and_lists_the_first_ten():
    completeness = Completeness([1] * 25)
    with pytest.raises(MergeError, match=r"25 missing .* first \[\(0, 0\), .*, \(9, 0\)\]\.$") as error:
        completeness.check()
    assert str(error.value).count("(") == 1 + 10
    assert json.dumps(completeness.counts) == '{"missing": 25, "duplicated": 0, "unexpected": 0}'
