"""The serial loops of Levanter's decode program: found in its jaxpr, counted in StableHLO and compiled HLO.

Part of ``bench/decode_program.py`` (which see for how to run it; findings in docs/benchmarks.md, section 11).
``KNOWN_LOOPS`` is the table of the loops read in Levanter's source; a loop not in it makes the report's trip
count null, so a Levanter upgrade that adds one shows up.
"""

import math
import os

# --------------------------------------------------------------------------------------------------------------
# The loops read in Levanter's source (levanter 1.2.dev1644). Key: (file, function) of the innermost Levanter
# frame of the loop's equation. Value: what the loop is, what its trip count depends on, and its trip count in a
# steady decode iteration as a function of B (sequences decoded), ctx (their context length) and the config
# (``static`` is the jaxpr's own length for a scan).
# --------------------------------------------------------------------------------------------------------------

KNOWN_LOOPS = {
    ("engine.py", "_run_generation_loop"): {
        "name": "decode round (outer while_loop)",
        "depends": "<= max_rounds (queue empty / all finished end it)",
        "per_step": lambda B, ctx, c, static: 1,
        "tpu": "yes",
    },
    ("jit_scheduler.py", "SequenceTable.allocate_for_seq"): {
        "name": "allocate_for_seq, per sequence",
        "depends": "sequences in the round (B)",
        "per_step": lambda B, ctx, c, static: B,
        "tpu": "yes",
    },
    ("jit_scheduler.py", "SequenceTable.allocate_for_seq.<locals>._alloc_pages_for_seq"): {
        "name": "allocate_for_seq, per new page",
        "depends": "new pages: 1 per page_size tokens",
        "per_step": lambda B, ctx, c, static: 1 / c["page_size"],
        "tpu": "yes",
    },
    ("jit_scheduler.py", "SequenceTable._create_batch_info"): {
        "name": "_create_batch_info, per packed token",
        "depends": "static: max_tokens_per_round",
        "per_step": lambda B, ctx, c, static: static,
        "tpu": "yes",
    },
    ("kv_cache.py", "kv_update_unified_prefix"): {
        "name": "KV-cache write, per token (x layers)",
        "depends": "tokens in the round (B)",
        "per_step": lambda B, ctx, c, static: B,
        "tpu": "yes",
    },
    ("attention.py", "default_ragged_paged_attention"): {
        "name": "ref. ragged attention, per seq (x layers)",
        "depends": "num_seqs (B)",
        "per_step": lambda B, ctx, c, static: B,
        "tpu": "no (Pallas kernel)",
    },
    ("attention.py", "default_ragged_paged_attention.<locals>._compute_attention_for_seq"): {
        "name": "ref. attention, per query block (1 tok)",
        "depends": "query tokens (1 in decode)",
        "per_step": lambda B, ctx, c, static: 1,
        "tpu": "no (Pallas kernel)",
    },
    (
        "attention.py",
        "default_ragged_paged_attention.<locals>._compute_attention_for_seq.<locals>._compute_attention_for_q_block",
    ): {
        "name": "ref. attention, per KV block (2 pages)",
        "depends": "ceil(kv_len / (2 * page_size))",
        "per_step": lambda B, ctx, c, static: math.ceil(ctx / (2 * c["page_size"])),
        "tpu": "no (Pallas kernel)",
    },
    ("jit_scheduler.py", "DecodeState.update_tokens"): {
        "name": "update_tokens, per sampled token",
        "depends": "tokens sampled (B)",
        "per_step": lambda B, ctx, c, static: B,
        "tpu": "yes",
    },
    ("jit_scheduler.py", "SequenceTable.free_pages_for_finished"): {
        "name": "free_pages_for_finished, per slot",
        "depends": "static: max_seqs",
        "per_step": lambda B, ctx, c, static: static,
        "tpu": "yes",
    },
    ("jit_scheduler.py", "SequenceTable.free_pages_for_finished.<locals>.dec_refcounts_for_seq"): {
        "name": "free_pages_for_finished, per page",
        "depends": "static: pages_per_seq, finished slots only",
        "per_step": lambda B, ctx, c, static: 0,
        "tpu": "yes",
    },
}

HLO_CLASSES = [
    # (substring of the XLA while's op_name, class); first match wins; "outer" is matched exactly below
    ("kv_update_unified_prefix", "kv_update_unified_prefix"),
    ("ragged_paged_attention", "reference ragged attention"),
    ("allocate_for_seq", "allocate_for_seq / _create_batch_info"),
    ("free_pages_for_finished", "free_pages_for_finished"),
    ("prng_keys_for", "threefry2x32 (fold_in of the sampling keys)"),
    ("categorical", "threefry2x32 (sampling's gumbel noise)"),
]
OUTER_OP_NAME = "jit(_run_generation_loop)/while"
UPDATE_TOKENS_OP_NAME = "jit(_run_generation_loop)/while/body/while"


def _subjaxprs(eqn):
    from jax._src import core

    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, core.Jaxpr):
                yield item


def _loop_site(eqn):
    """(file, line, function) of the innermost Levanter frame of the equation (else the innermost user frame)."""
    from jax._src import source_info_util

    frames = list(source_info_util.user_frames(eqn.source_info.traceback))
    for frame in frames:
        if f"{os.sep}levanter{os.sep}" in frame.file_name:
            return os.path.basename(frame.file_name), frame.start_line, frame.function_name
    if frames:
        f = frames[0]
        return os.path.basename(f.file_name), f.start_line, f.function_name
    return "?", 0, "?"


def jaxpr_loops(closed_jaxpr) -> list[dict]:
    """Every while/scan in the program, in order, with its nesting and source."""
    found = []

    def walk(jaxpr, parents: tuple, in_cond: bool):
        for eqn in jaxpr.eqns:
            prim = eqn.primitive.name
            if prim in ("while", "scan"):
                file, line, func = _loop_site(eqn)
                record = {
                    "primitive": prim,
                    "static_length": eqn.params.get("length") if prim == "scan" else None,
                    "file": file,
                    "line": line,
                    "function": func,
                    "key": (file, func),
                    "parents": parents,
                    "depth": len(parents),
                    "in_cond": in_cond,
                }
                found.append(record)
                for sub in _subjaxprs(eqn):
                    walk(sub, parents + ((file, func),), False)
            else:
                for sub in _subjaxprs(eqn):
                    walk(sub, parents, in_cond or prim == "cond")

    walk(closed_jaxpr.jaxpr, (), False)
    return found


def loop_table(loops: list[dict], B: int, ctx: int, c: dict) -> list[dict]:
    """Loops grouped by (nesting path, source): copies in the program, trip count, and body runs per decode
    iteration at B sequences of context ``ctx``: copies x its trip count x every enclosing loop's (the outer
    decode loop counts once per iteration)."""
    groups: dict[tuple, dict] = {}
    for rec in loops:
        gkey = (rec["parents"], rec["key"])
        if gkey not in groups:
            groups[gkey] = dict(rec, copies=0)
        groups[gkey]["copies"] += 1
    static_of = {g["key"]: g["static_length"] for g in groups.values()}

    def per_step(key):
        known = KNOWN_LOOPS.get(key)
        return known["per_step"](B, ctx, c, static_of.get(key)) if known else None

    rows = []
    for g in groups.values():
        known = KNOWN_LOOPS.get(g["key"])
        chain = [per_step(k) for k in (*g["parents"], g["key"])]
        runs = None if any(x is None for x in chain) else g["copies"] * math.prod(chain)
        rows.append(
            {
                "loop": ("  " * g["depth"]) + (known["name"] if known else f"UNKNOWN {g['function']}"),
                "kind": "fori (static)" if g["primitive"] == "scan" else "while",
                "depth": g["depth"],
                "copies": g["copies"],
                "trip_count": (
                    f"static {g['static_length']}" if g["static_length"] is not None else (known or {}).get("depends")
                ),
                "depends": (known or {}).get("depends"),
                "in_cond": g["in_cond"],
                "source": f"{g['file']}:{g['line']} {g['function'].split('.<locals>.')[-1]}",
                "function": g["function"],
                "body_runs_per_step": runs,
                "on_tpu": (known or {}).get("tpu", "?"),
                "known": known is not None,
            }
        )
    total = [r["body_runs_per_step"] for r in rows if r["depth"] > 0]
    tpu = [r["body_runs_per_step"] for r in rows if r["depth"] > 0 and r["on_tpu"] == "yes"]
    if all(x is not None for x in total):
        rows.append({"loop": "total inside the decode loop", "body_runs_per_step": sum(total), "total": True})
        rows.append({"loop": "  of which also on TPU", "body_runs_per_step": sum(tpu), "total": True})
    return rows


def steady_trips(table: list[dict]) -> dict:
    """Loop-body runs per decode iteration from :func:`loop_table`: the bookkeeping loops (also on TPU) and the
    reference attention's (a Pallas kernel on TPU); both None when a loop is not in ``KNOWN_LOOPS``."""
    inner = [r for r in table if not r.get("total") and r["depth"] > 0]
    unknown = [r["source"] for r in inner if not r["known"]]

    def total(on_tpu: bool):
        return None if unknown else sum(r["body_runs_per_step"] for r in inner if (r["on_tpu"] == "yes") == on_tpu)

    return {"serial_loop_trips": total(True), "attention_loop_trips": total(False), "unknown_loops": unknown}


def classify_hlo_while(op_name: str) -> str:
    if op_name == OUTER_OP_NAME:
        return "decode round (outer while_loop)"
    if op_name == UPDATE_TOKENS_OP_NAME:
        return "update_tokens"
    for needle, cls in HLO_CLASSES:
        if needle in op_name:
            return cls
    return "other: " + op_name
