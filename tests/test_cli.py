"""The command line as a user meets it: one clear line per mistake, --help with the sampler's fields first, and the
tiny config as one plain process."""

import subprocess
import sys

import pytest
from multihost import REPO, TINY_CONFIG, cache_flags, host_env, launch

from levanter_multihost.config import parse_command_line
from levanter_multihost.errors import ConfigError

NATIVE_DUMPS = ("Terminating process because the JAX distributed service", "coordination_service_agent", "*** ")


def sample(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "levanter_multihost.sample_lm_multihost",
        "--config_path",
        str(TINY_CONFIG),
        *cache_flags(),
        *args,
    ]
    return subprocess.run(command, cwd=REPO, env=env or host_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # the sampler in a process of its own
def test_an_unknown_key_is_one_line_naming_the_closest_keys(tmp_path):
    proc = sample("--max_new_tokenz=3", f"--output_dir={tmp_path}")
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2
    assert any("`max_new_tokenz`: did you mean max_new_tokens?" in line for line in lines), lines
    assert len(lines) <= 3 and "Traceback" not in proc.stderr and "usage:" not in proc.stderr


def test_an_unknown_yaml_key_names_the_closest_nested_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_CONFIG.read_text().replace("max_rounds: 8", "max_roundz: 8"))
    with pytest.raises(ConfigError, match=r"`max_roundz` are not valid .*did you mean .*max_rounds"):
        parse_command_line(["--config_path", str(bad)])


def test_help_lists_the_samplers_own_fields_before_levanters(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_command_line(["--config_path", str(TINY_CONFIG), "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    own = [out.index(f"--{name}") for name in ("hf_checkpoint", "prompts_file", "max_new_tokens", "stop_sequences")]
    nested = [out.index(f"--{name}") for name in ("trainer.", "engine.", "model.")]
    assert max(own) < min(nested), out[:2000]


@pytest.mark.multihost
def test_a_bad_config_on_several_hosts_is_a_few_lines_and_no_native_dumps(tmp_path):
    """Every host finds the mistake; only the leader says it, and no host dumps JAX's native errors."""
    run = launch(
        tmp_path,
        '--prompts=["1+2=", "not addition"]',
        "--trainer.model_axis_size=1",
        hosts=2,
        devices_per_host=1,
        check=False,
    )
    lines = [line for line in run.output.splitlines() if line.strip()]
    assert run.returncode == 2, run.tail()
    assert len(lines) <= 25, run.output
    assert sum("is not an addition problem" in line for line in lines) == 1, run.output
    assert not any(dump in run.output for dump in NATIVE_DUMPS), run.output
    assert "Traceback" not in run.output


@pytest.mark.slow  # one sampler process, no launcher
def test_the_tiny_config_runs_as_one_plain_process(tmp_path):
    env = {k: v for k, v in host_env().items() if k != "XLA_FLAGS"}  # no launcher: the sampler makes its 4 devices
    proc = sample('--prompts=["12+30=", "7+5="]', f"--output_dir={tmp_path}", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "host 0 of 1 (pid" in proc.stderr and "4 local devices" in proc.stderr
    assert (tmp_path / "merged.jsonl").read_text().count("\n") == 2


def test_a_run_is_named_after_its_config_unless_named():
    assert parse_command_line(["--config_path", str(TINY_CONFIG)]).run_name == "tiny_local"
    assert parse_command_line(["--config_path", str(TINY_CONFIG), "--run_name", "mine"]).run_name == "mine"


def test_tracker_keys_are_set_one_by_one_from_the_command_line(tmp_path):
    """draccus takes trainer.tracker only whole; the sampler takes its keys one by one, as for any other field."""
    from levanter.tracker.wandb import WandbConfig

    base = ["--config_path", str(TINY_CONFIG)]  # its tracker is noop
    config = parse_command_line([*base, "--trainer.tracker.type", "wandb", "--trainer.tracker.mode=offline"])
    tracker = config.trainer.tracker
    assert isinstance(tracker, WandbConfig) and (tracker.mode, tracker.project) == ("offline", "levanter")
    v5p = REPO / "config/sampler/llama8b_v5p32_256x2048.yaml"  # a wandb tracker: the other keys are kept
    tracker = parse_command_line(["--config_path", str(v5p), "--trainer.tracker.mode", "offline"]).trainer.tracker
    assert (tracker.mode, tracker.project) == ("offline", "levanter-multihost-inference")
    assert "host-dp" in tracker.tags
    with pytest.raises(ConfigError, match=r"--trainer.tracker.mood offline: not a tracker setting"):
        parse_command_line([*base, "--trainer.tracker.type=wandb", "--trainer.tracker.mood", "offline"])
