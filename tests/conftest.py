"""Shared set-up: JAX on several CPU devices, offline hubs and wandb, and the multi-host runs many tests share.

Each multi-host run below starts real processes (``infra/launch.py --local_hosts N``) that form one JAX
distributed job on loopback; it runs once per session and many tests assert on its outputs.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest
from multihost import compile_cache_env, launch

GREEDY_FLAGS = ()
SAMPLED_FLAGS = ("--temperature=0.8", "--seed=7", "--gather_chunk_bytes=512", "--trainer.model_axis_size=1")


@pytest.fixture(scope="session", autouse=True)
def shared_compile_cache(tmp_path_factory):
    """One persistent compilation cache for every run of the session: each program compiles once."""
    cache = tmp_path_factory.mktemp("jax_cache")
    os.environ.update(compile_cache_env(cache))
    return cache


@pytest.fixture(scope="session")
def greedy_4x4(tmp_path_factory):
    """The README's job: 4 hosts x 4 devices, 256 prompts, greedy, tracked to wandb (offline)."""
    out = tmp_path_factory.mktemp("greedy_4x4")
    wandb_dir = tmp_path_factory.mktemp("wandb")
    tracker = "{type: wandb, mode: offline, project: levanter-multihost-test, tags: [host-dp, test]}"
    run = launch(out, "--trainer.tracker", tracker, *GREEDY_FLAGS, hosts=4, env_extra={"WANDB_DIR": str(wandb_dir)})
    run.wandb_dir = wandb_dir
    return run


@pytest.fixture(scope="session")
def greedy_2x4(tmp_path_factory):
    """The same on 2 hosts, logging compilations, to show the programs come from the 4x4 run's cache entries."""
    return launch(tmp_path_factory.mktemp("greedy_2x4"), *GREEDY_FLAGS, hosts=2, env_extra={"JAX_LOG_COMPILES": "1"})


@pytest.fixture(scope="session")
def greedy_1x4(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("greedy_1x4"), *GREEDY_FLAGS, hosts=1)


def _sampled(tmp_path_factory, hosts: int, *flags: str):
    out = tmp_path_factory.mktemp(f"sampled_{hosts}")
    prompts = "--prompts_file=config/prompts/addition_10.txt"
    return launch(out, prompts, *SAMPLED_FLAGS, *flags, hosts=hosts, devices_per_host=1)


@pytest.fixture(scope="session")
def sampled_4(tmp_path_factory):
    """10 prompts at temperature 0.8 on 4 hosts (3, 3, 2, 2), gathered in 512-byte chunks."""
    return _sampled(tmp_path_factory, 4)


@pytest.fixture(scope="session")
def sampled_2(tmp_path_factory):
    """The same on 2 hosts, sharded by estimated cost instead of contiguously."""
    return _sampled(tmp_path_factory, 2, "--shard_strategy=balanced")


@pytest.fixture(scope="session")
def sampled_1(tmp_path_factory):
    return _sampled(tmp_path_factory, 1)
