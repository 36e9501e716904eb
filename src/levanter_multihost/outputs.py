"""Output rows: their fields and encoding, and the streaming merge of sorted parts into one ordered output.

A row is one JSON line whose fields come in a fixed order (``ROW_FIELDS``, then the optional fields, then the
prompt's carried input columns), so every line starts with ``LINE_PREFIX`` and its (prompt, generation) can be
read without parsing JSON. Parts are sorted; :func:`merge_sorted` merges any number of them with a heap,
opening a part only when its first row comes up, and :class:`Completeness` checks on the way that every
expected (prompt, generation) pair is there exactly once. Memory stays flat in the number of rows.

Without a merge (``merge: false``) the parts are the output: a host sends the leader a part's manifest
(:func:`part_manifest`: its name, rows, bytes, SHA-256, Arrow schema and its keys as ranges of a :class:`KeySpace`)
instead of its rows, and :meth:`KeySpace.check_coverage` checks the manifests cover every expected pair exactly once.
No JAX import.
"""

import base64
import bisect
import hashlib
import heapq
import io
import itertools
import json
import re
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

ROW_FIELDS = (
    "global_prompt_index",
    "generation_index",
    "process_index",
    "prompt",
    "prompt_token_count",
    "generated_token_ids",
    "generated_text",
    "generated_token_count",
    "finish_reason",
    "stop_reason",
)
SCORE_FIELDS = (
    *ROW_FIELDS[:5],
    "completion_token_ids",
    "completion_token_count",
    "completion_logprobs",
    "completion_logprob",
    "is_greedy",
)
"""A scoring row's fields, in order, instead of ``ROW_FIELDS`` (:mod:`levanter_multihost.scoring`)."""
OPTIONAL_FIELDS = ("generated_logprobs",)
"""Written after ``ROW_FIELDS`` when the run asks for them (``logprobs``)."""
SCORE_OPTIONAL_FIELDS = ("prompt_logprobs",)
"""Written after ``SCORE_FIELDS`` when the run asks for them (``prompt_logprobs``)."""
OUTPUT_FIELDS = ROW_FIELDS + OPTIONAL_FIELDS + SCORE_FIELDS[5:] + SCORE_OPTIONAL_FIELDS
LINE_PREFIX = re.compile(
    rb'\{"global_prompt_index": (0|[1-9][0-9]*), "generation_index": (0|[1-9][0-9]*), "process_index": '
)
"""The start of every line :func:`row_line` writes; its groups are the line's (prompt, generation)."""

Key = tuple[int, int]


class MergeError(RuntimeError):
    """Rows missing, duplicated or unreadable; the message names them."""


def row_line(row: dict[str, Any], extra_json: bytes | None = None) -> bytes:
    """One JSON line: ``ROW_FIELDS`` (``SCORE_FIELDS`` for a scoring row) in order, then its optional fields
    present, then ``extra_json`` (carried input columns, already encoded as object members)."""
    required, optional = (
        (SCORE_FIELDS, SCORE_OPTIONAL_FIELDS) if "completion_token_ids" in row else (ROW_FIELDS, OPTIONAL_FIELDS)
    )
    fields = required + optional
    missing = [k for k in required if k not in row]
    unknown = sorted(set(row) - set(fields))
    if missing or unknown:
        raise ValueError(f"Row lacks fields {missing}, has unknown fields {unknown}; see outputs.OUTPUT_FIELDS.")
    ordered = {k: row[k] for k in fields if k in row}
    line = json.dumps(ordered, ensure_ascii=False).encode("utf-8")
    if extra_json:
        line = line[:-1] + extra_json + b"}"
    return line + b"\n"


def keyed_lines(data: bytes, where: str) -> list[tuple[Key, bytes]]:
    """Each line of a part (``where`` names it in errors) with its (prompt, generation), newline kept."""
    if not data:
        return []
    if not data.endswith(b"\n"):
        raise MergeError(f"{where}: does not end with a newline (truncated?); it cannot be merged.")
    return [_keyed(line, where, number) for number, line in enumerate(data.split(b"\n")[:-1], start=1)]


def read_keyed(stream: Iterable[bytes], where: str) -> Iterator[tuple[Key, bytes]]:
    """:func:`keyed_lines` one line at a time, from a file opened ``"rb"`` (which splits at newline bytes only), so
    a merge holds one line per open part instead of whole parts."""
    for number, line in enumerate(stream, start=1):
        if not line.endswith(b"\n"):
            raise MergeError(f"{where} line {number}: does not end with a newline (truncated?); it cannot be merged.")
        yield _keyed(line[:-1], where, number)


def _keyed(line: bytes, where: str, number: int) -> tuple[Key, bytes]:
    """``line`` (without its newline) with its key, newline put back; the row's JSON is not parsed."""
    match = LINE_PREFIX.match(line)
    if match is None or not line.endswith(b"}"):
        raise MergeError(
            f"{where} line {number}: {line[:80]!r} is not a row as outputs.row_line writes it (one JSON object "
            'per line starting {"global_prompt_index": P, "generation_index": G, "process_index": ...).'
        )
    return (int(match[1]), int(match[2])), line + b"\n"


@dataclass(frozen=True)
class SortedRun:
    """A sorted source of keyed lines (a part), opened only when the merge reaches its first key."""

    first: Key
    """Key of its first line."""
    open: Callable[[], Iterator[tuple[Key, bytes]]]
    """Yields its keyed lines in ascending order."""
    where: str = "a part"
    """Names the run in errors (``host 2's batch 5``)."""


def merge_sorted(runs: Sequence[SortedRun]) -> Iterator[tuple[Key, bytes]]:
    """All lines of ``runs`` in ascending key order; a run is opened when no line before its first is left.

    Raises :class:`MergeError` naming the run if one is not sorted or does not start at its declared first key
    (either would put a line out of order in the output).
    """
    pending = sorted(runs, key=lambda r: r.first)
    heap: list[tuple[Key, int, bytes, Iterator]] = []
    i = 0
    while heap or i < len(pending):
        # every run not yet opened starts after the smallest line in the heap, so it cannot come first
        while i < len(pending) and (not heap or pending[i].first <= heap[0][0]):
            run = pending[i]
            lines = run.open()
            first = next(lines, None)
            if first is not None:
                if first[0] != run.first:
                    raise MergeError(f"{run.where} starts at {first[0]}, not at {run.first} as declared.")
                heapq.heappush(heap, (first[0], i, first[1], lines))
            i += 1
        if not heap:  # the runs left were empty
            break
        key, index, line, lines = heapq.heappop(heap)
        yield key, line
        following = next(lines, None)
        if following is not None:
            if following[0] < key:
                raise MergeError(f"{pending[index].where} is not sorted: {following[0]} after {key}.")
            heapq.heappush(heap, (following[0], index, following[1], lines))


class Completeness:
    """Checks a sorted stream of keys against the expected pairs: every (prompt, g) with g < n_generations[prompt]."""

    def __init__(self, n_generations: Sequence[int]):
        self.n_generations = n_generations
        self.expected = self._expected()
        self.next: Key | None = next(self.expected, None)
        self.last: Key | None = None
        self.missing: list[Key] = []
        self.duplicated: list[Key] = []
        self.unexpected: list[Key] = []
        self.counts = {"missing": 0, "duplicated": 0, "unexpected": 0}

    def _expected(self) -> Iterator[Key]:
        for prompt, n in enumerate(self.n_generations):
            for g in range(int(n)):
                yield (prompt, g)

    def _note(self, kind: str, key: Key) -> None:
        self.counts[kind] += 1
        found = getattr(self, kind)
        if len(found) < 10:
            found.append(key)

    def see(self, key: Key) -> None:
        if key == self.last:
            self._note("duplicated", key)
            return
        while self.next is not None and self.next < key:
            self._note("missing", self.next)
            self.next = next(self.expected, None)
        if key == self.next:
            self.next = next(self.expected, None)
        else:
            self._note("unexpected", key)
        self.last = key

    def check(self) -> None:
        """Raise :class:`MergeError` naming what is missing, duplicated or unexpected."""
        while self.next is not None:
            self._note("missing", self.next)
            self.next = next(self.expected, None)
        if any(self.counts.values()):
            parts = [
                f"{self.counts[kind]} {kind} (prompt, generation) pairs, first {getattr(self, kind)}"
                for kind in ("missing", "duplicated", "unexpected")
                if self.counts[kind]
            ]
            raise MergeError("Cannot merge: " + "; ".join(parts) + ".")


class KeySpace:
    """Every expected (prompt, generation) pair numbered in order: prompt p's generation g is ``offsets[p] + g``, so
    a part's keys are a few ``[start, stop)`` ranges, and the whole run's are ``[0, total)``."""

    def __init__(self, n_generations: Sequence[int]):
        self.offsets = array("q", itertools.accumulate((int(n) for n in n_generations), initial=0))  # 8 bytes each

    @property
    def total(self) -> int:
        return self.offsets[-1]

    def ordinal(self, key: Key, where: str) -> int:
        prompt, generation = key
        if not (
            0 <= prompt < len(self.offsets) - 1 and 0 <= generation < self.offsets[prompt + 1] - self.offsets[prompt]
        ):
            raise MergeError(f"{where}: (prompt, generation) {key} is not one this run samples.")
        return self.offsets[prompt] + generation

    def key(self, ordinal: int) -> Key:
        prompt = bisect.bisect_right(self.offsets, ordinal) - 1
        return prompt, ordinal - self.offsets[prompt]

    def ranges(self, keys: Iterable[Key], where: str) -> list[list[int]]:
        """The ordinals of ``keys`` (ascending) as ``[start, stop)`` ranges; a key twice is a :class:`MergeError`."""
        ranges: list[list[int]] = []
        for key in keys:
            ordinal = self.ordinal(key, where)
            if ranges and ordinal < ranges[-1][1]:
                raise MergeError(f"{where}: {key} comes again or out of order.")
            if ranges and ordinal == ranges[-1][1]:
                ranges[-1][1] += 1
            else:
                ranges.append([ordinal, ordinal + 1])
        return ranges

    def check_coverage(self, parts: Iterable[tuple[str, Sequence[Sequence[int]]]]) -> int:
        """Raise :class:`MergeError` unless the parts' ranges (name, ranges) cover ``[0, total)`` exactly once,
        naming the first missing and duplicated pairs and the parts holding the latter; return the row count."""
        spans = sorted((start, stop, name) for name, ranges in parts for start, stop in ranges)
        counts = {"missing": 0, "duplicated": 0}
        first: dict[str, list[Key]] = {"missing": [], "duplicated": []}
        twice: list[str] = []  # the first parts that hold a pair twice
        holder = ""  # the part that holds the pairs just below ``covered``
        covered = 0

        def note(kind: str, start: int, stop: int) -> None:
            counts[kind] += stop - start
            first[kind].extend(self.key(o) for o in range(start, min(stop, start + 10 - len(first[kind]))))

        for start, stop, name in spans:
            if start > covered:
                note("missing", covered, start)
            elif start < covered:
                note("duplicated", start, min(stop, covered))
                if len(twice) < 2:
                    twice.append(f"{holder} and {name}")
            if stop > covered:
                covered, holder = stop, name
        if covered < self.total:
            note("missing", covered, self.total)
        if any(counts.values()):
            found = [f"{counts[k]} {k} (prompt, generation) pairs, first {first[k]}" for k in counts if counts[k]]
            also = f" (both in {'; '.join(twice)})" if twice else ""
            raise MergeError("Cannot index the parts: " + "; ".join(found) + also + ".")
        return sum(stop - start for start, stop, _ in spans)


def part_manifest(
    name: str, data: bytes, space: KeySpace, score: Callable[[dict], bool] | None = None
) -> dict[str, Any]:
    """What a part is, for the leader's index instead of its rows: its ``name`` in the run directory, rows, bytes,
    SHA-256, first and last key, its keys as :meth:`KeySpace.ranges`, its rows' Arrow schema (inferred as
    ``merged.parquet``'s is, base64 of its IPC form) and, with a ``score``, how many rows score."""
    import pyarrow.json as paj

    keyed = keyed_lines(data, name)
    longest = max((len(line) for _, line in keyed), default=0)
    # a row longer than the reader's block (1 MiB by default) would fail to parse
    options = paj.ReadOptions(block_size=max(1 << 20, 2 * longest))
    schema = paj.read_json(io.BytesIO(data), read_options=options).schema if keyed else None
    manifest = {
        "part": name,
        "rows": len(keyed),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "first": list(keyed[0][0]) if keyed else None,
        "last": list(keyed[-1][0]) if keyed else None,
        "ranges": space.ranges((key for key, _ in keyed), name),
        "schema": base64.b64encode(schema.serialize().to_pybytes()).decode() if schema is not None else None,
    }
    if score is not None:
        manifest["correct"] = sum(score(json.loads(line)) for _, line in keyed)
    return manifest


def manifests_only(
    deliver: Callable[[dict, bytes], None], space: KeySpace, score: Callable[[dict], bool] | None
) -> Callable[[dict, bytes], None]:
    """``deliver`` for ``merge: false``: a batch's part goes as its manifest (the part's ``name`` is in its header),
    without its rows; rows kept from earlier attempts go nowhere, since the leader indexes those parts itself."""

    def send(header: dict, data: bytes) -> None:
        if header.get("kind") == "batch":
            deliver({**header, **part_manifest(header["part"], data, space, score)}, b"")

    return send
