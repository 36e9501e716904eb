"""Every YAML under config/ parses into the sampler's config, and the seed's engine values are the ones shipped."""

from pathlib import Path

import draccus
import pytest

from levanter_multihost.config import SampleLmMultihostConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
SAMPLER_CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("path", SAMPLER_CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_parses(path):
    config = draccus.parse(SampleLmMultihostConfig, config_path=str(path), args=[])
    assert (CONFIG_DIR.parent / config.prompts_file).exists()


SEED_FAMILY = [
    ("llama8b_v5p16_128x2048", 128),
    ("llama8b_v5p32_128x2048", 128),
    ("llama8b_v5p32_256x2048", 256),
    ("llama8b_v5p32_1024x2048", 1024),
]


@pytest.mark.parametrize("name,prompts", SEED_FAMILY)
def test_seed_engine_values(name, prompts):
    """The seed's validated engine, with a prefill buffer that holds each config's batch, every axis sharded, and the
    outputs in a bucket that outlives the VMs."""
    config = draccus.parse(SampleLmMultihostConfig, config_path=str(CONFIG_DIR / "sampler" / f"{name}.yaml"), args=[])
    e = config.engine
    assert (e.page_size, e.max_seq_len, e.max_pages, e.max_seqs, e.max_seqs_in_prefill) == (128, 2560, 2304, 128, 128)
    assert (e.max_queued_tokens, e.max_tokens_per_round, e.max_rounds) == (128, 128, 64)
    assert e.max_prefill_size >= 4096
    assert set(config.trainer.tensor_parallel_axes) == {"heads", "mlp", "kv_head", "vocab"}
    assert config.output_dir.startswith("gs://YOUR_BUCKET/")
    assert config.silent_host_timeout_s < 100  # under JAX's own heartbeat timeout
    assert config.max_new_tokens == 2048
    assert len((CONFIG_DIR.parent / config.prompts_file).read_text().splitlines()) == prompts
    assert (config.ragged_attention.q_block_size, config.ragged_attention.kv_block_pages) == (16, 8)
    assert config.trainer.tracker.project == "levanter-multihost-inference"
    assert "host-dp" in config.trainer.tracker.tags
