"""The adapter from the sampler's config to the planner (``levanter_multihost.capacity_inputs``), the
``levanter-multihost-plan`` CLI run in-process through ``main(argv)`` (exit codes, JSON, text, token counting),
the model's bytes per chip from its real partition specs, and the check that every YAML under ``config/`` fits
the topology it declares."""

import json
from pathlib import Path

import draccus
import jmp
import pytest
import yaml
from levanter.inference.engine import InferenceEngineConfig
from levanter.trainer import TrainerConfig

from levanter_multihost import capacity_inputs
from levanter_multihost.capacity import PromptDemand, RunSpec, parse_tpu_type, plan_capacity
from levanter_multihost.config import SampleLmMultihostConfig
from levanter_multihost.errors import ConfigError, UserError
from levanter_multihost.footprint import HeadTilingError
from levanter_multihost.plan_cli import main
from levanter_multihost.runplan import StopCondition

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "assets" / "tiny-addition"
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
ALL_AXES = ["heads", "mlp", "kv_head", "vocab"]
TENSOR_PARALLEL = {"model_axis_size": 4, "tensor_parallel_axes": ALL_AXES, "mp": "p=f32,c=bfloat16"}


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


def trainer(axes=ALL_AXES, model_axis_size: int = 4) -> TrainerConfig:
    return TrainerConfig(
        model_axis_size=model_axis_size, tensor_parallel_axes=axes, mp=jmp.get_policy("p=f32,c=bfloat16")
    )


def tiny_checkpoint(tmp_path: Path, kv_heads: int) -> Path:
    checkpoint = tmp_path / f"tiny_kv{kv_heads}"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(
        json.dumps(
            {
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": kv_heads,
                "hidden_size": 64,
                "intermediate_size": 128,
                "vocab_size": 1000,
                "tie_word_embeddings": True,
            }
        )
    )
    return checkpoint


# ---------------------------------------------------------------------------------------------------------------
# the CLI


def test_cli_json_seed_v5p32_256_prompts(tmp_path, capsys):
    code, out = run_cli(
        capsys, "--config_path", str(write_config(tmp_path, 256, SEED_ENGINE)), "--prompt_tokens", "32", "--json"
    )
    data = json.loads(out)
    assert code == 0 and data["ok"] and data["problems"] == [], out
    assert (data["num_hosts"], data["chips_per_host"]) == (4, 4)
    assert data["prompts_per_host"] == [64] * 4 and data["batches_per_host"] == [1] * 4
    assert [h["batch_sequences"] for h in data["hosts"]] == [[64]] * 4
    assert (data["pages_per_seq_max"], data["pages_required"], data["max_pages"]) == (20, 1088, 2304)
    assert data["hbm"]["bytes_per_chip_needed"] < data["hbm"]["bytes_per_chip"]
    assert data["roofline"]["step_s"] <= 2.4e-3
    assert "--prompt_tokens: every prompt counted as 32 tokens." in data["notes"]


def test_cli_text_names_the_field_and_a_passing_value(tmp_path, capsys):
    path = write_config(tmp_path, 256, SEED_ENGINE, batch_size=100)
    code, out = run_cli(capsys, "--config_path", str(path), "--prompt_tokens", "32")
    assert code == 1
    assert out.startswith("FAIL: 256 prompts")
    assert "- batch_size: 64" in out.splitlines()
    assert "batch_size (100) is more sequences than one engine call completes" in out
    code, out = run_cli(capsys, "--config_path", str(path), "--prompt_tokens", "32", "--batch_size", "64")
    assert code == 0 and out.startswith("OK: 256 prompts")


def test_cli_num_hosts_and_tpu_type_override(tmp_path, capsys):
    path = str(write_config(tmp_path, 256, SEED_ENGINE))
    code, out = run_cli(capsys, "--config_path", path, "--prompt_tokens", "32", "--tpu_type", "v5p-16", "--json")
    data = json.loads(out)
    assert code == 0 and data["prompts_per_host"] == [128, 128] and data["batches_per_host"] == [2, 2]
    code, out = run_cli(capsys, "--config_path", path, "--prompt_tokens", "32", "--num_hosts", "8", "--json")
    assert code == 0 and json.loads(out)["prompts_per_host"] == [32] * 8


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--prompt_tokens", "0"], "--prompt_tokens (0) must be an integer >= 1"),
        (["--num_hosts", "0"], "--num_hosts (0) must be an integer >= 1"),
        (["--tpu_type", "v9-8"], "tpu_type 'v9-8' is not a slice name like v5p-32"),
        (["--engine.max_seqs", "0"], "engine.max_seqs (0) must be >= 1"),
        # the engine's own InferenceEngineConfig.__post_init__ refuses it while the config is parsed
        (["--engine.max_seqs", "256"], "max_queued_tokens must be >= max_seqs"),
        # the sampler's own check, before the head tiling's (test_llama3_8b_per_chip... covers that one)
        (["--trainer.model_axis_size", "3"], "trainer.model_axis_size (3) does not divide this host's 4 devices"),
    ],
)
def test_cli_bad_input_exits_2_with_the_reason(tmp_path, capsys, argv, says):
    code, out = run_cli(capsys, "--config_path", str(write_config(tmp_path, 4, SEED_ENGINE)), *argv)
    assert code == 2 and out.startswith("levanter-multihost-plan: ") and says in out, out


def test_cli_cannot_read_the_config(tmp_path, capsys):
    code, out = run_cli(capsys, "--config_path", str(tmp_path / "missing.yaml"))
    assert code == 2 and "cannot be read" in out and "missing.yaml" in out


def test_cli_estimates_tokens_when_the_tokenizer_is_not_offline(tmp_path, capsys):
    path = write_config(tmp_path, 4, SEED_ENGINE, hf_checkpoint="no-such-org/no-such-model", tpu_type=None)
    code, out = run_cli(capsys, "--config_path", str(path), "--json")
    data = json.loads(out)
    assert code == 0 and data["num_hosts"] == 1 and data["hbm"] is None
    assert any("UTF-8 bytes + 1" in n for n in data["notes"])
    code, out = run_cli(capsys, "--config_path", str(path))
    prompt = "Prompt 0: tell me a story."
    assert f"(longest prompt {len(prompt) + 1} + 2048 new)" in out
    # EOS counts as one more stop sequence even when the tokenizer cannot say which
    stops = write_config(
        tmp_path,
        4,
        {**SEED_ENGINE, "max_stop_seqs": 4},
        hf_checkpoint="no-such-org/no-such-model",
        tpu_type=None,
        stop_sequences=["A", "B", "C", "\n\nUser:"],
    )
    code, out = run_cli(capsys, "--config_path", str(stops), "--json")
    assert code == 1
    assert [(p["field"], p["suggested"]) for p in json.loads(out)["problems"]] == [("engine.max_stop_seqs", 5)]


def test_cli_counts_tokens_with_an_offline_tokenizer(tmp_path, capsys):
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
        hf_checkpoint=str(TINY),
        prompts=["12+3=", "4+4=", "9999+1="],
        stop_sequences=["."],
        max_new_tokens=6,
    )
    code, out = run_cli(capsys, "--config_path", str(path))
    assert code == 0, out
    assert "13 (longest prompt 7 + 6 new)" in out  # one token per character, as the sampler counts them
    assert ">= 2 stop sequences" in out  # "." and the tokenizer's EOS
    assert "Prompt token counts from the tokenizer, as the sampler counts them." in out


def test_cli_reads_the_model_shape_from_a_local_checkpoint(tmp_path, capsys):
    engine = {**SEED_ENGINE, "page_size": 16, "max_pages": 640}
    heads_mlp = {**TENSOR_PARALLEL, "tensor_parallel_axes": ["heads", "mlp"]}
    path = write_config(
        tmp_path,
        8,
        engine,
        hf_checkpoint=str(tiny_checkpoint(tmp_path, 2)),
        tpu_type="v5e-4",
        max_new_tokens=32,
        trainer=heads_mlp,
    )
    code, out = run_cli(capsys, "--config_path", str(path), "--prompt_tokens", "10", "--json")
    data = json.loads(out)
    assert code == 0, out
    # 2 layers x 2 KV heads x 16 head dim x 2 (K, V) x 2 bytes (engine.compute_dtype bfloat16); kv_head not sharded
    assert data["hbm"]["kv_bytes_per_token"] == data["hbm"]["kv_bytes_per_token_per_chip"] == 2 * 2 * 16 * 2 * 2
    # weights in the trainer's compute dtype (bfloat16): tied embeddings + 2 layers + final norm
    params = 1000 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64
    assert data["hbm"]["weight_bytes"] == params * 2
    assert data["hbm"]["source"].startswith("config.json of")


def test_a_sharding_the_kernel_cannot_tile_is_refused_with_a_value_that_works(tmp_path, capsys):
    """One KV head split 4 ways: JAX refuses the uneven shard; unsharded, 2 combined K/V heads tile."""
    checkpoint = str(tiny_checkpoint(tmp_path, 1))
    limits = capacity_inputs.engine_limits(InferenceEngineConfig(max_seq_len=2560))
    with pytest.raises(ConfigError) as info:
        capacity_inputs.model_shape(checkpoint, trainer(), limits)
    cause = info.value.__cause__
    assert isinstance(cause, HeadTilingError) and (cause.field, cause.suggested) == ("trainer.model_axis_size", 1)
    fix = "Set trainer.model_axis_size: 1 or trainer.tensor_parallel_axes: ['heads', 'mlp', 'vocab']"
    assert fix in str(info.value)
    assert capacity_inputs.model_shape(checkpoint, trainer(["heads", "mlp", "vocab"]), limits) is not None
    path = write_config(tmp_path, 4, SEED_ENGINE, hf_checkpoint=checkpoint, tpu_type="v5e-4")
    code, out = run_cli(capsys, "--config_path", str(path), "--prompt_tokens", "8")
    assert code == 2 and "trainer.model_axis_size" in out


# ---------------------------------------------------------------------------------------------------------------
# the adapter


def test_llama3_8b_per_chip_from_partition_specs_and_the_decode_step():
    """The seed's shape: 64 sequences of 32-token prompts per v5p-32 host, mid-way through 2048 new tokens."""
    limits = capacity_inputs.engine_limits(InferenceEngineConfig(**SEED_ENGINE))
    spec = RunSpec(tuple([PromptDemand(32, 2048)] * 256))
    v5p_32 = parse_tpu_type("v5p-32")
    sharded = capacity_inputs.model_shape("meta-llama/Meta-Llama-3-8B", trainer(), limits)
    assert sharded.source.startswith("known shape for meta-llama/Meta-Llama-3-8B")
    assert sharded.weight_bytes == 8_030_261_248 * 2 and sharded.kv_bytes_per_token == 131_072
    assert sharded.weight_bytes_per_chip <= 0.27 * sharded.weight_bytes
    assert sharded.kv_bytes_per_token_per_chip <= 0.26 * sharded.kv_bytes_per_token
    heads_mlp = capacity_inputs.model_shape("meta-llama/Meta-Llama-3-8B", trainer(["heads", "mlp"]), limits)
    assert heads_mlp.kv_bytes_per_token_per_chip == heads_mlp.kv_bytes_per_token  # every chip holds all KV heads
    fast = plan_capacity(limits, spec, v5p_32, sharded)
    slow = plan_capacity(limits, spec, v5p_32, heads_mlp)
    assert fast.ok and slow.ok and fast.largest_batch == slow.largest_batch == 64
    assert fast.step_bound_s <= 2.4e-3
    assert 4.5e-3 < slow.step_bound_s < 6e-3
    with pytest.raises(ConfigError, match="Set trainer.model_axis_size: 1"):
        capacity_inputs.model_shape("meta-llama/Meta-Llama-3-8B", trainer(model_axis_size=3), limits)


def test_engine_limits_topology_and_check_capacity(tmp_path):
    overrides = ["--engine.compute_dtype", "float32", "--engine.max_tokens_per_round", "null"]
    config = draccus.parse(
        SampleLmMultihostConfig, config_path=str(write_config(tmp_path, 256, SEED_ENGINE)), args=overrides
    )
    limits = capacity_inputs.engine_limits(config.engine)
    assert (limits.kv_dtype_bytes, limits.tokens_per_round, limits.prefill_size) == (4, 128, 2048)
    topology = capacity_inputs.topology("v5p-32", 2, 4)  # the job's host count wins (with a warning)
    assert (topology.num_hosts, topology.chips_per_host, topology.generation.name) == (2, 4, "v5p")
    assert capacity_inputs.topology(None, 3, 2).generation is None
    with pytest.raises(UserError, match="tpu_type"):
        capacity_inputs.topology("v5p-7", 1, 4)
    spec = capacity_inputs.run_spec([32] * 256, [2048] * 256, [1] * 256, StopCondition(), "contiguous", 100)
    with pytest.raises(capacity_inputs.CapacityError) as info:
        capacity_inputs.check_capacity(plan_capacity(limits, spec, capacity_inputs.topology("v5p-32", 4, 4), None))
    assert isinstance(info.value, UserError)
    assert "batch_size (100)" in str(info.value) and info.value.plan.problems[0].suggested == 64
    spec = capacity_inputs.run_spec([32] * 256, [2048] * 256, [1] * 256, StopCondition(), "contiguous", None)
    fits = capacity_inputs.check_capacity(plan_capacity(limits, spec, capacity_inputs.topology("v5p-32", 4, 4), None))
    assert fits.ok and fits.batches_per_host == [1] * 4


@pytest.mark.parametrize("argv", [["--prompt_tokens", "32"], []], ids=["32_tokens", "byte_estimate"])
def test_1024_prompts_on_v5p32_fit_in_several_batches_per_host(argv, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    config = "config/sampler/llama8b_v5p32_1024x2048.yaml"
    code, out = run_cli(capsys, "--config_path", config, "--json", *argv)
    data = json.loads(out)
    assert code == 0 and data["prompts_per_host"] == [256] * 4, out
    assert data["batches_per_host"] == [2] * 4 and data["batch"]["sequences"] == 128


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_every_config_fits_the_topology_it_declares(path, capsys, monkeypatch):
    """tpu_type sets the hosts; a config without one is planned on 1 host (the hardest case for the same prompts)."""
    monkeypatch.chdir(REPO)
    code, out = run_cli(capsys, "--config_path", str(path), "--json")
    data = json.loads(out)
    assert code == 0, out
    tpu_type = yaml.safe_load(path.read_text()).get("tpu_type")
    assert data["num_hosts"] == (parse_tpu_type(tpu_type).num_hosts if tpu_type else 1)


def test_cli_takes_the_samplers_overrides_and_plans_the_emulated_topology(capsys, monkeypatch):
    """tiny_local has no TPU type: planned as the launcher runs it, hosts of trainer.model_axis_size devices."""
    monkeypatch.chdir(REPO)
    code, out = run_cli(capsys, "--config_path", "config/sampler/tiny_local.yaml", "--json")
    data = json.loads(out)
    assert code == 0 and (data["num_hosts"], data["chips_per_host"], data["prompts_per_host"]) == (1, 4, [256])
    argv = [
        "--config_path",
        "config/sampler/tiny_local.yaml",
        "--num_hosts",
        "4",
        "--max_new_tokens",
        "20",
        "--batch_size",
        "32",
        "--engine.max_seq_len",
        "40",
        "--json",
    ]
    code, out = run_cli(capsys, *argv)
    data = json.loads(out)
    assert code == 0 and (data["num_hosts"], data["chips_per_host"], data["prompts_per_host"]) == (4, 4, [64] * 4)
    assert data["batches_per_host"] == [2] * 4 and data["batch"]["limited_by"] == "batch_size"


def test_a_local_output_dir_on_a_multi_host_tpu_run_is_warned_about(tmp_path, monkeypatch, caplog):
    import jax

    from levanter_multihost.resolution import resolve

    config = draccus.parse(
        SampleLmMultihostConfig,
        config_path=str(REPO / "config/sampler/tiny_local.yaml"),
        args=[f"--output_dir={tmp_path}"],
    )
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    caplog.set_level("WARNING")
    resolve(config, 0, 2, 4)
    assert "is a local path: on a multi-host slice every worker writes its parts to its own disk" in caplog.text
    caplog.clear()
    resolve(config, 0, 1, 4)  # one host: its disk is the only one
    assert "local path" not in caplog.text


@pytest.mark.parametrize(
    "overrides, batches",
    [
        ([], 1),
        (["--engine.max_pages=256"], 2),  # 256 sequences of 4 pages each no longer fit one call
        (["--tpu_type=v5p-8", "--engine.auto_size=true"], 1),  # the planner's sizes, from the checkpoint's shape
    ],
)
def test_the_sampler_and_the_planner_resolve_a_config_the_same_way(overrides, batches, tmp_path, monkeypatch):
    """One resolution path: an override that changes capacity changes the sampler's plan and the planner's alike."""
    from levanter_multihost import host_work
    from levanter_multihost.config import parse_command_line
    from levanter_multihost.plan_cli import plan_config
    from levanter_multihost.resolution import resolve

    monkeypatch.chdir(REPO)
    config = parse_command_line(
        ["--config_path", "config/sampler/tiny_local.yaml", f"--output_dir={tmp_path}", *overrides]
    )
    sampler = resolve(config, 0, 1, 4)
    planner = plan_config(config)
    assert sampler.engine.limits == planner.engine and sampler.engine.max_pages == planner.max_pages
    items = host_work.work_items(sampler.prompts, list(range(len(sampler.prompts))), set())
    assert len(host_work.batches(items, sampler.engine)) == planner.batches_per_host[0] == batches


@pytest.mark.parametrize(
    "argv",
    [
        ["--max_new_tokens", "4096"],  # the longest prompt sets max_seq_len, not the first one that fails
        ["--max_new_tokens", "4096", "--batch_size", "100", "--engine.max_pages", "1000"],  # fixes that interact
    ],
)
def test_the_fixes_the_planner_prints_make_the_run_fit(argv, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    config = ["--config_path", "config/sampler/llama8b_v5p32_256x2048.yaml", *argv]
    code, out = run_cli(capsys, *config, "--json")
    fixes = json.loads(out)["fixes"]
    assert code == 1 and fixes, out
    code, text = run_cli(capsys, *config)
    flags = [x for name, value in fixes.items() for x in (f"--{name}", str(value))]
    assert f"Planned again with {' '.join(flags)}: it fits." in text
    assert max(len(line) for line in text.splitlines()) <= 100, text
    code, out = run_cli(capsys, *config, *flags)
    assert code == 0, out


def test_a_typo_is_one_line_naming_the_closest_keys(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out = run_cli(capsys, "--config_path", "config/sampler/tiny_local.yaml", "--engine.max_sqs", "3")
    assert code == 2 and len(out.splitlines()) == 1, out
    assert "`engine.max_sqs`: did you mean engine.max_seqs" in out
