"""Synthetic rows of the seed's largest shape, shared by tests/gather_worker.py and bench/gather_cost.py."""

import random


def synthetic_row(index: int, num_hosts: int) -> dict:
    """A row of the seed's largest shape: 2048 generated Llama-3 token ids and text of matching size."""
    rng = random.Random(index)
    ids = [rng.randrange(128256) for _ in range(2048)]
    return {
        "global_prompt_index": index,
        "generation_index": 0,
        "process_index": index * num_hosts // 1024,
        "prompt": f"Prompt number {index}: " + "tell me a long story. " * 8,
        "prompt_token_count": 60,
        "generated_token_ids": ids,
        "generated_text": " ".join(str(t) for t in ids[:1500]),
        "generated_token_count": 2048,
        "finish_reason": "length",
        "stop_reason": None,
    }
