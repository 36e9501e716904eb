"""Rows, shard files and the merged output.

Covers the row schema, the per-host file ``host_{i:04d}_of_{n:04d}.jsonl`` (one JSON line per row, fields in
``ROW_FIELDS`` order), the completeness check (every expected (prompt, generation) pair exactly once) and the
merged ``merged.jsonl`` sorted by (``global_prompt_index``, ``generation_index``). Shard files merge line by line:
each line's (prompt, generation) is read from its fixed prefix, so merging parses no JSON. Every file is written
under a temporary name and renamed, on a local path or any fsspec URL. Leaves out how shards travel between hosts
(:mod:`levanter_multihost.gather`). No JAX import.
"""

import json
import os
import re
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import Any

import fsspec

MERGED_NAME = "merged.jsonl"
SUMMARY_NAME = "summary.json"
TIMELINE_NAME = "timeline.png"
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
)
LINE_PREFIX = re.compile(
    rb'\{"global_prompt_index": (0|[1-9][0-9]*), "generation_index": (0|[1-9][0-9]*), "process_index": '
)
"""The start of every line :func:`jsonl_bytes` writes; its groups are the line's (prompt, generation)."""


class MergeError(RuntimeError):
    """Rows missing, duplicated or unreadable; the message names them."""


def shard_name(host: int, num_hosts: int) -> str:
    return f"host_{host:04d}_of_{num_hosts:04d}.jsonl"


def join(output_dir: str, name: str) -> str:
    return output_dir.rstrip("/") + "/" + name


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary sibling of ``path``, then rename it into place."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    parent = os.path.dirname(fs_path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{fs_path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, fs_path)


def jsonl_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    """One JSON line per row, its fields in ``ROW_FIELDS`` order (so every line starts with ``LINE_PREFIX``)."""
    return "".join(json.dumps(_in_field_order(r), ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _in_field_order(row: dict[str, Any]) -> dict[str, Any]:
    if tuple(row) == ROW_FIELDS:
        return row
    if row.keys() != set(ROW_FIELDS):
        missing = [k for k in ROW_FIELDS if k not in row]
        extra = sorted(set(row) - set(ROW_FIELDS))
        raise ValueError(f"Row lacks fields {missing}, has unknown fields {extra}; rows hold exactly {ROW_FIELDS}.")
    return {k: row[k] for k in ROW_FIELDS}


def parse_jsonl(data: bytes) -> list[dict[str, Any]]:
    """Rows of JSON lines, split at newline bytes only (``str.splitlines`` would also split at a U+2028 or U+0085
    that ``json.dumps(..., ensure_ascii=False)`` leaves unescaped inside a string)."""
    return [json.loads(line) for line in data.split(b"\n") if line.strip()]


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with fsspec.open(path, "rb") as f:
        return parse_jsonl(f.read())


def exists(path: str) -> bool:
    fs, fs_path = fsspec.core.url_to_fs(path)
    return fs.exists(fs_path)


def expected_pairs(num_prompts: int, n_generations: int) -> set[tuple[int, int]]:
    return {(p, g) for p in range(num_prompts) for g in range(n_generations)}


def check_complete(pairs: Iterable[tuple[int, int]], num_prompts: int, n_generations: int) -> None:
    """Raise :class:`MergeError` unless ``pairs`` holds every expected (prompt, generation) pair exactly once."""
    counts = Counter(pairs)
    expected = expected_pairs(num_prompts, n_generations)
    missing = sorted(expected - counts.keys())
    duplicated = sorted(k for k, c in counts.items() if c > 1)
    unexpected = sorted(counts.keys() - expected)
    if missing or duplicated or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (prompt, generation) pairs, first {missing[:10]}")
        if duplicated:
            parts.append(f"{len(duplicated)} duplicated, first {duplicated[:10]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, first {unexpected[:10]}")
        raise MergeError("Cannot merge: " + "; ".join(parts) + ".")


def merge_jsonl(shards: Sequence[bytes], num_prompts: int, n_generations: int) -> bytes:
    """``merged.jsonl`` from every host's shard file (``shards[i]`` is host ``i``'s, as :func:`jsonl_bytes` wrote
    it): the lines of all shards sorted by (prompt, generation), once :func:`check_complete` accepts them."""
    keyed = [pair_and_line for host, data in enumerate(shards) for pair_and_line in _keyed_lines(host, data)]
    check_complete((pair for pair, _ in keyed), num_prompts, n_generations)
    keyed.sort(key=itemgetter(0))
    return b"".join(line + b"\n" for _, line in keyed)


def _keyed_lines(host: int, data: bytes) -> list[tuple[tuple[int, int], bytes]]:
    """Each line of host ``host``'s shard with its (prompt, generation), read from ``LINE_PREFIX``."""
    lines = data.split(b"\n")
    if lines.pop() != b"":
        raise MergeError(f"Host {host}: shard does not end with a newline (truncated?); it cannot be merged.")
    keyed = []
    for number, line in enumerate(lines, start=1):
        match = LINE_PREFIX.match(line)
        if match is None or not line.endswith(b"}"):
            raise MergeError(
                f"Host {host} line {number}: {line[:80]!r} is not a row as outputs.jsonl_bytes writes it (one JSON "
                'object per line starting {"global_prompt_index": P, "generation_index": G, "process_index": ...).'
            )
        keyed.append(((int(match[1]), int(match[2])), line))
    return keyed


def write_shard(output_dir: str, host: int, num_hosts: int, data: bytes) -> str:
    """Write this host's shard file (``data`` from :func:`jsonl_bytes` of its sorted rows); return the path."""
    path = join(output_dir, shard_name(host, num_hosts))
    write_atomic(path, data)
    return path
