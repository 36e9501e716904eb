"""The capacity plan as a table for people and as JSON for tools (``levanter-multihost-plan``)."""

import textwrap
from dataclasses import asdict

from levanter_multihost.capacity.hbm import gib
from levanter_multihost.capacity.planner import CapacityPlan, as_flags, verified_fixes

NEEDED_WIDTH = 54
"""Characters of the table's "needed" column before it wraps, so that a line stays under ~100."""
TEXT_WIDTH = 100


def rows(plan: CapacityPlan) -> list[tuple[str, str, str, str]]:
    """(parameter, value, needed, verdict) lines of the report table."""
    e, run = plan.engine, plan.run
    failed = {p.field for p in plan.problems}
    worst = run.longest
    out = []

    def add(param: str, value, needed: str, field: str | None = None) -> None:
        out.append((param, _fmt(value), needed, "FAIL" if field in failed else "ok"))

    need = worst.prompt_tokens + worst.max_new_tokens
    add(
        "max_seq_len",
        e.max_seq_len,
        f"{need:,} (longest prompt {worst.prompt_tokens} + {worst.max_new_tokens} new)",
        "engine.max_seq_len",
    )
    bounds = ", ".join(
        f"{k.split('.')[-1]} {v:,}" for k, v in sorted(plan.batch.bounds.items(), key=lambda kv: kv[1])
    )
    largest = max((max(h.batch_sequences, default=0) for h in plan.hosts), default=0)
    add(
        "sequences per batch",
        largest,
        f"at most {plan.batch.sequences:,} of the longest prompt, set by {plan.batch.limited_by} ({bounds})",
        "batch_size",
    )
    unit = plan.topology.unit
    if plan.hosts:
        add(
            f"batches per {unit}",
            _range(plan.batches_per_host),
            f"for {_range(plan.prompts_per_host)} prompts per {unit}",
        )
    if plan.max_pages is None:
        add("max_pages", "unset", f"{plan.pages_required:,} for the largest batch at full length")
    else:
        add(
            "max_pages",
            plan.max_pages,
            f"{plan.pages_required:,} for the largest batch ({plan.pages_per_seq} per sequence at full length, "
            f"{e.pages_per_seq_max} at max_seq_len)",
            "engine.max_pages",
        )
    add("max_prefill_size", e.prefill_size, f">= longest prompt {worst.prompt_tokens}", "engine.max_prefill_size")
    add(
        "max_queued_tokens",
        e.max_queued_tokens,
        f">= {max(e.max_seqs, e.tokens_per_round, e.max_seqs_in_prefill)} "
        "(max_seqs, max_tokens_per_round, max_seqs_in_prefill)",
        "engine.max_queued_tokens",
    )
    add(
        "decode budget",
        e.decode_iterations,
        f"iterations per call ({e.outer_rounds} outer rounds x max_rounds "
        f"{e.max_rounds}); a batch needs at most {max(worst.max_new_tokens - 1, 0)} per turn",
    )
    if run.stop_sequences:
        add("max_stop_seqs", e.max_stop_seqs, f">= {run.stop_sequences} stop sequences", "engine.max_stop_seqs")
        add("max_stop_tokens", e.max_stop_tokens, f">= {run.longest_stop_tokens} tokens", "engine.max_stop_tokens")
    gen = plan.topology.generation
    if plan.topology.hosts_per_replica > 1 and gen is not None:
        chips = plan.topology.chips_per_replica
        across = f"{plan.topology.hosts_per_replica} hosts x {plan.topology.chips_per_host} chips"
        if plan.hbm_per_chip is not None:
            across = f"{gib(plan.hbm_per_chip * chips)} at most ({chips} x the busiest chip's) on {across}"
        out.append((f"HBM per replica ({chips} chips)", gib(chips * gen.hbm_bytes_per_chip), across, "info"))
    if plan.hbm_per_chip is not None and gen is not None:
        out.append(
            (
                f"HBM per chip ({gen.name})",
                gib(gen.hbm_bytes_per_chip),
                f"{gib(plan.hbm_per_chip)} (weights + KV cache)",
                "FAIL" if plan.hbm_per_chip > gen.hbm_bytes_per_chip else "ok",
            )
        )
    step = plan.step_bound_s
    if step is not None and gen is not None:
        tokens_per_s = plan.largest_batch / step
        out.append(
            (
                "decode step (HBM-bound)",
                f"{step * 1e3:.2f} ms",
                f"{plan.largest_batch} sequences mid-decode: {tokens_per_s:,.0f} tok/s per {unit} at the bound",
                "info",
            )
        )
    proposal = plan.proposal
    if proposal is not None:
        sizes = ", ".join(f"{k} {v:,}" for k, v in proposal.engine_fields().items())
        bound = (
            ""
            if proposal.step_s is None
            else (
                f"; step {proposal.step_s * 1e3:.2f} ms, {proposal.tokens_per_s:,.0f} tok/s per {unit} at the bound"
            )
        )
        out.append(
            (
                "auto-size proposal",
                f"{proposal.sequences:,} seqs",
                f"limited by {proposal.limited_by}: {sizes}{bound} (engine.auto_size: true applies it)",
                "info",
            )
        )
    return out


def text(plan: CapacityPlan) -> str:
    """A summary line, the table, the problems with their fixes, and the notes."""
    worst = plan.run.longest
    head = (
        f"{'OK' if plan.ok else 'FAIL'}: {len(plan.run.demands)} prompts x up to {worst.generations} generation(s), "
        f"up to {worst.max_new_tokens} new tokens, on {plan.topology.describe()}"
    )
    table = [("parameter", "value", "needed", "verdict"), *rows(plan)]
    wrapped = [(r, textwrap.wrap(r[2], NEEDED_WIDTH) or [""]) for r in table]
    widths = [max(len(r[0]) for r in table), max(len(r[1]) for r in table), max(len(w[0]) for _, w in wrapped)]
    lines = [*textwrap.wrap(head, TEXT_WIDTH), ""]
    for r, needed in wrapped:
        cells = [r[0].ljust(widths[0]), r[1].rjust(widths[1]), needed[0].ljust(widths[2]), r[3]]
        lines.append("  ".join(cells).rstrip())
        lines += [" " * (widths[0] + widths[1] + 4) + more for more in needed[1:]]
    if plan.problems:
        fixes = verified_fixes(plan)
        lines += ["", "Problems (field to change: suggested value):"]
        for p in plan.problems:
            value = (fixes or {}).get(p.field, p.suggested)
            lines.append(f"- {p.field}: {'-' if value is None else value}")
            lines += textwrap.wrap(p.message, TEXT_WIDTH, initial_indent="  ", subsequent_indent="  ")
        lines += [""] + textwrap.wrap(fix_line(fixes), TEXT_WIDTH)
    if plan.notes:
        lines += ["", "Notes:"]
        for n in plan.notes:
            lines += textwrap.wrap(n, TEXT_WIDTH, initial_indent="- ", subsequent_indent="  ")
    return "\n".join(lines)


def fix_line(fixes: dict[str, int] | None) -> str:
    """What planning again with the suggested values showed."""
    if fixes is None:
        return "Planning again with these values did not make the run fit: change one field at a time and plan again."
    return f"Planned again with {as_flags(fixes)}: it fits."


def to_dict(plan: CapacityPlan) -> dict:
    """The plan as JSON-ready data; its per-host lists count replicas where ``hosts_per_replica`` > 1."""
    gen = plan.topology.generation
    decode = plan.decode_bound_s
    return {
        "ok": plan.ok,
        "tpu_type": plan.topology.name,
        "num_hosts": plan.topology.num_hosts,
        "chips_per_host": plan.topology.chips_per_host,
        "hosts_per_replica": plan.topology.hosts_per_replica,
        "num_replicas": plan.topology.replicas,
        "prompts": len(plan.run.demands),
        "prompts_per_host": plan.prompts_per_host,
        "batches_per_host": plan.batches_per_host,
        "batch": {
            "sequences": plan.batch.sequences,
            "limited_by": plan.batch.limited_by,
            "bounds": plan.batch.bounds,
        },
        "pages_per_seq_max": plan.engine.pages_per_seq_max,
        "pages_per_seq": plan.pages_per_seq,
        "pages_required": plan.pages_required,
        "max_pages": plan.max_pages,
        "decode_budget": {"outer_rounds": plan.engine.outer_rounds, "iterations": plan.engine.decode_iterations},
        "hosts": [asdict(h) for h in plan.hosts],
        "hbm": None
        if plan.hbm_per_chip is None or gen is None
        else {
            "bytes_per_chip_needed": plan.hbm_per_chip,
            "bytes_per_chip": gen.hbm_bytes_per_chip,
            "weight_bytes": plan.model.weight_bytes,
            "weight_bytes_per_chip": plan.model.weight_bytes_per_chip,
            "kv_bytes_per_token": plan.model.kv_bytes_per_token,
            "kv_bytes_per_token_per_chip": plan.model.kv_bytes_per_token_per_chip,
            "source": plan.model.source,
        },
        "roofline": None
        if decode is None
        else {
            "step_s": plan.step_bound_s,
            "tokens_per_s_per_host": plan.largest_batch / plan.step_bound_s if plan.step_bound_s else None,
            "decode_s_per_host": decode,
        },
        "proposal": None
        if plan.proposal is None
        else {
            "sequences": plan.proposal.sequences,
            "limited_by": plan.proposal.limited_by,
            "engine": plan.proposal.engine_fields(),
            "step_s": plan.proposal.step_s,
            "tokens_per_s_per_host": plan.proposal.tokens_per_s,
        },
        "problems": [asdict(p) for p in plan.problems],
        "fixes": verified_fixes(plan) if plan.problems else {},
        "notes": list(plan.notes),
    }


def _range(values: list[int]) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"


def _fmt(value) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)
