"""The config adapter and the levanter-multihost-plan CLI (run in-process through ``main(argv)``), and the check that
every YAML under ``config/`` fits the topology it declares."""

import json
from pathlib import Path

import draccus
import pytest
import yaml

from levanter_multihost.config import SampleLmMultihostConfig
from levanter_multihost.plan import CapacityError, check_capacity, main, plan_config, predict_pages_peak

REPO = Path(__file__).resolve().parents[1]
# Sampler configs: the YAMLs under config/ that name prompts.
CONFIGS = [
    p
    for p in sorted(REPO.glob("config/**/*.yaml"))
    if {"prompts", "prompts_file"} & set(yaml.safe_load(p.read_text()))
]

SEED_ENGINE = {
    "max_seq_len": 2560,
    "page_size": 128,
    "max_pages": 2304,
    "max_seqs": 128,
    "max_seqs_in_prefill": 128,
    "max_prefill_size": 2048,
    "max_queued_tokens": 128,
    "max_tokens_per_round": 128,
    "max_rounds": 64,
}
TENSOR_PARALLEL = {
    "model_axis_size": 4,
    "tensor_parallel_axes": ["mlp", "heads", "kv_head"],
    "mp": "p=f32,c=bfloat16",
}


def write_config(tmp_path: Path, n_prompts: int, engine: dict, **extra) -> Path:
    config = {
        "hf_checkpoint": "meta-llama/Meta-Llama-3-8B",
        "tpu_type": "v5p-32",
        "max_new_tokens": 2048,
        "prompts": [f"Prompt {i}: tell me a story." for i in range(n_prompts)],
        "trainer": TENSOR_PARALLEL,
        "engine": engine,
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_cli_json_seed_v5p32_256_prompts(tmp_path, capsys):
    path = write_config(tmp_path, 256, SEED_ENGINE)
    code, out = run_cli(capsys, "--config_path", str(path), "--prompt_tokens", "32", "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"], out
    assert data["num_hosts"] == 4 and data["chips_per_host"] == 4
    assert data["prompts_per_host"] == [64, 64, 64, 64]
    assert data["pages_per_seq_max"] == 20
    assert data["pages_needed"] == 1280
    assert data["max_pages"] == 2304
    assert data["free_pages"] == 1024
    assert data["new_tokens_per_prompt"] == [2048] * 256
    assert data["problems"] == []
    assert data["hbm"]["bytes_per_chip_needed"] < data["hbm"]["bytes_per_chip"]


def test_cli_text_names_the_field_and_a_passing_value(tmp_path, capsys):
    path = write_config(tmp_path, 1024, SEED_ENGINE)
    code, out = run_cli(capsys, "--config_path", str(path), "--prompt_tokens", "16")
    assert code == 1
    assert out.startswith("FAIL: 1024 prompts")
    assert "- engine.max_seqs: 256" in out
    assert "max_seqs (128) is below the 256 sequences on host 0" in out


def test_cli_num_hosts_and_tpu_type_override(tmp_path, capsys):
    path = write_config(tmp_path, 256, SEED_ENGINE)
    code, out = run_cli(capsys, "--config_path", str(path), "--prompt_tokens", "32", "--tpu_type", "v5p-16", "--json")
    assert json.loads(out)["prompts_per_host"] == [128, 128]
    assert code == 0
    code, out = run_cli(capsys, "--config_path", str(path), "--prompt_tokens", "32", "--num_hosts", "8", "--json")
    data = json.loads(out)
    assert data["prompts_per_host"] == [32] * 8
    assert any("planned for the 8 given" in n for n in data["notes"])


def test_cli_estimates_tokens_when_the_tokenizer_is_not_offline(tmp_path, capsys):
    path = write_config(tmp_path, 4, SEED_ENGINE, hf_checkpoint="no-such-org/no-such-model", tpu_type=None)
    code, out = run_cli(capsys, "--config_path", str(path), "--json")
    data = json.loads(out)
    assert code == 0
    assert data["num_hosts"] == 1
    assert data["hbm"] is None
    assert any("UTF-8 bytes + 1" in n for n in data["notes"])
    prompt = "Prompt 0: tell me a story."
    assert data["rows"][0]["needed"].startswith(f"{len(prompt) + 1 + 2048:,}")


def test_cli_reads_the_model_shape_from_a_local_checkpoint(tmp_path, capsys):
    checkpoint = tmp_path / "tiny"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(
        json.dumps(
            {
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "hidden_size": 64,
                "intermediate_size": 128,
                "vocab_size": 1000,
                "tie_word_embeddings": True,
            }
        )
    )
    engine = {**SEED_ENGINE, "page_size": 16, "max_pages": 640}
    path = write_config(tmp_path, 8, engine, hf_checkpoint=str(checkpoint), tpu_type="v5e-4", max_new_tokens=32)
    code, out = run_cli(capsys, "--config_path", str(path), "--prompt_tokens", "10", "--json")
    data = json.loads(out)
    assert code == 0, out
    # 2 layers x 2 kv heads x 16 head dim x 2 (K, V) x 2 bytes (engine.compute_dtype bfloat16) x 16 tokens x 640 pages
    assert data["hbm"]["kv_cache_bytes"] == 2 * 2 * 16 * 2 * 2 * 16 * 640
    # weights in the trainer's compute dtype (bfloat16): tied embeddings + 2 layers + final norm
    params = 1000 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64
    assert data["hbm"]["weight_bytes"] == params * 2
    assert any("config.json of" in n for n in data["notes"])


def test_cli_counts_tokens_with_an_offline_tokenizer(tmp_path, capsys):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate("0123456789+=.")}}
    chars = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    chars.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    PreTrainedTokenizerFast(tokenizer_object=chars, unk_token="[UNK]").save_pretrained(tmp_path / "chars")
    engine = {
        "max_seq_len": 16,
        "page_size": 4,
        "max_pages": 64,
        "max_seqs": 4,
        "max_seqs_in_prefill": 4,
        "max_queued_tokens": 4,
        "max_rounds": 4,
        "max_stop_tokens": 1,
    }
    path = write_config(
        tmp_path,
        0,
        engine,
        tpu_type=None,
        hf_checkpoint=str(tmp_path / "chars"),
        prompts=["12+3=", "4+4=", "9999+1="],
        stop_sequence=".",
        max_new_tokens=6,
    )
    code, out = run_cli(capsys, "--config_path", str(path), "--json")
    data = json.loads(out)
    assert code == 0, out
    assert data["rows"][0]["needed"] == "13 (longest prompt 7 + 6 new)"
    assert any("as the sampler counts them" in n for n in data["notes"])


def test_cli_explains_a_config_the_engine_refuses(tmp_path, capsys):
    path = write_config(tmp_path, 4, {**SEED_ENGINE, "max_seqs": 256})
    code, out = run_cli(capsys, "--config_path", str(path), "--json")
    data = json.loads(out)
    assert code == 1 and data["ok"] is False
    assert [(p["field"], p["suggested"]) for p in data["problems"]] == [("engine.max_queued_tokens", 256)]


def parse(path: Path) -> SampleLmMultihostConfig:
    return draccus.parse(SampleLmMultihostConfig, config_path=str(path), args=[])


def test_check_capacity_raises_with_the_planners_messages(tmp_path):
    config = parse(write_config(tmp_path, 1024, SEED_ENGINE))
    with pytest.raises(CapacityError) as info:
        check_capacity(config, [16] * 1024, num_hosts=4, stop_token_count=0)
    assert isinstance(info.value, ValueError)
    assert "Increase max_seqs to 256" in str(info.value)
    assert not info.value.plan.ok
    plan = check_capacity(parse(write_config(tmp_path, 256, SEED_ENGINE)), [32] * 256, 4, 0)
    assert plan.ok and plan.prompts_per_host == [64] * 4


def test_stop_sequence_tokens_are_checked(tmp_path):
    config = parse(write_config(tmp_path, 4, {**SEED_ENGINE, "max_stop_tokens": 4}))
    plan = plan_config(config, [16] * 4, stop_token_count=6)
    assert [(p.field, p.suggested) for p in plan.problems] == [("engine.max_stop_tokens", 6)]


def test_predict_pages_peak(tmp_path):
    """What GenerationStats.pages_peak reads: pages at each outer-round start and after generate (engine-checked)."""
    engine = {
        "max_seq_len": 48,
        "page_size": 8,
        "max_pages": 400,
        "max_seqs": 8,
        "max_seqs_in_prefill": 8,
        "max_queued_tokens": 8,
        "max_tokens_per_round": 4,
        "max_rounds": 4,
    }
    config = parse(write_config(tmp_path, 8, engine, max_new_tokens=30, tpu_type=None))
    assert predict_pages_peak(config, [5, 9, 3, 12, 7, 6, 8, 10], num_hosts=1) == [34]


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_every_config_fits_the_topology_it_declares(path, capsys, monkeypatch):
    """tpu_type sets the hosts; a config without one is planned on 1 host (the hardest case for the same prompts)."""
    monkeypatch.chdir(REPO)
    code, out = run_cli(capsys, "--config_path", str(path))
    assert code == 0, out
