"""The run directory (``output_dir``, a local path or any fsspec URL): every file name, read and write in it.

Layout::

    output_dir/
      merged.jsonl | merged.parquet   the run's rows, sorted by (global_prompt_index, generation_index)
      _index.json  README.md          instead, with merge: false: the parts that are the output, and its card
      summary.json  timeline.png      the leader's report
      run.json                        the run's fingerprint and the attempts whose parts belong to it
      .lock                           held by the running leader (see :meth:`RunDir.lock`)
      parts/                          one sorted JSONL file per batch sampled (or rows kept on resume)

A part's name says what it holds: ``{first:010d}-{last:010d}.{fingerprint}.{attempt}.h{host:04d}b{batch:06d}.jsonl``
— its first and last global prompt index, the run's fingerprint, the attempt that wrote it, the host and the
batch. Every file is written under a temporary name and moved into place, so a reader never sees half a file.
The fresh / resume / refuse decision (:func:`decide`) is made by the leader alone, once. No JAX import.
"""

import contextlib
import hashlib
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec

from levanter_multihost.errors import UserError, first_line

MERGED_JSONL = "merged.jsonl"
MERGED_PARQUET = "merged.parquet"
SUMMARY = "summary.json"
TIMELINE = "timeline.png"
RUN_FILE = "run.json"
LOCK = ".lock"
PARTS = "parts"
INDEX = "_index.json"
"""``merge: false``: the part files that make the run's dataset, with their rows and SHA-256."""
CARD = "README.md"
"""``merge: false``: the dataset card, whose front matter names the parts and their features for ``datasets``."""
FILES = (MERGED_JSONL, MERGED_PARQUET, INDEX, CARD, SUMMARY, TIMELINE, RUN_FILE, LOCK)
"""Every file a run writes at the top of the run directory."""
LOCK_REFRESH_S = 60.0
"""How often the running leader rewrites ``.lock``, bumping its beat."""
LOCK_STALE_BEATS = 5
"""A lock held on another machine is stale once its beat has been still for this many refresh periods."""
PART_NAME = re.compile(r"(\d{10})-(\d{10})\.([0-9a-f]{16})\.([0-9a-f]{8})\.h(\d{4})b(\d{6})\.jsonl")
"""A part's file name, whole (temporary files, ``name.tmp-1a2b3c4d``, and other names do not match)."""

logger = logging.getLogger(__name__)


class RunDirError(UserError):
    """The run directory holds something this run may not use or replace; the message says what to do."""


@dataclass(frozen=True, order=True)
class Part:
    """One part file, as its name describes it."""

    first: int
    """Smallest global prompt index in the part."""
    last: int
    """Largest global prompt index in the part."""
    fingerprint: str
    attempt: str
    host: int
    batch: int
    path: str
    """Full path (or URL) of the file."""
    size: int = field(default=-1, compare=False)
    """Bytes, as the listing said (-1: not listed)."""

    @property
    def name(self) -> str:
        """Its name inside the run directory: ``parts/...jsonl``."""
        return f"{PARTS}/{self.path.rsplit('/', 1)[-1]}"


@dataclass(frozen=True)
class Decision:
    """What the leader decided about the run directory before anything is written."""

    attempt: str
    """This attempt's id: every part it writes carries it."""
    attempts: tuple[str, ...]
    """Attempts whose parts belong to this run: earlier ones when resuming, then this one."""
    replaces: bool
    """An earlier run's outputs are there and are replaced once this run's merge is written."""


def fingerprint_hash(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()[:16]


class RunDir:
    """``output_dir`` and everything in it."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") if url not in ("/", "") else url
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self.is_local = type(self.fs).__name__ == "LocalFileSystem"

    def __repr__(self) -> str:
        return f"RunDir({self.url!r})"

    def path(self, name: str) -> str:
        """Path of ``name`` inside the run directory, as the filesystem names it."""
        return f"{self.root}/{name}"

    def url_of(self, name: str) -> str:
        """URL of ``name`` inside the run directory, as the user named the directory."""
        return f"{self.url}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open(self.path(name), "rb") as f:
            return f.read()

    def write_atomic(self, name: str, data: bytes) -> None:
        with self.open_atomic(name) as f:
            f.write(data)

    @contextlib.contextmanager
    def open_atomic(self, name: str):
        """A binary file to stream into; it appears under ``name`` only when the block ends without error."""
        final = self.path(name)
        parent = os.path.dirname(final)
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with self.fs.open(tmp, "wb") as f:
                yield f
            self.fs.mv(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.rm(tmp)
            raise

    def check_usable(self, host: int) -> None:
        """Before anything loads: the directory persists, is writable, and no path this run writes is taken by
        the wrong kind of thing (``merged.jsonl`` a directory, ``parts`` a file); raise :class:`RunDirError`."""
        if not self.url.strip():
            raise RunDirError(
                "output_dir is empty: the run would write into the working directory. Name a directory."
            )
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        if "memory" in protocols:
            raise RunDirError(
                f"output_dir ({self.url}) is in this process's memory: nothing written there outlives "
                "it. Use a local path or a bucket URL."
            )
        self.check_writable(host)
        expected = {**dict.fromkeys(FILES, "file"), PARTS: "directory"}
        for name, kind in expected.items():
            if self.fs.exists(self.path(name)) and (found := self.fs.info(self.path(name)).get("type")) != kind:
                raise RunDirError(
                    f"{self.url_of(name)} is a {found}, but this run writes a {kind} there. Move it "
                    "away, or choose another output_dir."
                )

    def check_writable(self, host: int) -> None:
        """Write and delete a probe file; raise :class:`RunDirError` naming the directory if that fails."""
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            probe = self.path(f".write_probe_{host}_{uuid.uuid4().hex[:8]}")
            with self.fs.open(probe, "wb") as f:
                f.write(b"")
            self.fs.rm(probe)
        except Exception as e:  # noqa: BLE001 - a bucket without credentials raises its client's own types
            raise RunDirError(
                f"output_dir ({self.url}) is not writable: {first_line(e)}. Choose another output_dir (a "
                "bucket needs credentials here: gcloud auth application-default login)."
            ) from None

    # -- the run's identity ------------------------------------------------------------------------------------

    def read_run_file(self) -> dict[str, Any] | None:
        if not self.exists(RUN_FILE):
            return None
        try:
            run = json.loads(self.read_bytes(RUN_FILE))
        except (ValueError, UnicodeDecodeError) as e:
            raise RunDirError(f"{self.url_of(RUN_FILE)} is not valid JSON ({e}). Use overwrite: true.") from None
        if not isinstance(run, dict):
            raise RunDirError(f"{self.url_of(RUN_FILE)} is not a JSON object as {RUN_FILE} is. Use overwrite: true.")
        return run

    def decide(self, fields: dict[str, Any], resume: bool, overwrite: bool, attempt: str) -> Decision:
        """Fresh, resume or refuse, from what the directory holds; nothing is written.

        Earlier outputs must belong to this run (``resume``, same fingerprint) or be replaced (``overwrite``);
        otherwise one message says what is there and the three ways on.
        """
        earlier = [n for n in (MERGED_JSONL, MERGED_PARQUET, INDEX, RUN_FILE) if self.exists(n)]
        parts = self.list_parts()
        if parts:
            earlier.append(f"{len(parts)} part file(s) in {PARTS}/")
        if not earlier:
            return Decision(attempt, (attempt,), replaces=False)
        if overwrite:
            return Decision(attempt, (attempt,), replaces=True)
        if not resume:
            raise RunDirError(
                f"output_dir ({self.url}) holds outputs of an earlier run ({', '.join(earlier)}). Set resume: true "
                "to continue it, overwrite: true to replace it (once this run's merge is written), or choose "
                "another output_dir."
            )
        run = self.read_run_file()  # only now: overwrite replaces even an unreadable run.json
        if run is None:
            raise RunDirError(
                f"Cannot resume: output_dir ({self.url}) has no {RUN_FILE} to check its outputs "
                f"({', '.join(earlier)}) against this run. Use overwrite: true or another output_dir."
            )
        here = fingerprint_hash(fields)
        if run.get("fingerprint") != here:
            old = run.get("fields", {})
            new = json.loads(json.dumps(fields))  # as run.json holds it: a tuple is a list there
            changed = sorted(k for k in set(new) | set(old) if old.get(k) != new.get(k))
            raise RunDirError(
                f"Cannot resume: output_dir ({self.url}) holds a run with fingerprint {run.get('fingerprint')}, this "
                f"config has {here} (differs in {changed}). Outputs of different configs are never mixed: use "
                "another output_dir or overwrite: true."
            )
        return Decision(attempt, (*run.get("attempts", ()), attempt), replaces=False)

    def check_still_ours(self, attempt: str) -> None:
        """Raise :class:`RunDirError` unless ``run.json`` still lists this attempt: a run directory deleted or
        replaced mid-run is a failure, not a success written into a fresh, empty directory."""
        try:
            run = self.read_run_file()
        except RunDirError:
            run = None
        if run is None or attempt not in run.get("attempts", ()):
            raise RunDirError(
                f"output_dir ({self.url}) was deleted or replaced while this run wrote it: its "
                f"{RUN_FILE} no longer lists attempt {attempt}. Rerun (resume: true keeps what "
                "is still there), into a directory nothing else writes."
            )

    def record(self, fields: dict[str, Any], decision: Decision) -> None:
        """Leader: write ``run.json`` for this attempt."""
        data = {"fingerprint": fingerprint_hash(fields), "fields": fields, "attempts": list(decision.attempts)}
        self.write_atomic(RUN_FILE, json.dumps(data, indent=2).encode("utf-8"))

    # -- parts -------------------------------------------------------------------------------------------------

    def write_part(
        self, data: bytes, first: int, last: int, fingerprint: str, attempt: str, host: int, batch: int
    ) -> Part:
        name = f"{first:010d}-{last:010d}.{fingerprint}.{attempt}.h{host:04d}b{batch:06d}.jsonl"
        self.write_atomic(f"{PARTS}/{name}", data)
        return Part(first, last, fingerprint, attempt, host, batch, self.path(f"{PARTS}/{name}"))

    def list_parts(self) -> list[Part]:
        """Every part file, sorted by first prompt; temporary files and other names are left out."""
        folder = self.path(PARTS)
        if not self.fs.exists(folder):
            return []
        parts = []
        for entry in self.fs.ls(folder, detail=True):
            path = entry["name"]
            m = PART_NAME.fullmatch(path.rsplit("/", 1)[-1])
            if m and entry.get("type") != "file":
                raise RunDirError(
                    f"{path} is named like a part but is a {entry.get('type')}. Move it away, or "
                    "choose another output_dir."
                )
            if m:
                first, last, fp, attempt, host, batch = m.groups()
                size = entry.get("size", -1)
                parts.append(Part(int(first), int(last), fp, attempt, int(host), int(batch), path, size))
        return sorted(parts)

    def read_part(self, part: Part) -> bytes:
        with self.fs.open(part.path, "rb") as f:
            return f.read()

    def remove_parts_except(self, attempts: tuple[str, ...]) -> int:
        """Delete parts written by other attempts (a replaced run's); return how many."""
        stale = [p for p in self.list_parts() if p.attempt not in attempts]
        for p in stale:
            self.fs.rm(p.path)
        return len(stale)

    def remove_outputs_except(self, keep: str) -> None:
        """Delete a replaced run's outputs (a merged file, or an index and its card) but ``keep``; the card only
        with the index, whose card it is (a README.md of the user's own stays)."""
        stale = [n for n in (MERGED_JSONL, MERGED_PARQUET, INDEX) if n != keep and self.exists(n)]
        if INDEX in stale and self.exists(CARD):
            stale.append(CARD)
        for name in stale:
            self.fs.rm(self.path(name))

    # -- one run at a time -------------------------------------------------------------------------------------

    def lock(self, attempt: str, refresh_s: float = LOCK_REFRESH_S):
        """Hold ``.lock`` while the block runs; refuse if another run holds it (:func:`.runlock.hold`)."""
        from levanter_multihost import runlock

        return runlock.hold(self, attempt, refresh_s)


def new_attempt() -> str:
    return uuid.uuid4().hex[:8]
