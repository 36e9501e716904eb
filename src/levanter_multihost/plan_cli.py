"""``levanter-multihost-plan``: check a sampler config against its prompts and slice before launch.

    uv run levanter-multihost-plan --config_path config/sampler/llama8b_v5p32_256x2048.yaml
    uv run levanter-multihost-plan --config_path config/sampler/tiny_local.yaml --num_hosts 4 --max_new_tokens 8

Takes the sampler's own overrides (``--max_new_tokens 8``, ``--engine.max_seqs 64``, ...) and plans the run on
``tpu_type``'s hosts (or ``--tpu_type``, ``--num_hosts``); a config without a TPU type is planned as the local
launcher runs it: ``--num_hosts`` hosts (default 1) of ``trainer.model_axis_size`` devices. Token counts come from
the tokenizer when it loads offline, counted as the sampler counts them; else each prompt counts as its UTF-8
bytes + 1 (an upper bound: a byte-level BPE token covers at least one byte, SentencePiece may add a prefix-space
token); ``--prompt_tokens N`` counts every prompt as N. Exit status: 0 fits, 1 does not, 2 bad input. Seconds, no
accelerator, no network.
"""

import argparse
import json
import logging
import os
import sys

import draccus

from levanter_multihost import encoding, plan
from levanter_multihost.capacity import plan_capacity, report
from levanter_multihost.config import SampleLmMultihostConfig, prompt_source
from levanter_multihost.errors import UserError
from levanter_multihost.model_loading import resolve_location
from levanter_multihost.prompts import read_prompts
from levanter_multihost.runplan import StopCondition

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="levanter-multihost-plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config_path", required=True, help="Sampler YAML config.")
    parser.add_argument("--num_hosts", type=int, help="Hosts to plan for (default: tpu_type's, else 1).")
    parser.add_argument("--tpu_type", help="Slice to plan for, e.g. v5p-32 (default: the config's tpu_type).")
    parser.add_argument("--prompt_tokens", type=int, help="Count every prompt as this many tokens.")
    parser.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    args, overrides = parser.parse_known_args(argv)
    for flag in ("num_hosts", "prompt_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            print(f"levanter-multihost-plan: --{flag} ({value}) must be an integer >= 1 (or left out).")
            return 2
    try:
        config = draccus.parse(SampleLmMultihostConfig, config_path=args.config_path, args=overrides)
    except (draccus.utils.ParsingError, ValueError, TypeError) as e:
        cause = f"{e}: {e.__cause__}" if e.__cause__ else str(e)
        print(f"levanter-multihost-plan: {args.config_path} cannot be parsed: {cause}")
        return 2
    except OSError as e:
        print(f"levanter-multihost-plan: cannot read {args.config_path}: {e}")
        return 2
    try:
        capacity = plan_config(config, args.num_hosts, args.tpu_type or config.tpu_type, args.prompt_tokens)
    except UserError as e:
        print(f"levanter-multihost-plan: {e}")
        return 2
    print(json.dumps(report.to_dict(capacity), indent=2) if args.json else report.text(capacity))
    return 0 if capacity.ok else 1


def plan_config(config: SampleLmMultihostConfig, num_hosts: int | None, tpu_type: str | None,
                prompt_tokens: int | None):  # fmt: skip
    """The capacity plan of ``config`` on the given slice, with notes on how tokens were counted."""
    checkpoint = None
    if config.hf_checkpoint is not None:
        checkpoint = resolve_location(config.hf_checkpoint.model_name_or_path, "hf_checkpoint")
    records = read_prompts(**prompt_source(config))
    tokenizer = None if prompt_tokens is not None and not config.stop_sequences else offline_tokenizer(config)
    overrides = records.overrides
    max_new = _column(overrides.get("max_new_tokens"), config.max_new_tokens, len(records))
    n_generations = _column(overrides.get("n_generations"), config.n_generations, len(records))
    if tokenizer is not None and prompt_tokens is None:
        prompts = encoding.encode_prompts(records, tokenizer, chat_template=config.chat_template,
                                          add_bos=config.add_bos, max_new_tokens=config.max_new_tokens,
                                          temperature=config.temperature, n_generations=config.n_generations)  # fmt: skip
        lengths = prompts.tokens.lengths
        how = "Prompt token counts from the tokenizer, as the sampler counts them."
    elif prompt_tokens is not None:
        lengths = [prompt_tokens] * len(records)
        how = f"--prompt_tokens: every prompt counted as {prompt_tokens} tokens."
    else:
        texts = [t if t is not None else json.dumps(m) for t, m in zip(records.texts, records.messages)]
        lengths = [len(t.encode("utf-8")) + 1 for t in texts]
        how = ("The tokenizer does not load offline: each prompt counted as its UTF-8 bytes + 1, an upper bound. "
               "Pass --prompt_tokens N for a closer count.")  # fmt: skip
    if records.completions is not None:  # scoring rows: one forward pass over prompt and completion, no new tokens
        texts = [c or "" for c in records.completions]
        extra = [len(t) for t in tokenizer(texts, add_special_tokens=False)["input_ids"]] if tokenizer is not None \
            else [len(t.encode("utf-8")) for t in texts]  # fmt: skip
        lengths, max_new = [n + e for n, e in zip(lengths, extra)], [0] * len(records)
    if tokenizer is not None:
        stop = encoding.stop_condition(tokenizer, list(config.stop_sequences), config.stop_at_eos,
                                       config.include_stop_in_text, checkpoint)  # fmt: skip
    else:  # every token spells at least one byte; EOS, when on, is at least one more stop sequence of one token
        stop = StopCondition(tuple(config.stop_sequences), tuple(tuple(s.encode("utf-8")) for s in
                                                                config.stop_sequences),
                             eos_ids=(-1,) if config.stop_at_eos else ())  # fmt: skip
    limits = plan.engine_limits(config.engine)
    if tpu_type is not None:
        topology = plan.topology(tpu_type, num_hosts or _hosts_of(tpu_type), 0)
    else:
        topology = plan.topology(None, num_hosts or 1, config.trainer.model_axis_size)
    model = plan.model_shape(checkpoint, config.trainer, limits) if topology.generation is not None else None
    spec = plan.run_spec_of(lengths, max_new, n_generations, stop, config.shard_strategy, config.batch_size)
    capacity = plan_capacity(limits, spec, topology, model)
    if config.engine.auto_size and capacity.proposal is not None:  # what the sampler will run
        capacity = plan_capacity(capacity.proposal.limits, spec, topology, model)
    return type(capacity)(**{**vars(capacity), "notes": (how, *capacity.notes)})


def _hosts_of(tpu_type: str) -> int:
    from levanter_multihost.capacity import parse_tpu_type

    try:
        return parse_tpu_type(tpu_type).num_hosts
    except ValueError as e:
        raise UserError(str(e)) from None


def _column(values: list | None, default: int, n: int) -> list[int]:
    return [default] * n if values is None else [default if v is None else v for v in values]


def offline_tokenizer(config: SampleLmMultihostConfig):
    """The config's tokenizer from a local directory or the Hugging Face cache, or None; never the network."""
    name = config.tokenizer or (config.hf_checkpoint.model_name_or_path if config.hf_checkpoint else None)
    if name is None or "://" in name:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.path.abspath(name) if os.path.isdir(name) else name,
                                             local_files_only=True)  # fmt: skip
    except (OSError, ValueError) as e:
        logger.info("tokenizer %s does not load offline: %s", name, e)
        return None


def cli() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sys.exit(main())


if __name__ == "__main__":
    cli()
