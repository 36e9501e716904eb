"""Roofline: the planner's HBM-bound decode time for the seed configs, beside the seed's measured 107 s per host.

    uv run python bench/roofline.py                      # seconds, no accelerator; JSON to bench/results/roofline.json
    uv run python bench/roofline.py --prompt_tokens 40

For each TPU config under ``config/sampler/`` (Llama-3-8B, bf16, v5p: 2,765 GB/s and 95 GB of HBM per chip), the
capacity planner (``levanter_multihost.plan.plan_config``, the same code as ``levanter-multihost-plan``) replays
the engine's scheduling per host and bounds the decode by HBM bandwidth: every decode iteration reads the chip's
share of the weights (tensor-parallel over the host's 4 chips) and the KV cache of every packed sequence's
context, so bound = (iterations x weights / 4 + KV tokens read x KV bytes per token / 4) / 2,765 GB/s. Prefill
is left out (compute-bound, and short next to 2048 new tokens).

Prompt token counts: the Llama-3 tokenizer does not load offline here, so by default each prompt counts as its
UTF-8 bytes + 1 (an upper bound, as the planner does); ``--prompt_tokens N`` counts every prompt as N tokens.
Only the v5p-32 run was measured (107 s of generation per host, 256 prompts x 2048 new tokens): its fraction of
the bound says how far the engine is from the bandwidth limit; the v5p-16 line is the bound alone.
"""

import argparse
import time

from _common import REPO, RESULTS, SEED_GENERATION_S, format_table, write_json

CONFIGS = {
    "llama8b_v5p32_256x2048.yaml": SEED_GENERATION_S,
    "llama8b_v5p16_128x2048.yaml": None,
}


def main() -> None:
    import draccus

    from levanter_multihost.config import SampleLmMultihostConfig
    from levanter_multihost.plan import _count_tokens, plan_config
    from levanter_multihost.prompts import load_prompts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt_tokens", type=int, default=None, help="Count every prompt as this many tokens.")
    parser.add_argument("--out", default=str(RESULTS / "roofline.json"))
    args = parser.parse_args()
    rows = []
    for name, measured in CONFIGS.items():
        path = REPO / "config" / "sampler" / name
        config = draccus.parse(SampleLmMultihostConfig, config_path=str(path), args=[])
        prompts = load_prompts(config.prompts, str(REPO / config.prompts_file) if config.prompts_file else None)
        counts, stop_count, notes = _count_tokens(config, prompts, args.prompt_tokens)
        plan = plan_config(config, counts, stop_token_count=stop_count)
        roofline = plan.decode_roofline_s
        gen = plan.topology.generation
        for h in plan.hosts:
            bound = roofline[h.host]
            new_tokens = sum(h.new_tokens) * config.n_generations
            rows.append(
                {
                    "config": name,
                    "tpu": plan.topology.name,
                    "host": h.host,
                    "prompts": h.prompts,
                    "new_tokens": new_tokens,
                    "waves": len(h.waves),
                    "decode_iterations": h.decode_iterations,
                    "weights_GB_per_iter": plan.model.weight_bytes / plan.model.weight_shards / 1e9,
                    "kv_TB_read": h.kv_tokens_read * plan.kv_bytes_per_token / plan.model.kv_shards / 1e12,
                    "bound_s": bound,
                    "bound_tok_s": new_tokens / bound if bound else None,
                    "measured_s": measured,
                    "measured_tok_s": new_tokens / measured if measured else None,
                    "fraction_of_bound": bound / measured if measured else None,
                    "hbm_GBps_per_chip": gen.hbm_bandwidth_per_chip / 1e9,
                    "token_count": notes[0],
                }
            )
    print(format_table(rows, COLUMNS))
    print(f"token counts: {rows[0]['token_count']}")
    write_json(
        args.out,
        {"bench": "roofline", "when": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args), "rows": rows},
    )


COLUMNS = [
    ("tpu", "slice", "{}"),
    ("host", "host", "{:d}"),
    ("prompts", "prompts", "{:d}"),
    ("new_tokens", "new tokens", "{:d}"),
    ("waves", "waves", "{:d}"),
    ("decode_iterations", "decode iters", "{:d}"),
    ("weights_GB_per_iter", "weights GB/chip/iter", "{:.2f}"),
    ("kv_TB_read", "KV TB read/chip", "{:.1f}"),
    ("bound_s", "HBM bound s", "{:.1f}"),
    ("bound_tok_s", "bound tok/s", "{:.0f}"),
    ("measured_s", "measured s", "{:.0f}"),
    ("measured_tok_s", "measured tok/s", "{:.0f}"),
    ("fraction_of_bound", "bound/measured", "{:.1%}"),
]

if __name__ == "__main__":
    main()
