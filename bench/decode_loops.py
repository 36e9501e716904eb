"""The serial loops of Levanter's decode program: found in its jaxpr, counted in StableHLO and compiled HLO.

Part of ``bench/decode_step.py`` (which see for how to run it; findings in docs/benchmarks.md, "Decode step").
``KNOWN_LOOPS`` is the table of the loops read in Levanter's source; ``tests/test_decode_step.py`` checks the tiny
model's decode round has exactly these.
"""

import math
import os
import re
import time
from collections import defaultdict
from pathlib import Path

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


def stablehlo_while_count(text: str) -> dict:
    """``stablehlo.while`` ops in the module, textually and with every func.call expanded."""
    funcs: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*func\.func (?:public |private )?@([\w.$-]+)\(", line)
        if m:
            current = funcs.setdefault(m.group(1), {"whiles": 0, "calls": defaultdict(int)})
            continue
        if current is None:
            continue
        current["whiles"] += line.count("stablehlo.while")
        for callee in re.findall(r"(?:func\.)?call @([\w.$-]+)\(", line):
            current["calls"][callee] += 1

    memo: dict[str, int] = {}

    def expanded(name: str) -> int:
        if name not in memo:
            f = funcs.get(name, {"whiles": 0, "calls": {}})
            memo[name] = f["whiles"] + sum(n * expanded(c) for c, n in f["calls"].items())
        return memo[name]

    return {"textual": sum(f["whiles"] for f in funcs.values()), "expanded": expanded("main")}


def hlo_whiles(text: str) -> list[dict]:
    """Every ``while`` of the compiled HLO: op_name, nesting (``while/body`` in the op_name), XLA's trip count."""
    out = []
    for line in text.splitlines():
        if " while(" not in line:
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        op_name = op.group(1) if op else ""
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
        out.append(
            {
                "op_name": op_name,
                "depth": op_name.count("/while/body"),
                "known_trip_count": int(trip.group(1)) if trip else None,
                "class": classify_hlo_while(op_name),
            }
        )
    return out


_COLLECTIVE = re.compile(
    r"= [^=]*? (all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(?:-start)?\("
)
_CALLED = re.compile(r"(?:body|condition|to_apply|calls|true_computation|false_computation)=%([\w.\-]+)")


def hlo_collectives_by_loop(text: str) -> dict[str, dict[str, int]]:
    """Collectives of the compiled HLO, by the class of their innermost enclosing while (``-`` outside any):
    a collective inside a serial loop pays its latency once per iteration."""
    comps: dict[str, list[str]] = {}
    current, entry = None, None
    for line in text.splitlines():
        m = re.match(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$", line)
        if m:
            current = m.group(2)
            comps[current] = []
            entry = current if m.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    found: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    seen = set()

    def walk(comp: str, innermost: str) -> None:
        for line in comps.get(comp, []):
            if m := _COLLECTIVE.search(line):
                found[innermost][m.group(1)] += 1
            called = _CALLED.findall(line)
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            if branches:
                called += [b.strip().lstrip("%") for b in branches.group(1).split(",")]
            inner = innermost
            if " while(" in line:
                op = re.search(r'op_name="([^"]*)"', line)
                inner = classify_hlo_while(op.group(1) if op else "")
            for callee in called:
                if (callee, inner) not in seen:
                    seen.add((callee, inner))
                    walk(callee, inner)

    if entry is not None:
        walk(entry, "-")
    return {k: dict(v) for k, v in found.items()}


def classify_hlo_while(op_name: str) -> str:
    if op_name == OUTER_OP_NAME:
        return "decode round (outer while_loop)"
    if op_name == UPDATE_TOKENS_OP_NAME:
        return "update_tokens"
    for needle, cls in HLO_CLASSES:
        if needle in op_name:
            return cls
    return "other: " + op_name


def analyze_loops(setup, seam: str, args, B: int, ctx: int) -> tuple[dict, object]:
    """Trace, lower and (unless --no_compile) compile one decode call of ``rounds`` iterations; the loops in it."""
    from levanter.inference import engine as engine_mod

    c = setup.engine_config
    gen_state, engine = setup.gen_state_for_tracing()
    T, R = c.imputed_max_tokens_per_round, args.rounds
    t0 = time.perf_counter()
    traced = engine_mod._run_generation_loop.trace(gen_state, setup.model, setup.sampler, T, R)
    t1 = time.perf_counter()
    loops = jaxpr_loops(traced.jaxpr)
    lowered = traced.lower()
    stablehlo = lowered.as_text()
    t2 = time.perf_counter()
    cfg = {"page_size": c.page_size, "max_seqs": c.max_seqs, "T": T}
    result = {
        "seam": seam,
        "trace_s": t1 - t0,
        "lower_s": t2 - t1,
        "jaxpr_loops": len(loops),
        "unknown_loops": [f"{r['file']}:{r['line']} {r['function']}" for r in loops if r["key"] not in KNOWN_LOOPS],
        "table": loop_table(loops, B, ctx, cfg),
        "table_B": B,
        "table_context": ctx,
        "stablehlo_whiles": stablehlo_while_count(stablehlo),
    }
    compiled = None
    if not args.no_compile:
        compiled = lowered.compile()
        result["compile_s"] = time.perf_counter() - t2
        hlo = compiled.as_text()
        whiles = hlo_whiles(hlo)
        counts: dict[str, int] = defaultdict(int)
        trips: dict[str, set] = defaultdict(set)
        for w in whiles:
            counts[w["class"]] += 1
            trips[w["class"]].add(w["known_trip_count"])
        result["hlo_whiles"] = len(whiles)
        collectives = hlo_collectives_by_loop(hlo)
        result["hlo_collectives_by_loop"] = collectives
        result["hlo_classes"] = [
            {
                "class": k,
                "count": v,
                "known_trip_counts": sorted(trips[k], key=lambda x: (x is None, x)),
                "collectives_inside": sum(collectives.get(k, {}).values()),
            }
            for k, v in counts.items()
        ]
        if args.hlo_dir:
            Path(args.hlo_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.hlo_dir) / f"decode_round_{seam}.hlo.txt").write_text(hlo)
    if args.hlo_dir:
        Path(args.hlo_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.hlo_dir) / f"decode_round_{seam}.stablehlo.txt").write_text(stablehlo)
    del engine
    return result, compiled
