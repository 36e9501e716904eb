"""Engine vs Hugging Face: tokens/s of this pipeline on 1 host vs ``transformers`` ``generate``, same model/prompts.

    # torch is the optional `bench` extra (torch==2.13.0, CPU); on this machine: .venv/bin/python -m pip install torch==2.13.0
    uv run python bench/engine_vs_hf.py                  # ~3 min on 2 cores; JSON to bench/results/engine_vs_hf.json
    # torch elsewhere (pip install --target /tmp/bench_torch torch==2.13.0), leaving the shared venv alone:
    uv run python bench/engine_vs_hf.py --prompts 512 --hf_batch_sizes 64,512 --torch_path /tmp/bench_torch

Same tiny checkpoint (``assets/tiny-addition``, float32), the same ``--prompts`` addition prompts (tokenized without
special tokens, as the sampler does), the same ``--max_new_tokens`` (default 6), greedy, on one core each:

* pipeline: ``levanter_multihost.sample_lm_multihost`` on 1 emulated host (1 CPU device, pinned to core 0), engine
  of 256 slots (``max_seqs = max_tokens_per_round = max_seqs_in_prefill = 256``, so batches of 256), warm
  compilation cache (a first run fills it). Tokens/s three ways: / generation (summary.json ``prefill_s +
  decode_s``, compile excluded), / ``generate_s`` (compile, i.e. tracing and loading the engine's programs from the
  cache, included), / the launcher's wall clock (process start, model load, ... exit).
* Hugging Face: ``AutoModelForCausalLM.generate`` (transformers 4.57.6, torch CPU, ``torch.set_num_threads(1)``,
  pinned to core 0), left padding, ``do_sample=False``, no EOS stop (``eos_token_id=None``) and no
  ``begin_suppress_tokens``, so it generates exactly ``max_new_tokens`` like the pipeline; per batch size, one
  small warm-up call, then every batch timed. Tokens/s: / the ``generate`` calls' time, and / the worker's wall
  clock (Python start, import torch, load, generate).

Ratios are pipeline / HF, per repeat (they alternate), median. Also checked: greedy outputs token-identical,
prompt by prompt (a cross-check of the engine's paged attention and sampling against an independent
implementation).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def hf_worker(args) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})
    if args.torch_path:
        sys.path.insert(0, args.torch_path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    prompts = Path(args.prompts_path).read_text().splitlines()
    tokenizer = AutoTokenizer.from_pretrained(args.hf_checkpoint)
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model = AutoModelForCausalLM.from_pretrained(args.hf_checkpoint, torch_dtype=torch.float32).eval()
    gen = model.generation_config
    gen.eos_token_id = None
    gen.begin_suppress_tokens = None
    gen.suppress_tokens = None
    gen.pad_token_id = pad
    gen.do_sample = False
    gen.temperature, gen.top_k, gen.top_p = None, None, None
    loaded = time.perf_counter()

    def generate(batch: list[str], new_tokens: int) -> list[list[int]]:
        enc = tokenizer(batch, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=0, generation_config=gen)
        return out[:, enc["input_ids"].shape[1] :].tolist()

    results = {}
    for batch_size in args.batch_sizes:
        generate(prompts[: min(batch_size, 8)], 2)  # warm-up
        start = time.perf_counter()
        outputs = []
        for i in range(0, len(prompts), batch_size):
            outputs.extend(generate(prompts[i : i + batch_size], args.max_new_tokens))
        seconds = time.perf_counter() - start
        results[str(batch_size)] = {
            "seconds": seconds,
            "tokens": sum(len(o) for o in outputs),
            "outputs": outputs,
        }
    print(
        "RESULT "
        + json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "startup_and_load_s": loaded - args.t0,
                "results": results,
            }
        ),
        flush=True,
    )


def run_hf(args, prompts_path: Path) -> dict:
    here = Path(__file__).resolve()
    start = time.time()
    command = [
        sys.executable,
        str(here),
        "--hf_worker",
        "--prompts_path",
        str(prompts_path),
        "--hf_checkpoint",
        args.hf_checkpoint,
        "--max_new_tokens",
        str(args.max_new_tokens),
        "--hf_batch_sizes",
        args.hf_batch_sizes,
        "--core",
        str(args.core),
        "--t0",
        repr(time.perf_counter()),
    ]
    if args.torch_path:
        command += ["--torch_path", args.torch_path]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
    wall = time.time() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"HF worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    data = json.loads(lines[-1][len("RESULT ") :])
    data["wall_s"] = wall
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2048)
    parser.add_argument("--max_new_tokens", type=int, default=6)
    parser.add_argument("--max_seqs", type=int, default=256, help="Engine width (slots, tokens per decode step).")
    parser.add_argument("--hf_batch_sizes", default="256,2048")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--core", type=int, default=0)
    parser.add_argument("--torch_path", default=None, help="Extra sys.path entry holding torch (if not in the venv).")
    parser.add_argument("--hf_checkpoint", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--hf_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prompts_path", help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.hf_batch_sizes.split(",")]
    if args.hf_worker:
        hf_worker(args)
        return

    from _common import (
        RESULTS,
        SCRATCH,
        Report,
        addition_prompts,
        cache_flag,
        default_checkpoint,
        launch,
        write_config,
    )

    args.hf_checkpoint = args.hf_checkpoint or default_checkpoint()
    args.out = args.out or str(RESULTS / "engine_vs_hf.json")
    report = Report("engine_vs_hf", {k: v for k, v in vars(args).items() if k != "batch_sizes"})
    work = SCRATCH / "engine_vs_hf"
    prompts_path = addition_prompts(args.prompts, work / f"addition_{args.prompts}.txt")
    width = args.max_seqs
    config = write_config(
        work / "config.yaml",
        hf_checkpoint=args.hf_checkpoint,
        prompts_file=str(prompts_path),
        max_new_tokens=args.max_new_tokens,
        task="addition",
        progress_interval_s=0,
        samples_table_rows=0,
        engine={
            "max_seq_len": 64,
            "page_size": 8,
            "max_pages": 3 * width,
            "max_seqs": width,
            "max_seqs_in_prefill": width,
            "max_prefill_size": 10 * width,
            "max_queued_tokens": width,
            "max_tokens_per_round": width,
            "max_rounds": 6,
        },
    )
    flags = [cache_flag(work / "jax_cache")]
    launch(config, work / "fill_cache", 1, *flags, core_list=[args.core])

    rows, pipeline_outputs, hf_outputs = [], None, {}
    for rep in range(args.repeats):
        run = launch(config, work / f"pipeline_{rep}", 1, *flags, core_list=[args.core])
        m = run["host_metrics"][0]
        tokens = m["tokens_generated"]
        gen_s = m["prefill_s"] + m["decode_s"]
        rows.append(
            {
                "repeat": rep,
                "who": f"pipeline (engine width {width})",
                "tokens": tokens,
                "gen_s": gen_s,
                "round_s": m["generate_s"],
                "tok_s_gen": tokens / gen_s,
                "tok_s_round": tokens / m["generate_s"],
                "wall_s": run["wall_outside_s"],
                "tok_s_wall": tokens / run["wall_outside_s"],
            }
        )
        merged = [json.loads(line) for line in (work / f"pipeline_{rep}" / "merged.jsonl").read_text().splitlines()]
        pipeline_outputs = [r["generated_token_ids"] for r in merged]
        hf = run_hf(args, prompts_path)
        for bs, res in hf["results"].items():
            rows.append(
                {
                    "repeat": rep,
                    "who": f"HF generate (batch {bs})",
                    "tokens": res["tokens"],
                    "gen_s": res["seconds"],
                    "round_s": None,
                    "tok_s_gen": res["tokens"] / res["seconds"],
                    "tok_s_round": None,
                    "wall_s": hf["wall_s"],
                    "tok_s_wall": res["tokens"] / hf["wall_s"],
                }
            )
            hf_outputs[bs] = res["outputs"]

    summary = []
    for bs, outputs in hf_outputs.items():
        ratio_gen, ratio_round, ratio_wall = [], [], []
        for rep in range(args.repeats):
            p = next(r for r in rows if r["repeat"] == rep and r["who"].startswith("pipeline"))
            h = next(r for r in rows if r["repeat"] == rep and r["who"] == f"HF generate (batch {bs})")
            ratio_gen.append(p["tok_s_gen"] / h["tok_s_gen"])
            ratio_round.append(p["tok_s_round"] / h["tok_s_gen"])
            ratio_wall.append(p["tok_s_wall"] / h["tok_s_wall"])
        same = sum(a == b for a, b in zip(pipeline_outputs, outputs))
        first_diff = next((i for i, (a, b) in enumerate(zip(pipeline_outputs, outputs)) if a != b), None)
        summary.append(
            {
                "hf_batch": int(bs),
                "ratio_gen": statistics.median(ratio_gen),
                "ratio_round": statistics.median(ratio_round),
                "ratio_wall": statistics.median(ratio_wall),
                "identical": same,
                "of": len(pipeline_outputs),
                "first_difference": None
                if first_diff is None
                else {
                    "prompt_index": first_diff,
                    "pipeline": pipeline_outputs[first_diff],
                    "hf": outputs[first_diff],
                },
            }
        )
    report.table("All runs", rows, COLUMNS)
    report.table(
        "pipeline / HF tokens/s (median over repeats); greedy outputs compared prompt by prompt",
        summary,
        SUMMARY_COLUMNS,
    )
    report.write(args.out, config=config.read_text(), torch=hf.get("torch"), rows=rows, summary=summary)


COLUMNS = [
    ("repeat", "rep", "{:d}"),
    ("who", "who", "{}"),
    ("tokens", "tokens", "{:d}"),
    ("gen_s", "generation s", "{:.2f}"),
    ("tok_s_gen", "tok/s (generation)", "{:.0f}"),
    ("round_s", "generate_s (+compile)", "{:.2f}"),
    ("tok_s_round", "tok/s (generate_s)", "{:.0f}"),
    ("wall_s", "wall s", "{:.1f}"),
    ("tok_s_wall", "tok/s (wall)", "{:.0f}"),
]
SUMMARY_COLUMNS = [
    ("hf_batch", "HF batch", "{:d}"),
    ("ratio_gen", "generation", "{:.2f}x"),
    ("ratio_round", "pipeline generate_s / HF generate", "{:.2f}x"),
    ("ratio_wall", "wall", "{:.2f}x"),
    ("identical", "identical outputs", "{:d}"),
    ("of", "of", "{:d}"),
]

if __name__ == "__main__":
    main()
