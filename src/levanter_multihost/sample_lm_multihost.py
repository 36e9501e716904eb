"""Sample many prompts from a Llama model on every host of a multi-host slice, host-data-parallel.

Every host loads the model onto its own chips, samples its share of the prompts in batches, makes each batch's
rows durable in the run directory and sends them to the leader through the JAX distributed key-value store; the
leader writes one merged, ordered output and reports once. ``docs/architecture.md`` maps the stages to modules.

    # 4 emulated hosts on this machine, tiny model
    uv run python infra/launch.py --local_hosts 4 -- \
        uv run python -m levanter_multihost.sample_lm_multihost --config_path config/sampler/tiny_local.yaml

    # one plain process (it emulates the host's 4 devices on CPU)
    uv run levanter-multihost-sample --config_path config/sampler/tiny_local.yaml
"""

import contextlib
import functools
import logging
import os
import sys

import jax

from levanter_multihost import (
    coordination,
    host_work,
    leader,
    model_loading,
    runtime,
    scoring,
    seams,
    summary,
)
from levanter_multihost.checks import timeouts
from levanter_multihost.collector import Collector
from levanter_multihost.config import SampleLmMultihostConfig, parse_command_line
from levanter_multihost.coordination import DONE, READY, CoordinationError, Coordinator
from levanter_multihost.errors import UserError, first_line
from levanter_multihost.generation import WorkItem, build_engine, check_engine_state, generate_batch
from levanter_multihost.launch_env import ENV_PROCESS_ID
from levanter_multihost.outputs import KeySpace, manifests_only, row_line
from levanter_multihost.replicas import Replicas
from levanter_multihost.resolution import resolve
from levanter_multihost.rundir import Decision, fingerprint_hash, new_attempt
from levanter_multihost.runplan import RunPlan
from levanter_multihost.runtime import CompileClock, HostContext
from levanter_multihost.summary import BatchRecord

LEAVE_WAIT_S = 15.0
"""How long a failed leader waits for the other hosts to stop before it exits (they hear of it within a beat)."""

logger = logging.getLogger(__name__)


def main(config: SampleLmMultihostConfig, handle_signals: bool = False) -> None:
    """Run the job's stages on this host; every host of the job calls it with the same config."""
    seams.install()  # here, not in cli(): a caller of main() runs the same engine
    ctx = runtime.start(
        config.trainer, handle_signals, config.engine_log, cross_host_mesh=config.hosts_per_replica != 1
    )
    seams.apply_ragged_attention(config.ragged_attention, announce=ctx.is_leader)
    link = coordination.connect(
        seams.distributed_client(), ctx.host, ctx.num_hosts, config.gather_chunk_bytes, timeouts(config)
    )
    stop_heartbeat = link.start_heartbeat(on_leader_failure=leader_failed)
    try:
        with link.failures_reported():
            with ctx.phase("prepare"):
                plan = resolve(config, ctx.host, ctx.num_hosts, jax.local_device_count())
                link.agree(plan.fingerprint)
            attempt = new_attempt()
            with plan.run_dir.lock(attempt) if ctx.is_leader else contextlib.nullcontext():
                with ctx.phase("prepare"):
                    decision, earlier = prepare_run_dir(plan, link, attempt)
                run_share(plan, ctx, link, decision, earlier)
        if not ctx.is_leader:
            link.wait_for(DONE)
    finally:
        stop_heartbeat.set()


def prepare_run_dir(plan: RunPlan, link: Coordinator, attempt: str) -> tuple[Decision, set[tuple[int, int]]]:
    """Leader: decide fresh / resume / refuse and record the run, then tell the others, who wait for it. Every host
    returns the decision and the rows earlier attempts left (the same on every host, or a :class:`UserError`)."""
    fingerprint = fingerprint_hash(plan.fingerprint)
    if not link.is_leader:
        message = link.wait_for(READY)
        decision = Decision(message["attempt"], tuple(message["attempts"]), message["replaces"])
        earlier = host_work.earlier_rows(plan.run_dir, decision.attempts, fingerprint)
        if len(earlier) != message["earlier_rows"]:  # the missing work is split by what every host reads here
            raise UserError(
                f"host {link.host} reads {len(earlier)} rows of earlier attempts in output_dir "
                f"({plan.run_dir.url}), the leader {message['earlier_rows']}: a resume needs one run "
                "directory every host reads (a bucket URL), not a local path on each host."
            )
        return decision, earlier
    decision = plan.run_dir.decide(plan.fingerprint, plan.resume, plan.overwrite, attempt)
    plan.run_dir.record(plan.fingerprint, decision)
    earlier = host_work.earlier_rows(plan.run_dir, decision.attempts, fingerprint)
    link.announce(
        READY,
        {
            "attempt": decision.attempt,
            "attempts": list(decision.attempts),
            "replaces": decision.replaces,
            "earlier_rows": len(earlier),
        },
    )
    return decision, earlier


def run_share(
    plan: RunPlan, ctx: HostContext, link: Coordinator, decision: Decision, earlier: set[tuple[int, int]]
) -> None:
    """This host's share (its replica's): rows kept from earlier attempts, then its batches, every part to the
    leader; only the replica's leader writes and sends rows, its other hosts sample the same batches with it."""
    spool = (leader.Spool() if plan.merge else leader.PartIndex(plan.run_dir.list_parts())) if ctx.is_leader else None
    collector = Collector(link, spool.add).start() if ctx.is_leader else None
    try:
        deliver = (lambda header, data: spool.add(ctx.host, header, data)) if ctx.is_leader else link.send_part
        if not plan.merge:  # only manifests cross: the parts in the run directory are the output
            task = plan.reporting.task
            score = functools.partial(leader.task_score, task) if task is not None else None
            deliver = manifests_only(deliver, KeySpace(plan.prompts.n_generations), score)
        fingerprint = fingerprint_hash(plan.fingerprint)
        replicas = plan.replicas
        replica, writes = replicas.replica_of(ctx.host), replicas.leads_replica(ctx.host)
        with ctx.phase("prepare"):
            prompts, share, to_sample = host_work.host_prompts(
                plan.prompts, replica, replicas.num_replicas, plan.shard_strategy, earlier
            )
        kept, tokens_kept = set(), 0
        if writes:
            kept, tokens_kept = host_work.keep_earlier_rows(
                plan.run_dir,
                decision.attempts,
                fingerprint,
                share,
                prompts,
                plan.sampling.stop,
                plan.tokenizer,
                deliver,
                len(plan.prompts),
            )
        items = host_work.work_items(prompts, to_sample, earlier)
        batches = host_work.batches(items, plan.engine)
        logger.info(
            "host %d: %d prompts, %d rows kept, %d prompts to sample in %d batches",
            ctx.host,
            len(share),
            len(kept),
            len(items),
            len(batches),
        )
        scoring_rows = prompts.completions is not None  # one forward pass a batch, no engine
        stats = (
            sample(
                plan,
                ctx,
                batches,
                scoring_rows,
                decision.attempt,
                fingerprint,
                deliver if writes else None,
                collector,
            )
            if batches
            else []
        )
        metrics = summary.host_metrics(
            ctx.host, ctx.started_at, ctx.phases, len(share), stats, len(kept), tokens_kept, replica, writes
        )
        if not ctx.is_leader:
            link.send_end(metrics.to_json())
            return
        leader.merge_and_report(plan, ctx, collector, spool, metrics, decision, fingerprint)
        link.announce(DONE, {})
    finally:
        if collector is not None:
            collector.stop()
        if spool is not None:
            spool.close()


def sample(
    plan: RunPlan,
    ctx: HostContext,
    batches: list[list[WorkItem]],
    scoring_rows: bool,
    attempt: str,
    fingerprint: str,
    deliver: host_work.Deliver | None,
    collector: Collector | None,
) -> list[BatchRecord]:
    """Load the model onto the chips of this host's replica and sample every batch; ``deliver`` None: a replica
    member that is not its leader, which runs the same batches (their collectives) and writes nothing."""
    replica = plan.replicas.replica_of(ctx.host)
    devices = model_loading.replica_devices(plan.replicas, replica)
    with replica_collectives(plan.replicas, replica), model_loading.on_mesh(plan.model.trainer, devices):
        with ctx.phase("model_load"):
            model = model_loading.load_model(plan.model, plan.tokenizer)
        with ctx.phase("engine_build"):
            engine = (
                None
                if scoring_rows
                else build_engine(model, plan.tokenizer, plan.engine.config, plan.sampling.logprobs)
            )
        expected = sum(len(i.generations) * i.max_new_tokens for b in batches for i in b)
        progress = host_work.Progress(
            ctx.host, len(batches), expected, plan.reporting.progress_interval_s, CompileClock.seconds
        )
        stats = []
        for b, items in enumerate(batches):
            start = ctx.now()
            progress.batch_started(b)
            if scoring_rows:
                rows, batch = scoring.score_batch(
                    model, items, plan.engine, plan.sampling.prompt_logprobs, ctx.host, CompileClock.seconds
                )
            else:
                rows, batch = generate_batch(
                    engine, plan.tokenizer, items, plan.sampling, ctx.host, progress.on_round, CompileClock.seconds
                )
                check_engine_state(engine, rows, ctx.host, b, model.Vocab.size)
            # the clock's spans: compile, prefill, compile (the first decode round's), decode
            for name, seconds in (
                ("compile", batch.compile_prefill_s),
                ("prefill", batch.prefill_s),
                ("compile", batch.compile_decode_s),
                ("decode", batch.decode_s),
            ):
                ctx.add(name, start, start + seconds)
                start += seconds
            write_s = 0.0
            if deliver is not None:  # (the replica's other hosts hold the same rows: its leader writes them)
                with ctx.phase("write"):
                    if ctx.is_leader:  # (a worker's local output_dir holds no run.json; its parts reach the leader)
                        plan.run_dir.check_still_ours(attempt)  # else the part would go where nobody reads it
                    data = b"".join(row_line(row, extra) for row, extra in rows)
                    part = plan.run_dir.write_part(
                        data, items[0].global_index, items[-1].global_index, fingerprint, attempt, ctx.host, b
                    )
                with ctx.phase("send"):
                    deliver({"kind": "batch", "batch": b, "rows": len(rows), "part": part.name}, data)
                written = ctx.phases["write"][-1]
                write_s = written[1] - written[0]
            progress.batch_done(batch.tokens, batch.decode_s)
            if collector is not None:
                collector.check()  # a host failed or went silent: stop now rather than after this host's share
            stats.append(
                BatchRecord(
                    batch=b,
                    sequences=batch.sequences,
                    tokens=batch.tokens,
                    compile_s=batch.compile_prefill_s + batch.compile_decode_s,
                    prefill_s=batch.prefill_s,
                    decode_s=batch.decode_s,
                    write_s=write_s,
                    pages_after_prefill=batch.pages_after_prefill,
                    outer_rounds=batch.outer_rounds,
                    waves=batch.waves,
                )
            )
    return stats


@contextlib.contextmanager
def replica_collectives(replicas: Replicas, replica: int):
    """A collective of a replica of several hosts that fails over gloo (a host of the replica died or left) is a
    :class:`CoordinationError` of one line on the host that noticed, not a traceback."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if replicas.hosts_per_replica == 1 or "Gloo" not in str(e):
            raise
        hosts = replicas.hosts_of(replica)
        raise CoordinationError(
            f"A collective of replica {replica} (hosts {hosts[0]}-{hosts[-1]}) failed: a host of it died or left "
            f"({first_line(e)}). Its parts written so far are durable; rerun with resume: true."
        ) from None


def cli() -> None:
    """Entry point: the config, then :func:`main`. A failure is said once, the other hosts are let go, and the
    process exits without JAX's shutdown barrier: 2 for a user's mistake, 128 + n for signal n, else 1."""
    try:
        main(parse_command_line(sys.argv[1:]), handle_signals=True)
    except SystemExit as e:
        if e.code not in (0, None):  # --help exits 0
            raise
    except BaseException as e:
        runtime.exit_now(stop_after(e))


def stop_after(error: BaseException) -> int:
    """Log ``error`` where it belongs and let the other hosts go; return the exit status.

    A user's mistake or a stop signal is one line, on the leader only (a non-leader's error reaches the leader,
    which names the host); a failed or silent host is one line on the host that noticed it; anything else is a bug
    and keeps its traceback on every host.
    """
    link = coordination.current()
    is_leader = link.is_leader if link is not None else os.environ.get(ENV_PROCESS_ID, "0") == "0"
    # before the link, no other host hears of this host's failure: it must say it itself
    speaks = is_leader or link is None
    if isinstance(error, CoordinationError) or (isinstance(error, (UserError, runtime.Stopped)) and speaks):
        logger.error("%s", error)
    elif not isinstance(error, (UserError, runtime.Stopped)):
        logger.error("Sampling failed", exc_info=error)
    if link is not None:
        if is_leader:
            link.wait_for_others_to_leave(LEAVE_WAIT_S)
        else:
            link.leave()
    if isinstance(error, runtime.Stopped):
        return 128 + error.signum
    return 2 if isinstance(error, UserError) else 1


def leader_failed(error: Exception) -> None:
    """Non-leader, from a background thread: the leader failed, refused the run or went silent; stop now."""
    runtime.exit_now(stop_after(error))


if __name__ == "__main__":
    cli()
