"""Roofline: the planner's batch and HBM-bound decode for every shipped config, and the seed's measured anchor.

    uv run python bench/roofline.py                      # seconds, no accelerator; JSON to bench/results/roofline.json
    uv run python bench/roofline.py --prompt_tokens 40

For each config under ``config/sampler/``, the plan ``levanter-multihost-plan --json`` prints
(``levanter_multihost.plan_cli.plan_config`` and ``capacity.report.to_dict``, the same code): the batch the planner
chooses (``batch.sequences``, the field that sets it), batches per host, HBM per chip, and the HBM-bound decode:
``roofline.step_s`` (one decode iteration of the largest batch, mid-decode: every chip reads its share of the
weights and of the batch's KV cache), ``roofline.tokens_per_s_per_host`` (batch / step) and
``roofline.decode_s_per_host`` (all of a host's decode iterations; prefill and compilation left out). The TPU
configs are planned on their ``tpu_type``; ``tiny_local.yaml`` on 4 hosts, as its header runs it (no roofline:
CPU). Prompt token counts: the Llama-3 tokenizer does not load offline here, so each prompt counts as its UTF-8
bytes + 1 (an upper bound, so the batch limits by ``max_prefill_size`` are lower bounds); ``--prompt_tokens N``
counts every prompt as N.

The anchor: the seed's one measured shape (``shared/seed/000_b045e4698a64ea8d.txt``) is v5p-16, 2 hosts x 64
prompts x 2048 new tokens (``llama8b_v5p16_128x2048.yaml``): a round (compile + prefill + decode) of ~107 s per
host and a per-host decode rate of ~1,768 tok/s, so ~131,072 / 1,768 = 74 s of decode per host. That decode time,
not the round, is what compares with the decode-only bound. The seed's v5p-32 256-prompt figure (107 s) was a
prediction from the v5p-16 run, not a measurement.
"""

import argparse

from _common import REPO, RESULTS, SAMPLER_CONFIGS, SEED_CONFIG, SEED_GENERATION_S, Report

SEED_DECODE_TOK_S = 1768.0
"""Per-host decode tokens/s the seed reports for its v5p-16 run (64 prompts per host x 2048 new tokens)."""
LOCAL_HOSTS = {"tiny_local.yaml": 4}


def plan(path, prompt_tokens: int | None) -> dict:
    import os

    import draccus

    from levanter_multihost.capacity import report
    from levanter_multihost.config import SampleLmMultihostConfig
    from levanter_multihost.plan_cli import plan_config

    config = draccus.parse(SampleLmMultihostConfig, config_path=str(path), args=[])
    cwd = os.getcwd()
    os.chdir(REPO)  # the configs name their prompts and checkpoint relative to the repository
    try:
        capacity = plan_config(config, LOCAL_HOSTS.get(path.name), config.tpu_type, prompt_tokens)
    finally:
        os.chdir(cwd)
    return report.to_dict(capacity)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt_tokens", type=int, default=None, help="Count every prompt as this many tokens.")
    parser.add_argument("--out", default=str(RESULTS / "roofline.json"))
    args = parser.parse_args()
    report = Report("roofline", args)
    rows, plans = [], {}
    for path in sorted(SAMPLER_CONFIGS.glob("*.yaml")):
        d = plans[path.name] = plan(path, args.prompt_tokens)
        roof, hbm = d["roofline"] or {}, d["hbm"] or {}
        rows.append(
            {
                "config": path.name,
                "slice": d["tpu_type"] or f"{d['num_hosts']} local hosts",
                "ok": d["ok"],
                "prompts_per_host": max(d["prompts_per_host"]),
                "batch": d["batch"]["sequences"],
                "limited_by": d["batch"]["limited_by"].removeprefix("engine."),
                "batches_per_host": max(d["batches_per_host"]),
                "step_ms": roof["step_s"] * 1e3 if roof.get("step_s") else None,
                "tok_s_per_host": roof.get("tokens_per_s_per_host"),
                "decode_bound_s": max(roof["decode_s_per_host"]) if roof.get("decode_s_per_host") else None,
                "hbm_needed_GiB": hbm["bytes_per_chip_needed"] / 2**30 if hbm else None,
                "hbm_GiB": hbm["bytes_per_chip"] / 2**30 if hbm else None,
            }
        )
    seed = plans[SEED_CONFIG]
    tokens = 64 * 2048
    decode_s = tokens / SEED_DECODE_TOK_S
    bound = max(seed["roofline"]["decode_s_per_host"])
    iterations = max(h["decode_iterations"] for h in seed["hosts"])
    anchor = {
        "config": SEED_CONFIG,
        "measured_round_s": SEED_GENERATION_S,
        "measured_decode_tok_s": SEED_DECODE_TOK_S,
        "measured_decode_s": decode_s,
        "decode_bound_s": bound,
        "fraction_of_bound": bound / decode_s,
        "decode_iterations": iterations,
        "measured_step_ms": decode_s / iterations * 1e3,
        "bound_step_ms": seed["roofline"]["step_s"] * 1e3,
    }
    report.table("The planner's batch and HBM bound per shipped config", rows, COLUMNS)
    report.table(
        "The seed's measured run (v5p-16, 64 prompts per host) against the decode-only bound",
        [anchor],
        ANCHOR_COLUMNS,
    )
    print("token counts: " + seed["notes"][0])
    report.write(args.out, rows=rows, anchor=anchor, plans=plans)


COLUMNS = [
    ("config", "config", "{}"),
    ("slice", "slice", "{}"),
    ("prompts_per_host", "prompts/host", "{:d}"),
    ("batch", "batch", "{:d}"),
    ("limited_by", "set by", "{}"),
    ("batches_per_host", "batches/host", "{:d}"),
    ("step_ms", "bound step ms", "{:.2f}"),
    ("tok_s_per_host", "bound tok/s/host", "{:,.0f}"),
    ("decode_bound_s", "bound decode s/host", "{:.1f}"),
    ("hbm_needed_GiB", "HBM GiB/chip", "{:.1f}"),
    ("hbm_GiB", "of GiB", "{:.0f}"),
]
ANCHOR_COLUMNS = [
    ("measured_round_s", "round s (compile+prefill+decode)", "{:.0f}"),
    ("measured_decode_tok_s", "decode tok/s/host", "{:,.0f}"),
    ("measured_decode_s", "decode s", "{:.0f}"),
    ("decode_iterations", "decode iterations", "{:d}"),
    ("measured_step_ms", "step ms", "{:.1f}"),
    ("bound_step_ms", "bound step ms", "{:.2f}"),
    ("decode_bound_s", "bound decode s", "{:.2f}"),
    ("fraction_of_bound", "bound / measured", "{:.1%}"),
]

if __name__ == "__main__":
    main()
