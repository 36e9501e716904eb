"""What a run's fingerprint holds beyond the config's own values: locations spelled one way, and a checkpoint's
content. No JAX import.

A resume refuses outputs written under another fingerprint, and the leader refuses a host whose fingerprint is
not its own (:meth:`~levanter_multihost.coordination.Coordinator.agree`), so both must change when the rows would
and stay put when they would not: ``./assets/x`` is ``assets/x``, a copy of a checkpoint elsewhere (every TPU
worker downloads its own) is the same checkpoint, new weights written over the old path are not.
"""

import hashlib
import os
import posixpath
from typing import TYPE_CHECKING

import fsspec

from levanter_multihost.errors import ConfigError, first_line

if TYPE_CHECKING:
    from levanter_multihost.config import SampleLmMultihostConfig

HEAD_BYTES = 64 * 1024
"""Bytes read from the start of each sampled file (a safetensors header, a small config whole)."""
SAMPLE_BLOCKS = 16
"""Blocks read at evenly spread offsets of each sampled file, so other weights of the same shapes show."""
SAMPLE_BLOCK_BYTES = 4096
SAMPLED_FILES = 8
"""Largest files of a checkpoint whose content is sampled (every file's name and size count)."""


def canonical_location(name: str | None) -> str | None:
    """``name`` spelled one way: a local path normalized (``./a//b/`` is ``a/b``), a URL without trailing slashes;
    relative paths stay relative, so the same checkout elsewhere has the same fingerprint."""
    if name is None:
        return None
    if "://" in name:
        protocol, rest = name.split("://", 1)
        return f"{protocol}://{posixpath.normpath(rest)}" if rest else name
    return os.path.normpath(os.path.expanduser(name))


def checkpoint_digest(location: str | None) -> str | None:
    """A digest of the checkpoint directory ``location`` (local or fsspec URL): every file's relative name and
    size, ``config.json`` and the largest files sampled (their first bytes and blocks spread over them). None
    where ``location`` is not a directory here (a hub id, which its name and revision identify)."""
    if location is None:
        return None
    try:
        fs, root = fsspec.core.url_to_fs(location)
        if not fs.isdir(root):
            return None
        root = root.rstrip("/")
        files = {path: info for path, info in fs.find(root, detail=True).items() if not _ignored(path, root)}
    except Exception as e:  # noqa: BLE001 - a bucket without credentials raises its client's own types
        raise ConfigError(
            f"The checkpoint {location} cannot be listed: {first_line(e)}. Check the path and, for a "
            "bucket, the credentials here."
        ) from None
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path[len(root) + 1 :]}\0{files[path].get('size')}\n".encode())
    largest = sorted(files, key=lambda p: (-(files[p].get("size") or 0), p))[:SAMPLED_FILES]
    configs = [p for p in files if p.endswith("config.json")]
    for path in sorted(set(largest) | set(configs)):
        size = files[path].get("size") or 0
        with fs.open(path, "rb") as f:
            digest.update(f.read(HEAD_BYTES))
            if size > HEAD_BYTES:
                for i in range(SAMPLE_BLOCKS):
                    f.seek(HEAD_BYTES + (size - HEAD_BYTES - SAMPLE_BLOCK_BYTES) * i // max(SAMPLE_BLOCKS - 1, 1))
                    digest.update(f.read(SAMPLE_BLOCK_BYTES))
    return digest.hexdigest()[:16]


def run_identity(config: "SampleLmMultihostConfig", checkpoint: str | None) -> dict:
    """The fingerprint's model and engine part: locations spelled one way, the checkpoint's content, and every
    setting besides sampling that changes a row or the output's schema."""
    if config.hf_checkpoint is not None:
        revision = config.hf_checkpoint.revision
        model = canonical_location(config.hf_checkpoint.model_name_or_path) + (f"@{revision}" if revision else "")
    else:
        model = canonical_location(config.checkpoint_path)
    return {
        "model": model,
        "checkpoint_digest": checkpoint_digest(checkpoint or config.checkpoint_path),
        "tokenizer": canonical_location(config.tokenizer),  # null: the checkpoint's, in its digest
        "compute_dtype": str(config.engine.compute_dtype),
        "model_axis_size": config.trainer.model_axis_size,
        "output_format": config.output_format,
    }


def _ignored(path: str, root: str) -> bool:
    """A file that does not make the model: hidden or under a hidden directory (``.cache/huggingface`` download
    metadata, which differs between copies), or a model card."""
    name = path[len(root) + 1 :]
    return name.endswith(".md") or any(part.startswith(".") for part in name.split("/"))
