"""Decode-step diagnostics: serial loops in one decode round of Levanter's InferenceEngine, and step time vs batch.

    # tiny model, CPU, ~3 min on 2 cores: loops table, step time at 4 batch sizes with and without the seam,
    # token identity, the KV write alone; JSON to bench/results/decode_step.json (docs/decode_step.md)
    uv run python bench/decode_step.py --config_path config/sampler/tiny_local.yaml --batch_sizes 1,8,64,256 \\
        --repeats 7 --seams none,scatter,scatter_plain

    # loops only (2-4 min), for a TPU config: Llama-3-8B shapes, abstract weights (nothing is allocated),
    # partitioned as on a v5p host's 4 chips (collectives inside loops are reported)
    XLA_FLAGS=--xla_force_host_platform_device_count=4 uv run python bench/decode_step.py \\
        --config_path config/sampler/llama8b_v5p16_128x2048.yaml --loops_only --seams none,scatter \\
        --table_batch 64 --context 1088 --trainer.model_axis_size=4 --out /tmp/decode_step_llama8b_loops.json

    # any sampler flag after the bench's own flags goes to the config (draccus), e.g. --engine.max_rounds=4;
    # on a TPU host: --random_weights --trainer.model_axis_size=4 --hlo_dir DIR times the 8B config with random
    # weights and keeps the compiled TPU programs

What it does, for the sampler config given (``levanter_multihost.config.SampleLmMultihostConfig``; the model is
loaded as the sampler loads it, ``levanter_multihost.model_loading``, with ``--trainer.model_axis_size=1`` unless
overridden, or built with random weights / abstract shapes when the checkpoint is not a local directory):

1. Loops. Traces ``levanter.inference.engine._run_generation_loop`` (the engine's decode program: up to
   ``max_rounds`` decode iterations of ``max_tokens_per_round`` packed tokens) on a fresh engine's ``gen_state``,
   walks its jaxpr for every ``while``/``scan`` (``lax.fori_loop`` with static bounds becomes a ``scan``), traces
   each to the Levanter source line that made it, and names it from a table of the loops read in Levanter's
   source (an unknown loop is reported as such). Then lowers it (StableHLO ``while`` count, calls expanded) and
   compiles it (XLA ``while`` count, each classified by its ``op_name``, with XLA's known trip count).
2. Step time vs batch size. For each ``B`` in ``--batch_sizes``: a fresh engine, B prompts admitted (one
   prefill), then the compiled decode program called once with ``max_rounds`` = R (``--rounds``, default the
   config's) and once with 1 round, timed to ``block_until_ready``; ``--repeats`` times after ``--warmup``.
   Every round decodes exactly B tokens (no sequence can finish: ``max_num_tokens`` = ``max_seq_len``, no stop
   sequence). Step = median(call of R) / R; slope = (median(R) - median(1)) / (R - 1), the step without the
   per-call cost; also the fastest repeat and this process's CPU seconds. tokens/s = B / step. The variants
   alternate inside each repeat; their ratios are taken within a repeat.
3. The seam (``bench/decode_seam.py``): the same with Levanter's per-token KV-cache write loop swapped for one
   scatter (``--seams none,scatter``; the first is the baseline). Identity: the decode outputs and the KV cache
   after the timed rounds are compared bit for bit with the baseline's, and ``InferenceEngine.generate`` on
   ``--check_prompts`` prompts (greedy, ``--check_new_tokens`` new tokens, crossing page boundaries) must give
   the same token ids (greedy and at ``--check_temperature``). And the replaced function alone, loop vs scatter,
   on one layer's cache shape for K = each batch size.
"""

import os

# as the sampler does (levanter_multihost.seams.checks_as_nan): Equinox's error_if checks as NaN poisoning, not
# host callbacks, so this measures the program the sampler runs
os.environ.setdefault("EQX_ON_ERROR", "nan")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import dataclasses
import hashlib
import math
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, RESULTS, TINY_CONFIG, format_table, machine, write_json

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

KNOWN_SHAPES = {
    # HF-style shapes of checkpoints that cannot be read offline (as levanter_multihost.plan knows them)
    r"llama-?3(\.\d)?-8b": {
        "hidden_dim": 4096,
        "intermediate_dim": 14336,
        "num_layers": 32,
        "num_heads": 32,
        "num_kv_heads": 8,
        "vocab": 128256,
    },
}


def parse_args():
    return parse_args_from(sys.argv[1:])


def parse_args_from(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_path", default=str(TINY_CONFIG))
    parser.add_argument("--batch_sizes", default="1,8,64,256")
    parser.add_argument("--rounds", type=int, default=None, help="Decode iterations per timed call (max_rounds).")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seams", default="none,scatter", help="Variants: none, scatter, scatter_plain.")
    parser.add_argument("--check_prompts", type=int, default=256)
    parser.add_argument("--check_temperature", type=float, default=0.7, help="Also compare sampled tokens.")
    parser.add_argument("--check_new_tokens", type=int, default=None, help="Default: as many as max_seq_len allows.")
    parser.add_argument("--context", type=int, default=None, help="Context length for the per-step loop counts.")
    parser.add_argument("--table_batch", type=int, default=None, help="B for the per-step loop counts.")
    parser.add_argument("--loops_only", action="store_true", help="Part 1 only (no timing, no identity check).")
    parser.add_argument("--no_compile", action="store_true", help="Loops: jaxpr and StableHLO only.")
    parser.add_argument("--random_weights", action="store_true", help="Random weights even for a local checkpoint.")
    parser.add_argument("--prompt_len", type=int, default=8, help="Random-token prompt length (no tokenizer).")
    parser.add_argument("--hlo_dir", default=None, help="Write the StableHLO and compiled HLO texts here.")
    parser.add_argument("--out", default=str(RESULTS / "decode_step.json"))
    args, rest = parser.parse_known_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.seams = [s for s in args.seams.split(",") if s]
    args.config_args = rest
    return args


def load_config(args):
    import draccus

    from levanter_multihost.config import SampleLmMultihostConfig

    config = draccus.parse(
        SampleLmMultihostConfig,
        config_path=args.config_path,
        args=["--trainer.model_axis_size=1", *args.config_args],  # later flags win
    )
    return config


# ------------------------------------------------------------------------------------------- model and engine --


class Setup:
    """Model, tokenizer (or None), sampler, and how to make a fresh engine or an abstract gen_state."""

    def __init__(self, config, args):
        import jax

        from levanter_multihost import model_loading

        self.config = config
        self.engine_config = config.engine
        self.abstract = False
        ref = config.hf_checkpoint
        local = ref is not None and os.path.isdir(ref.model_name_or_path)
        self.tokenizer = None
        if local:
            from levanter.compat.hf_checkpoints import RepoRef, load_tokenizer

            from levanter_multihost.runplan import ModelSource

            checkpoint = model_loading.resolve_location(ref.model_name_or_path, "hf_checkpoint")
            self.tokenizer = load_tokenizer(model_loading.resolve_location(config.tokenizer or checkpoint, "tokenizer"))
        if local and not args.random_weights:
            source = ModelSource(RepoRef(checkpoint, ref.revision), None, config.model, config.trainer)
            self.model = model_loading.load_model(source, self.tokenizer)
            self.source = f"checkpoint {ref.model_name_or_path}"
        else:
            model_config, vocab = self._model_config(config, local)
            self.abstract = args.loops_only and not local
            self.model = build_random_model(model_config, vocab, config.trainer, abstract=self.abstract)
            self.source = ("abstract shapes of " if self.abstract else "random weights, shape of ") + str(
                ref.model_name_or_path if ref else "config.model"
            )
        from levanter.layers.sampler import Sampler

        self.sampler = Sampler(self.model.Vocab)
        jax.block_until_ready(self.model) if not self.abstract else None

    @staticmethod
    def _model_config(config, local):
        import haliax as hax
        from levanter.models.llama import LlamaConfig

        ref = config.hf_checkpoint
        if local:
            converter = config.model.hf_checkpoint_converter(ref_checkpoint=os.path.abspath(ref.model_name_or_path))
            model_config = converter.config_from_hf_checkpoint(os.path.abspath(ref.model_name_or_path))
            import json

            vocab = json.loads((Path(ref.model_name_or_path) / "config.json").read_text())["vocab_size"]
            return model_config, hax.Axis("vocab", vocab)
        name = (ref.model_name_or_path if ref else "").lower()
        shape = next((s for pattern, s in KNOWN_SHAPES.items() if re.search(pattern, name)), None)
        if shape is None:
            raise SystemExit(f"No config.json for {name!r} offline and not a known shape ({list(KNOWN_SHAPES)}).")
        shape = dict(shape)
        vocab = shape.pop("vocab")
        return LlamaConfig(seq_len=config.engine.max_seq_len, **shape), hax.Axis("vocab", vocab)

    def fresh_engine(self):
        from levanter.inference.engine import InferenceEngine

        return InferenceEngine.from_model_with_config(
            model=self.model, tokenizer=self.tokenizer, config=self.engine_config
        )

    def gen_state_for_tracing(self):
        """A fresh engine's gen_state, or its abstract shapes (nothing allocated) for an abstract model."""
        if not self.abstract:
            engine = self.fresh_engine()
            return engine.gen_state, engine
        import equinox as eqx
        from levanter.inference.engine import GenState
        from levanter.inference.jit_scheduler import DecodeState
        from levanter.inference.page_table import PageTable

        c = self.engine_config
        if c.max_pages is None:
            raise SystemExit("--loops_only with abstract weights needs engine.max_pages set in the config.")
        # as InferenceEngine.from_model_with_config builds it, with the KV cache as shapes only
        table = PageTable.init(c.max_pages, c.max_seqs, c.page_size, c.max_pages_per_seq)
        cache = eqx.filter_eval_shape(lambda m: m.initial_cache(table.spec(), dtype=c.compute_dtype), self.model)
        cache = with_shardings(cache, self.config.trainer.compute_axis_mapping)
        decode_state = DecodeState.init(
            table,
            max_stop_seqs=c.max_stop_seqs,
            max_stop_tokens=c.max_stop_tokens,
            max_queued_tokens=c.max_queued_tokens,
            enable_logprobs=c.enable_logprobs,
        )
        return GenState(cache=cache, decode_state=decode_state), None


def build_random_model(model_config, vocab, trainer, abstract: bool):
    import equinox as eqx
    import haliax as hax
    import jax
    from haliax.partitioning import round_axis_for_partitioning

    mapping = trainer.compute_axis_mapping
    vocab = round_axis_for_partitioning(vocab, mapping)

    def build(key):
        return trainer.mp.cast_to_compute(model_config.build(vocab, key=key))

    if abstract:
        return with_shardings(eqx.filter_eval_shape(build, jax.random.PRNGKey(0)), mapping)
    return hax.named_jit(build, axis_resources=mapping)(jax.random.PRNGKey(0))


def with_shardings(abstract_tree, mapping):
    """Abstract arrays carrying the shardings the axis mapping gives them on the current mesh (as loading the
    model or ``named_jit(model.initial_cache)`` would place them), so the program is partitioned as for real."""
    import haliax as hax
    import haliax.tree_util as htu
    import jax
    from haliax import NamedArray

    shardings = hax.partitioning.infer_resource_partitions(abstract_tree, mapping, preserve_existing_shardings=False)

    def attach(node, sharding):
        if isinstance(node, NamedArray) and sharding is not None:
            a = node.array
            return NamedArray(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), node.axes)
        return node

    return htu.tree_map(attach, abstract_tree, shardings, is_leaf=lambda x: isinstance(x, NamedArray))


# ---------------------------------------------------------------------------------------------------- loops --


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


# ------------------------------------------------------------------------------------------------- timing --


def prompt_token_ids(setup, config, n: int, prompt_len: int) -> list[list[int]]:
    """``n`` prompts: the config's prompts file (tokenized as the sampler does, cycled) or random tokens."""
    import numpy as np

    if setup.tokenizer is not None and config.prompts_file:
        path = config.prompts_file if os.path.isabs(config.prompts_file) else str(REPO / config.prompts_file)
        texts = [line for line in Path(path).read_text().splitlines() if line.strip()]
        ids = [list(t) for t in setup.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        return [ids[i % len(ids)] for i in range(n)]
    rng = np.random.default_rng(0)
    vocab = setup.model.Vocab.size
    return [rng.integers(3, vocab, prompt_len).tolist() for _ in range(n)]


def make_requests(prompts: list[list[int]], max_num_tokens: int, temperature: float = 0.0):
    import jax
    import jax.numpy as jnp
    from levanter.inference.engine import Request
    from levanter.inference.jit_scheduler import SeqDecodingParams

    return [
        Request(
            prompt_tokens=list(p),
            request_id=i,
            decode_params=SeqDecodingParams(
                max_num_tokens=jnp.array(max_num_tokens, dtype=jnp.int32),
                stop_tokens=None,
                temperature=jnp.array(temperature, dtype=jnp.float32),
                key=jax.random.fold_in(jax.random.PRNGKey(0), i),
            ),
            n_generations=1,
        )
        for i, p in enumerate(prompts)
    ]


def admit(setup, prompts: list[list[int]]):
    """A fresh engine with ``prompts`` admitted (one prefill); every prompt must fit in one admission."""
    import jax

    engine = setup.fresh_engine()
    engine.enqueue_requests(make_requests(prompts, setup.engine_config.max_seq_len))
    engine._admit_from_queue()
    if engine.request_queue:
        raise SystemExit(
            f"{len(engine.request_queue)} of {len(prompts)} prompts did not fit in one admission: raise "
            "engine.max_seqs / max_seqs_in_prefill / max_prefill_size / max_pages, or lower the batch size."
        )
    jax.block_until_ready(engine.gen_state)
    return engine


def timed_call(compiled, engine, setup):
    import jax

    cpu = time.process_time()
    start = time.perf_counter()
    state, outputs = compiled(engine.gen_state, setup.model, setup.sampler)
    jax.block_until_ready((state, outputs))
    seconds = time.perf_counter() - start
    engine.gen_state = state
    return seconds, time.process_time() - cpu, outputs


def digest(*trees) -> str:
    import jax
    import numpy as np

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(trees)):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def run_once(setup, compiled_r, compiled_1, prompts, rounds: int) -> dict:
    """Fresh engine, ``prompts`` admitted, then one call of ``rounds`` decode iterations and one of 1: seconds,
    and a digest of what they decoded and of the KV cache after them."""
    import jax

    B = len(prompts)
    engine = admit(setup, prompts)
    t_r, cpu_r, out_r = timed_call(compiled_r, engine, setup)
    t_1, cpu_1, out_1 = timed_call(compiled_1, engine, setup)
    got = int(jax.device_get(out_r.num_tokens))
    if got != B * rounds:
        raise SystemExit(f"B={B}: the {rounds}-round call decoded {got} tokens, not B x R = {B * rounds}")
    if int(jax.device_get(out_1.num_tokens)) != B:
        raise SystemExit(f"B={B}: the 1-round call did not decode B tokens")
    d = digest(out_r.tokens, out_r.slot_ids, out_1.tokens, engine.gen_state.cache)
    return {"R": t_r, "1": t_1, "cpu_R": cpu_r, "cpu_1": cpu_1, "digest": d}


def time_all(setup, programs: dict, prompts_all, args) -> dict:
    """Every (batch size, variant), repeated; within a repeat the variants alternate (order rotated) so that
    other users' load on the machine falls on all of them alike. Returns rows per variant."""
    import numpy as np

    R = args.rounds
    names = list(programs)
    samples = {(v, B): [] for v in names for B in args.batch_sizes}
    for rep in range(args.warmup + args.repeats):
        for B in args.batch_sizes:
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for v in order:
                run = run_once(setup, programs[v]["R"], programs[v]["1"], prompts_all[:B], R)
                run["warmup"] = rep < args.warmup
                samples[(v, B)].append(run)
        print(f"repeat {rep + 1}/{args.warmup + args.repeats} done" + (" (warm-up)" if rep < args.warmup else ""))
    rows: dict[str, list] = {v: [] for v in names}
    base = names[0]
    for B in args.batch_sizes:
        for v in names:
            runs = [r for r in samples[(v, B)] if not r["warmup"]]
            base_runs = [r for r in samples[(base, B)] if not r["warmup"]]
            times_r, times_1 = [r["R"] for r in runs], [r["1"] for r in runs]
            med_r, med_1 = statistics.median(times_r), statistics.median(times_1)
            step = med_r / R
            slope = (med_r - med_1) / (R - 1) if R > 1 else None
            cpu_r = statistics.median(r["cpu_R"] for r in runs)
            digests = {r["digest"] for r in samples[(v, B)]}
            rows[v].append(
                {
                    "B": B,
                    "rounds": R,
                    "call_R_s": times_r,
                    "call_1_s": times_1,
                    "step_s": step,
                    # other users' load only ever adds time: the fastest repeat is the least disturbed one
                    "step_min_s": min(times_r) / R,
                    "min_ratio_vs_base": min(times_r) / min(r["R"] for r in base_runs),
                    "slope_step_s": slope,
                    "per_call_s": med_1 - slope if slope is not None else None,
                    "tokens_per_s": B / step,
                    "tokens_per_s_slope": B / slope if slope else None,
                    "cv_R": float(np.std(times_r) / np.mean(times_r)) if len(times_r) > 1 else None,
                    # CPU seconds of this process (all its threads) per decode iteration: hardly moved by other
                    # users' load, unlike the wall clock
                    "cpu_R_s": [r["cpu_R"] for r in runs],
                    "cpu_step_s": cpu_r / R,
                    "cpu_ratio_vs_base": statistics.median(a["cpu_R"] / b["cpu_R"] for a, b in zip(runs, base_runs)),
                    # within-repeat ratio to the baseline (same repeat, same B, adjacent in time), median
                    "step_ratio_vs_base": statistics.median(a["R"] / b["R"] for a, b in zip(runs, base_runs)),
                    "digest": samples[(v, B)][-1]["digest"],
                    "digests_stable": len(digests) == 1,
                    "decode_identical_to_base": digests == {r["digest"] for r in samples[(base, B)]},
                }
            )
    return rows


def micro_kv_update(setup, args) -> list[dict]:
    """The replaced function alone, on one layer's KV-cache shape: Levanter's per-token loop vs the scatter
    variants, for K = each batch size (distinct destinations, as in decode). The buffer is donated and fed
    back; 50 back-to-back calls per sample, median of 7 samples, variants alternating."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from decode_seam import VARIANTS, check_kv_update_seam, make_kv_update_scatter

    module, original = check_kv_update_seam()
    c = setup.engine_config
    layer_cache = jax.tree.leaves(setup.fresh_engine().gen_state.cache)[0]
    num_pages, page_size, two_h, dim = layer_cache.shape
    T = c.imputed_max_tokens_per_round
    fns = {"none": original, **{v: make_kv_update_scatter(module, dedupe=d) for v, d in VARIANTS.items()}}
    rng = np.random.default_rng(0)
    rows = []
    for K in args.batch_sizes:
        flat = rng.permutation(num_pages * page_size)[:T]
        t_pages, t_slots = jnp.asarray(flat // page_size, jnp.int32), jnp.asarray(flat % page_size, jnp.int32)
        new_k = jnp.asarray(rng.standard_normal((T, two_h // 2, dim)), layer_cache.dtype)
        new_v = jnp.asarray(rng.standard_normal((T, two_h // 2, dim)), layer_cache.dtype)
        bufs = {name: jnp.zeros(layer_cache.shape, layer_cache.dtype) for name in fns}
        samples = {name: [] for name in fns}
        k = jnp.int32(K)
        for rep in range(8):
            for name, fn in fns.items():
                start = time.perf_counter()
                for _ in range(50):
                    bufs[name] = fn(bufs[name], t_pages, t_slots, new_k, new_v, k)
                jax.block_until_ready(bufs[name])
                if rep > 0:
                    samples[name].append((time.perf_counter() - start) / 50)
        same = all(np.array_equal(np.asarray(bufs["none"]), np.asarray(b)) for b in bufs.values())
        row = {"K": K, "identical": same}
        for name, ts in samples.items():
            row[f"{name}_us"] = statistics.median(ts) * 1e6
        for name in fns:
            row[f"{name}_ratio"] = row[f"{name}_us"] / row["none_us"]
        rows.append(row)
    return rows


def generate_tokens(setup, prompts, new_tokens: int, temperature: float = 0.0) -> list[list[int]]:
    """``InferenceEngine.generate`` on a fresh engine: the token ids of every sequence."""
    engine = setup.fresh_engine()
    max_tokens = [len(p) + new_tokens for p in prompts]
    requests = make_requests(prompts, 0, temperature)
    import jax.numpy as jnp

    requests = [
        dataclasses.replace(
            r, decode_params=dataclasses.replace(r.decode_params, max_num_tokens=jnp.array(m, dtype=jnp.int32))
        )
        for r, m in zip(requests, max_tokens)
    ]
    result = engine.generate(requests)
    return [list(map(int, t)) for t in result.tokens]


# --------------------------------------------------------------------------------------------------- main --

LOOP_COLUMNS = [
    ("loop", "loop", "{}"),
    ("kind", "kind", "{}"),
    ("copies", "copies", "{}"),
    ("trip_count", "trip count", "{}"),
    ("body_runs_per_step", "body runs/iter", "{:.0f}"),
    ("source", "source", "{}"),
    ("on_tpu", "on TPU", "{}"),
]
MICRO_COLUMNS = [
    ("K", "K", "{}"),
    ("none_us", "loop us", "{:.1f}"),
    ("scatter_us", "scatter us", "{:.1f}"),
    ("scatter_plain_us", "plain us", "{:.1f}"),
    ("scatter_ratio", "scatter/loop", "{:.2f}"),
    ("scatter_plain_ratio", "plain/loop", "{:.2f}"),
    ("identical", "identical", "{}"),
]
HLO_COLUMNS = [
    ("class", "compiled HLO while", "{}"),
    ("count", "count", "{}"),
    ("known_trip_counts", "XLA trip counts", "{}"),
    ("collectives_inside", "collectives inside", "{}"),
]
TIME_COLUMNS = [
    ("B", "B", "{}"),
    ("step_ms", "step ms", "{:.2f}"),
    ("step_min_ms", "min ms", "{:.2f}"),
    ("slope_ms", "slope ms", "{:.2f}"),
    ("per_call_ms", "per call ms", "{:.2f}"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
    ("cv_R", "cv", "{:.2f}"),
]


def main() -> None:
    args = parse_args()
    config = load_config(args)
    import jax
    from decode_seam import PINNED_LEVANTER, seam_variant
    from levanter.inference import engine as engine_mod

    from levanter_multihost import model_loading

    c = config.engine
    args.rounds = args.rounds or c.max_rounds
    T = c.imputed_max_tokens_per_round
    started = time.time()
    print(f"backend {jax.default_backend()}, {len(jax.devices())} device(s); config {args.config_path}")
    with model_loading.on_local_mesh(config.trainer):
        setup = Setup(config, args)
        layers = setup.model.config.num_layers if hasattr(setup.model, "config") else None
        print(f"model: {setup.source}, {layers} layers; engine: {c}")
        if args.loops_only:
            B_table, ctx = min(c.max_seqs, T), args.context or c.max_seq_len // 2
            prompts_all = None
        else:
            if max(args.batch_sizes) > min(c.max_seqs, T, c.max_seqs_in_prefill):
                raise SystemExit("a batch size exceeds engine.max_seqs / max_tokens_per_round / max_seqs_in_prefill")
            n = max(max(args.batch_sizes), args.check_prompts)
            prompts_all = prompt_token_ids(setup, config, n, args.prompt_len)
            longest = max(len(p) for p in prompts_all)
            if longest + 1 + args.rounds + 1 > c.max_seq_len:
                raise SystemExit(
                    f"prompts of up to {longest} tokens + {args.rounds + 2} decoded do not fit max_seq_len "
                    f"{c.max_seq_len}: lower --rounds"
                )
            B_table = max(args.batch_sizes)
            ctx = args.context or round(statistics.mean(len(p) for p in prompts_all) + 1 + args.rounds / 2)

        B_table = args.table_batch or B_table
        variants, programs = {}, {}
        reference_tokens = None
        for seam in args.seams:
            with seam_variant(seam):
                print(f"\n=== seam: {seam} ===")
                loops, compiled_r = analyze_loops(setup, seam, args, B_table, ctx)
                print(
                    f"loops: {loops['jaxpr_loops']} in the jaxpr, StableHLO whiles {loops['stablehlo_whiles']}, "
                    f"compiled HLO whiles {loops.get('hlo_whiles')}; unknown: {loops['unknown_loops'] or 'none'}"
                )
                print(f"(body runs per decode iteration at B={B_table}, context {ctx} tokens)")
                print(format_table(loops["table"], LOOP_COLUMNS))
                if "hlo_classes" in loops:
                    print(format_table(loops["hlo_classes"], HLO_COLUMNS))
                    print(f"collectives by innermost loop ('-': none): {loops['hlo_collectives_by_loop']}")
                variant = {"loops": loops}
                variants[seam] = variant
                if args.loops_only:
                    continue
                gen_state, engine = setup.gen_state_for_tracing()
                t0 = time.perf_counter()
                compiled_1 = engine_mod._run_generation_loop.trace(gen_state, setup.model, setup.sampler, T, 1)
                compiled_1 = compiled_1.lower().compile()
                variant["compile_1_round_s"] = time.perf_counter() - t0
                del engine, gen_state
                programs[seam] = {"R": compiled_r, "1": compiled_1}
                # identity through the engine's public path: prefill and decode both use the swapped write
                n_check = args.check_prompts
                new = args.check_new_tokens or (c.max_seq_len - max(len(p) for p in prompts_all[:n_check]))
                variant["generate"] = {}
                for temperature in (0.0, args.check_temperature):
                    t0 = time.perf_counter()
                    tokens = generate_tokens(setup, prompts_all[:n_check], new, temperature)
                    reference_tokens = reference_tokens or {}
                    reference_tokens.setdefault(temperature, tokens)
                    same = [a == b for a, b in zip(tokens, reference_tokens[temperature], strict=True)]
                    label = "greedy" if temperature == 0 else f"temperature {temperature}"
                    variant["generate"][label] = {
                        "prompts": n_check,
                        "new_tokens": new,
                        "temperature": temperature,
                        "seconds_with_compile": time.perf_counter() - t0,
                        "tokens": sum(len(t) for t in tokens),
                        "digest": hashlib.sha256(repr(tokens).encode()).hexdigest(),
                        "identical_sequences": sum(same),
                        "identical": all(same),
                    }
                    print(
                        f"generate: {n_check} prompts x {new} new tokens ({label}), identical to {args.seams[0]}: "
                        f"{all(same)} ({sum(same)}/{n_check})"
                    )

        summary, micro = [], None
        if not args.loops_only:
            print(f"\n=== timing: {args.warmup} warm-up + {args.repeats} repeats, variants alternating ===")
            rows = time_all(setup, programs, prompts_all, args)
            micro = micro_kv_update(setup, args)
            print(f"\n=== the KV-cache write alone (one layer, T = {T} rows, K valid) ===")
            print(format_table(micro, MICRO_COLUMNS))
            base_name = args.seams[0]
            print(f"\n=== step time vs batch size ({jax.default_backend()}, {os.cpu_count()} cores) ===")
            for seam in args.seams:
                variants[seam]["timing"] = rows[seam]
                table = []
                for r in rows[seam]:
                    entry = {
                        "seam": seam,
                        "B": r["B"],
                        "step_ms": r["step_s"] * 1e3,
                        "step_min_ms": r["step_min_s"] * 1e3,
                        "min_ratio_vs_base": r["min_ratio_vs_base"],
                        "slope_ms": (r["slope_step_s"] or float("nan")) * 1e3,
                        "per_call_ms": (r["per_call_s"] or float("nan")) * 1e3,
                        "tokens_per_s": r["tokens_per_s"],
                        "cv_R": r["cv_R"],
                        "step_ratio_vs_base": r["step_ratio_vs_base"],
                        "cpu_step_ms": r["cpu_step_s"] * 1e3,
                        "cpu_ratio_vs_base": r["cpu_ratio_vs_base"],
                        "decode_identical_to_base": r["decode_identical_to_base"],
                        "generate_identical_to_base": all(
                            g["identical"] for g in variants[seam]["generate"].values()
                        ),
                    }
                    table.append(entry)
                    summary.append(entry)
                print(f"-- {seam}")
                print(
                    format_table(
                        table,
                        TIME_COLUMNS
                        + [
                            ("step_ratio_vs_base", f"step / {base_name}", "{:.3f}"),
                            ("min_ratio_vs_base", f"min / {base_name}", "{:.3f}"),
                            ("cpu_step_ms", "CPU ms/step", "{:.2f}"),
                            ("cpu_ratio_vs_base", f"CPU / {base_name}", "{:.3f}"),
                            ("decode_identical_to_base", "cache+tokens identical", "{}"),
                        ],
                    )
                )
    write_json(
        args.out,
        {
            "bench": "decode_step",
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seconds": time.time() - started,
            "machine": machine(),
            "backend": jax.default_backend(),
            "levanter_pinned": PINNED_LEVANTER,
            "args": dict(vars(args)),
            "model": setup.source,
            "engine": {f.name: str(getattr(c, f.name)) for f in dataclasses.fields(c)},
            "variants": variants,
            "summary": summary,
            "kv_update_micro": micro,
        },
    )


if __name__ == "__main__":
    main()
