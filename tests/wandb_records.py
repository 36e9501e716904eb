"""Read back what an offline wandb run wrote: the records of its ``run-*.wandb`` file (a LevelDB-style log).

wandb 0.31 keeps an offline run's summary and history only in that file, and no longer ships a Python reader.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

FILE_HEADER = 7  # ":W&B", magic 0xBEE1, version
BLOCK = 32768
RECORD_HEADER = 7  # crc32c (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[pb.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb log"
    out, pending, pos = [], b"", FILE_HEADER
    while pos + RECORD_HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < RECORD_HEADER:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + RECORD_HEADER])
        chunk = data[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def summary_and_history(run_dir: Path) -> tuple[dict, list[dict]]:
    """The run's final summary and its history rows, with JSON values decoded."""
    (log,) = run_dir.glob("run-*.wandb")
    summary: dict = {}
    history: list[dict] = []
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return summary, history


def config(run_dir: Path) -> dict:
    """The run's config (``wandb.config``), with JSON values decoded."""
    (log,) = run_dir.glob("run-*.wandb")
    out: dict = {}
    for record in records(log):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif record.WhichOneof("record_type") == "run":
            out.setdefault("_run_name", record.run.display_name)
            for item in record.run.config.update:
                out.setdefault(item.key or "/".join(item.nested_key), json.loads(item.value_json))
    return out
