"""A host's work: its share of the prompts, the rows it keeps from earlier attempts, and its batches.

Covers which prompts a host samples (:mod:`levanter_multihost.sharding`), reading and verifying the rows earlier
attempts left in the run directory (a resume samples only what is missing, whatever the old host count and batch
size were, spread over every host by the same balancing as a fresh run's), packing what is left into batches the
engine completes in one call (:class:`~levanter_multihost.capacity.BatchPacker`), and, after every batch, making
its rows durable as a part and handing the part on (``deliver``). Progress lines cover the whole share: batches,
tokens, tokens/s and an ETA measured from the first decode round, so compiling does not skew them. No cross-host
communication here.
"""

import collections
import json
import logging
import time
from collections.abc import Callable

from levanter_multihost import scoring
from levanter_multihost.capacity import BatchPacker, PromptDemand
from levanter_multihost.errors import UserError
from levanter_multihost.generation import WorkItem, row_ending
from levanter_multihost.host_input import HostInput
from levanter_multihost.outputs import MergeError, keyed_lines
from levanter_multihost.rundir import Part, RunDir
from levanter_multihost.runplan import EngineSettings, PromptSet, StopCondition
from levanter_multihost.sharding import prompt_cost, shard_for_host

logger = logging.getLogger(__name__)

Deliver = Callable[[dict, bytes], None]
"""Hands a part (header, the part's bytes) to the leader."""


class ResumeError(UserError):
    """A row on disk that does not belong to this run; the message names the file and line."""


def host_prompts(
    source: PromptSet | HostInput, replica: int, num_replicas: int, strategy: str, earlier: set[tuple[int, int]]
) -> tuple[PromptSet, list[int], list[int]]:
    """The prompts of ``replica`` (every host of it; each host is its own replica unless ``hosts_per_replica`` > 1),
    the global indices of those it answers for (:func:`host_share`) and of those with generations left that it
    samples (:func:`sampling_share`).

    A file read per host (:class:`~levanter_multihost.host_input.HostInput`) is read here, the replica's share only:
    one contiguous range both answered for and sampled, cut by the work each prompt has left.
    """
    if isinstance(source, HostInput):
        share = source.share(replica, num_replicas, earlier)
        logger.info(
            "replica %d: reads prompts %d-%d of %d from the file (per-host input)",
            replica,
            share.start,
            share.stop - 1,
            len(source),
        )
        return source.read_share(share), list(share), list(share)
    answered = host_share(source, replica, num_replicas, strategy)
    return source, answered, sampling_share(source, earlier, replica, num_replicas, strategy)


def host_share(prompts: PromptSet, replica: int, num_replicas: int, strategy: str) -> list[int]:
    """Global indices of the prompts ``replica`` answers for (every host of it): its leader verifies and delivers
    their rows kept from earlier attempts (:func:`keep_earlier_rows`)."""
    costs = [
        prompt_cost(prompts.tokens.length(i), int(prompts.max_new_tokens[i]), int(prompts.n_generations[i]))
        for i in range(len(prompts))
    ]
    return shard_for_host(strategy, num_replicas, replica, costs)


def earlier_rows(run_dir: RunDir, attempts: tuple[str, ...], fingerprint: str) -> set[tuple[int, int]]:
    """The (prompt, generation) of every row the run's earlier attempts left, read from their parts' keys only.

    Every host reads every part, so that all of them agree on what is missing (the host whose share holds a row
    verifies it, :func:`keep_earlier_rows`). Empty on a fresh run: its attempt has no parts yet.
    """
    keys: set[tuple[int, int]] = set()
    for part in run_dir.list_parts():
        if part.fingerprint != fingerprint or part.attempt not in attempts:
            continue
        try:
            keys.update(key for key, _ in keyed_lines(run_dir.read_part(part), part.path))
        except MergeError as e:  # a truncated or foreign line
            raise ResumeError(f"{e} Remove the file or use overwrite: true.") from None
    return keys


def sampling_share(
    prompts: PromptSet, earlier: set[tuple[int, int]], replica: int, num_replicas: int, strategy: str
) -> list[int]:
    """Global indices of the prompts with generations still to sample that ``replica`` (every host of it) samples.

    The missing work is spread over every replica by the same strategy as a fresh run's (then it is the fresh run's
    share): after a host died, a resume has every replica sample part of what it lost.
    """
    kept = collections.Counter(p for p, _ in earlier)
    todo = [p for p in range(len(prompts)) if kept[p] < prompts.n_generations[p]]
    costs = [
        prompt_cost(prompts.tokens.length(p), int(prompts.max_new_tokens[p]), int(prompts.n_generations[p]) - kept[p])
        for p in todo
    ]
    return [todo[i] for i in shard_for_host(strategy, num_replicas, replica, costs)]


def keep_earlier_rows(
    run_dir: RunDir,
    attempts: tuple[str, ...],
    fingerprint: str,
    share: list[int],
    prompts: PromptSet,
    stop: StopCondition,
    tokenizer,
    deliver: Deliver,
    num_prompts: int,
) -> tuple[set[tuple[int, int]], int]:
    """Verify and deliver the rows of earlier attempts that fall in ``share``; return their (prompt, generation)
    and their tokens. ``prompts`` holds at least the share's prompts; the job has ``num_prompts``.

    Parts of other runs or of replaced attempts are left alone. Every kept row must be one this run could have
    written: raises :class:`ResumeError` naming the file and line otherwise, before anything is sampled.
    """
    if not share:
        return set(), 0
    wanted = set(share)
    kept: dict[tuple[int, int], str] = {}
    tokens = 0
    lo, hi = min(share), max(share)
    for part in run_dir.list_parts():
        if part.fingerprint != fingerprint or part.attempt not in attempts or part.last < lo or part.first > hi:
            continue
        lines = []
        try:
            keyed = keyed_lines(run_dir.read_part(part), part.path)
        except MergeError as e:  # a truncated or foreign line
            raise ResumeError(f"{e} Remove the file or use overwrite: true.") from None
        for number, (key, line) in enumerate(keyed, start=1):
            if key[0] not in wanted and key[0] < num_prompts:  # another host's: it verifies the row
                continue
            row = _verify(line, key, part, number, prompts, stop, tokenizer)
            if key in kept:
                raise ResumeError(
                    f"{part.path} line {number}: (prompt, generation) {key} is also in {kept[key]}. "
                    "One of them was not written by this run: remove it or use overwrite: true."
                )
            kept[key] = part.path
            tokens += row.get("generated_token_count", 0)  # a scoring row generates none
            lines.append(line)
        if lines:
            deliver({"kind": "kept", "rows": len(lines)}, b"".join(lines))
    return set(kept), tokens


def _verify(
    line: bytes, key: tuple[int, int], part: Part, number: int, prompts: PromptSet, stop: StopCondition, tokenizer
) -> dict:
    """A row read back must be one this run writes for its prompt: its text, count and finish reason are derived
    again from its token ids. Return it parsed."""
    where = f"{part.path} line {number}"
    prompt, generation = key
    local = prompt - prompts.first  # the entry of ``prompts`` that holds the prompt
    try:
        row = json.loads(line)
    except ValueError as e:
        raise ResumeError(f"{where}: not valid JSON ({e}). Remove the file or use overwrite: true.") from None
    ids = row.get("generated_token_ids")
    problem = None
    if not part.first <= prompt <= part.last or not 0 <= local < len(prompts):
        problem = f"prompt {prompt} is outside the part's range {part.first}-{part.last} or the prompts"
    elif generation >= prompts.n_generations[local]:
        problem = f"generation {generation} is out of range (n_generations {prompts.n_generations[local]})"
    elif row.get("prompt") != prompts.texts[local] or row.get("prompt_token_count") != prompts.tokens.length(local):
        problem = f"its prompt differs from prompt {prompt} of the input"
    elif prompts.completions is not None:
        problem = scoring.verify(row, local, prompts)
    elif not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        problem = "generated_token_ids is not a list of token ids"
    elif len(ids) > prompts.max_new_tokens[local]:
        problem = f"it has {len(ids)} tokens, more than max_new_tokens ({prompts.max_new_tokens[local]})"
    else:
        derived = row_ending(ids, tokenizer, stop, int(prompts.max_new_tokens[local]))
        wrong = [k for k, v in derived.items() if row.get(k) != v]
        if wrong:
            problem = f"its {', '.join(wrong)} do not follow from its token ids"
        elif "generated_logprobs" in row and len(row["generated_logprobs"]) != len(ids):
            problem = "it has a log-probability count different from its token count"
    if problem:
        raise ResumeError(
            f"{where}: {problem}. The row was not written by this run: remove the file or use overwrite: true."
        )
    return row


def work_items(prompts: PromptSet, share: list[int], kept: set[tuple[int, int]]) -> list[WorkItem]:
    """The prompts of ``share`` with generations not in ``kept`` still to sample, in global order."""
    items = []
    for p in share:
        i = p - prompts.first  # the entry of ``prompts`` that holds prompt p
        n = int(prompts.n_generations[i])
        missing = tuple(g for g in range(n) if (p, g) not in kept)
        if missing:
            extra = prompts.extra_json[i] if prompts.extra_json is not None else None
            completion = tuple(prompts.completions[i]) if prompts.completions is not None else None
            items.append(
                WorkItem(
                    p,
                    prompts.texts[i],
                    prompts.tokens[i],
                    missing,
                    n,
                    int(prompts.max_new_tokens[i]),
                    float(prompts.temperature[i]),
                    extra,
                    top_k=int(prompts.top_k[i]),
                    top_p=float(prompts.top_p[i]),
                    min_p=float(prompts.min_p[i]),
                    seed=int(prompts.seed[i]),
                    completion_ids=completion,
                )
            )
    return items


def batches(items: list[WorkItem], engine: EngineSettings) -> list[list[WorkItem]]:
    """``items`` cut into batches one engine call completes in one wave (scoring rows: one forward pass)."""
    if items and items[0].completion_ids is not None:
        return scoring.batches(items, engine)
    packer = BatchPacker(engine.limits, engine.max_pages, engine.batch_size)
    demands = [PromptDemand(len(i.token_ids), i.max_new_tokens, len(i.generations)) for i in items]
    return [items[r.start : r.stop] for r in packer.pack(demands)]


class Progress:
    """Host-local progress over the whole share, logged at most every ``interval_s`` (0: never).

    Says when the first batch starts compiling; after that, tokens per second of decoding only (the rounds'
    wall time less the compile seconds ``compile_clock`` counted meanwhile; prefill and the gaps between batches
    left out), as ``decode tok/s`` in the summary, and the ETA of the remaining tokens at that rate. A batch's
    end is logged too, and the share's last batch always, so a host with one short batch still says how it went.
    """

    def __init__(
        self, host: int, total_batches: int, total_tokens: int, interval_s: float, compile_clock: Callable[[], float]
    ):
        self.host, self.total_batches, self.total_tokens, self.interval_s = (
            host,
            total_batches,
            total_tokens,
            interval_s,
        )
        self.compile_clock = compile_clock
        self.batches_done = 0
        self.tokens_done = 0
        self.decode_s_done = 0.0
        """Decode seconds of the finished batches (compiling excluded)."""
        self.batch_mark: tuple[float, float] | None = None
        """(wall clock, compile seconds) at the running batch's first decode round."""
        self.last_line = 0.0

    def batch_started(self, batch: int) -> None:
        if batch == 0 and self.interval_s > 0:
            logger.info(
                "host %d: batch 1/%d: compiling the engine's programs and prefilling; decode rates follow",
                self.host,
                self.total_batches,
            )

    def on_round(self, tokens_in_batch: int) -> None:
        now = time.perf_counter()
        where = f"batch {self.batches_done + 1}/{self.total_batches}"
        if self.batch_mark is None:  # the first round of a batch: its decode clock starts here
            self.batch_mark = (now, self.compile_clock())
            where += " decoding"  # the rate so far, if any, is the finished batches'
            decode_s = self.decode_s_done
        else:
            start, compiled = self.batch_mark
            decode_s = self.decode_s_done + max(now - start - (self.compile_clock() - compiled), 0.0)
        if self.interval_s > 0 and now - self.last_line >= self.interval_s:
            self._line(where, self.tokens_done + tokens_in_batch, decode_s)

    def batch_done(self, tokens: int, decode_s: float) -> None:
        self.batches_done += 1
        self.tokens_done += tokens
        self.decode_s_done += decode_s
        self.batch_mark = None
        last = self.batches_done == self.total_batches
        if self.interval_s > 0 and (last or time.perf_counter() - self.last_line >= self.interval_s):
            self._line(f"batch {self.batches_done}/{self.total_batches} done", self.tokens_done, self.decode_s_done)

    def _line(self, where: str, done: int, decode_s: float) -> None:
        """A progress line; its rate and ETA only once some decoding has been timed (never "0 tok/s")."""
        self.last_line = time.perf_counter()
        share = f"{done}/{self.total_tokens} tokens ({100.0 * done / max(self.total_tokens, 1):.0f}%)"
        if decode_s <= 0:
            logger.info("host %d: %s, %s", self.host, where, share)
            return
        rate = done / decode_s
        left = self.total_tokens - done
        logger.info(
            "host %d: %s, %s, %.1f tok/s decoding, ETA %.0fs", self.host, where, share, rate, max(left, 0) / rate
        )
