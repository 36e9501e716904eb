"""Multi-digit addition: the task of the tiny trained model, with answers that can be checked exactly.

A problem is ``"4821+377="``; its answer is ``"5198"``, which the model follows with the terminator ``"."`` (so
samplers can stop on ``"."``). Each operand has 1 to ``MAX_DIGITS`` digits, the digit count drawn uniformly.

Covers the problem distribution, the held-out rule (a pair ``(a, b)`` is held out iff a SHA-256 of ``"a+b"``
falls in one bucket of ``HELD_OUT_BUCKETS``; training draws only other pairs, evaluation only held-out ones,
so the two never share a prompt, though ``b+a`` may be trained on when ``a+b`` is held out), deterministic
training examples and evaluation prompts, scoring of generated text, and a CLI that writes a prompts file:

    uv run python -m levanter_multihost.addition --n 256 --seed 0 --out config/prompts/addition_256.txt

Leaves out tokenization and the model (``scripts/train_tiny_addition.py``). No JAX import.
"""

import argparse
import hashlib
import logging
import random
import re
from collections.abc import Iterable, Mapping

logger = logging.getLogger(__name__)

MAX_DIGITS = 4
"""Most digits of either operand."""
TERMINATOR = "."
"""Character that ends every answer; use it as the sampler's stop sequence."""
HELD_OUT_BUCKETS = 10
"""One pair in this many is held out of training and kept for evaluation."""
MAX_PROMPT_CHARS = 2 * MAX_DIGITS + 2
"""Longest prompt, in characters (one token each)."""
MAX_ANSWER_CHARS = MAX_DIGITS + 1
"""Longest answer without the terminator."""

_PROMPT_RE = re.compile(r"^(\d+)\+(\d+)=$")


def is_held_out(a: int, b: int) -> bool:
    """Whether ``a+b=`` is reserved for evaluation (never a training example)."""
    digest = hashlib.sha256(f"{a}+{b}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0


def _operand(rng: random.Random) -> int:
    digits = rng.randint(1, MAX_DIGITS)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def sample_pair(rng: random.Random, held_out: bool) -> tuple[int, int]:
    """Draw operands until the pair is held out (``held_out=True``) or not (``False``)."""
    while True:
        a, b = _operand(rng), _operand(rng)
        if is_held_out(a, b) == held_out:
            return a, b


def format_prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def training_example(seed: int, index: int) -> tuple[str, str]:
    """The ``index``-th training example of ``seed``: (prompt, answer with terminator), never held out."""
    a, b = sample_pair(random.Random(f"train:{seed}:{index}"), held_out=False)
    return format_prompt(a, b), f"{a + b}{TERMINATOR}"


def make_prompts(n: int, seed: int) -> list[str]:
    """``n`` distinct held-out prompts, the same for the same ``(n, seed)``; a larger ``n`` extends a smaller."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    rng = random.Random(f"eval:{seed}")
    seen: set[str] = set()
    prompts: list[str] = []
    while len(prompts) < n:
        prompt = format_prompt(*sample_pair(rng, held_out=True))
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def parse_prompt(prompt: str) -> tuple[int, int]:
    match = _PROMPT_RE.match(prompt.strip())
    if match is None:
        raise ValueError(f"Not an addition prompt: {prompt!r}. Expected digits, '+', digits, '=' as in '4821+377='.")
    return int(match.group(1)), int(match.group(2))


def is_prompt(text: str) -> bool:
    """Whether ``text`` is an addition problem like ``"4821+377="``."""
    return _PROMPT_RE.match(text.strip()) is not None


def expected_answer(prompt: str) -> str:
    """The digits of the sum, without the terminator: ``"4821+377="`` gives ``"5198"``."""
    a, b = parse_prompt(prompt)
    return str(a + b)


def extract_answer(generated_text: str) -> str:
    """The generated text up to the first terminator (or its end), stripped of whitespace."""
    return generated_text.split(TERMINATOR, 1)[0].strip()


def score(generated_text: str, prompt: str) -> bool:
    """Whether the text generated after ``prompt`` starts with exactly the right sum."""
    return extract_answer(generated_text) == expected_answer(prompt)


def accuracy(rows: Iterable[Mapping]) -> float:
    """Fraction of rows (each with ``prompt`` and ``generated_text``) whose answer is exactly right."""
    results = []
    for i, row in enumerate(rows):
        missing = [k for k in ("prompt", "generated_text") if k not in row]
        if missing:
            raise ValueError(f"Row {i} lacks field(s) {missing}; accuracy needs `prompt` and `generated_text`.")
        results.append(score(row["generated_text"], row["prompt"]))
    if not results:
        raise ValueError("No rows to score: accuracy needs at least one row.")
    return sum(results) / len(results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write held-out addition prompts, one per line.")
    parser.add_argument("--n", type=int, required=True, help="number of prompts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt draw")
    parser.add_argument("--out", required=True, help="output .txt path")
    args = parser.parse_args(argv)
    prompts = make_prompts(args.n, args.seed)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("".join(p + "\n" for p in prompts))
    logging.basicConfig(level=logging.INFO)
    logger.info("Wrote %d prompts to %s", len(prompts), args.out)


if __name__ == "__main__":
    main()
