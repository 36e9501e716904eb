"""``levanter-multihost-plan``: check a sampler config against its prompts and slice before launch.

    uv run levanter-multihost-plan --config_path config/sampler/llama8b_v5p32_256x2048.yaml
    uv run levanter-multihost-plan --config_path config/sampler/tiny_local.yaml --num_hosts 4 --max_new_tokens 8

Takes the sampler's own overrides (``--max_new_tokens 8``, ``--engine.max_seqs 64``, ...) and plans the run on
``tpu_type``'s hosts (or ``--tpu_type``, ``--num_hosts``), one engine per replica of ``hosts_per_replica`` hosts;
a config without a TPU type is planned as the local launcher runs it: ``--num_hosts`` hosts (default 1), each
replica of ``trainer.model_axis_size`` devices. Token counts come from the tokenizer when it loads offline,
counted as the sampler counts them; else each prompt counts as its UTF-8
bytes + 1 (an upper bound: a byte-level BPE token covers at least one byte, SentencePiece may add a prefix-space
token); ``--prompt_tokens N`` counts every prompt as N. Exit status: 0 fits, 1 does not, 2 bad input. Seconds, no
accelerator, no network.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys

from levanter_multihost.capacity import parse_tpu_type, report
from levanter_multihost.checks import check_values
from levanter_multihost.config import SampleLmMultihostConfig, parse_command_line
from levanter_multihost.errors import UserError
from levanter_multihost.model_loading import resolve_location
from levanter_multihost.replicas import Replicas
from levanter_multihost.resolution import resolve_capacity

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
        config = parse_command_line(["--config_path", args.config_path, *overrides])
        capacity = plan_config(config, args.num_hosts, args.tpu_type, args.prompt_tokens)
    except UserError as e:
        print(f"levanter-multihost-plan: {e}")
        return 2
    print(json.dumps(report.to_dict(capacity), indent=2) if args.json else report.text(capacity))
    return 0 if capacity.ok else 1


def plan_config(
    config: SampleLmMultihostConfig,
    num_hosts: int | None = None,
    tpu_type: str | None = None,
    prompt_tokens: int | None = None,
):
    """The capacity plan of ``config`` on ``tpu_type`` (default: the config's) with ``num_hosts`` (default: the
    slice's, else 1), resolved as the sampler resolves it, with a note on how tokens were counted."""
    config = dataclasses.replace(config, tpu_type=tpu_type or config.tpu_type)
    try:
        slice_ = parse_tpu_type(config.tpu_type) if config.tpu_type else None
    except ValueError as e:
        raise UserError(str(e)) from None
    hosts = num_hosts or (slice_.num_hosts if slice_ else 1)
    # a config without a TPU type is planned as the local launcher runs it: replicas of model_axis_size devices
    k = Replicas.of(config.hosts_per_replica, hosts).hosts_per_replica
    local_devices = slice_.chips_per_host if slice_ else max(config.trainer.model_axis_size // k, 1)
    check_values(config, hosts, local_devices)
    checkpoint = None
    if config.hf_checkpoint is not None:
        checkpoint = resolve_location(config.hf_checkpoint.model_name_or_path, "hf_checkpoint")
    tokenizer = None if prompt_tokens is not None and not config.stop_sequences else offline_tokenizer(config)
    resolved = resolve_capacity(config, tokenizer, checkpoint, hosts, local_devices, prompt_tokens)
    capacity = resolved.capacity
    return dataclasses.replace(capacity, notes=(resolved.token_count, *capacity.notes))


def offline_tokenizer(config: SampleLmMultihostConfig):
    """The config's tokenizer from a local directory or the Hugging Face cache, or None; never the network."""
    name = config.tokenizer or (config.hf_checkpoint.model_name_or_path if config.hf_checkpoint else None)
    if name is None or "://" in name:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            os.path.abspath(name) if os.path.isdir(name) else name, local_files_only=True
        )
    except (OSError, ValueError) as e:
        logger.info("tokenizer %s does not load offline: %s", name, e)
        return None


def cli() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sys.exit(main())


if __name__ == "__main__":
    cli()
