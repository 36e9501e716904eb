"""Weights and KV cache per chip from the model's real partition specs, on the 4 CPU devices of conftest.

The tiny model's numbers are checked three ways: by hand, against its checkpoint's tensor sizes, and against
where haliax really puts the arrays on a 4-device mesh. Llama-3-8B is built from a hand-written config,
abstractly (no weights), under both shardings the throughput issue compares.
"""

import json
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from levanter.models.llama import LlamaConfig

from levanter_multihost.footprint import (
    HeadTilingError,
    ShardingConfigError,
    _kernel_tiles,
    check_head_tiling,
    model_footprint,
)

TINY = Path(__file__).resolve().parents[1] / "assets" / "tiny-addition"
BF16 = jnp.bfloat16
TP = ["heads", "mlp"]
TP_ALL = ["heads", "mlp", "kv_head", "vocab"]


def mapping(axes):
    """What TrainerConfig.compute_axis_mapping gives for ``tensor_parallel_axes=axes``."""
    return {**{a: "model" for a in axes}, "batch": ("replica", "data")}


def tiny_config() -> LlamaConfig:
    from transformers import LlamaConfig as HfLlamaConfig

    return LlamaConfig.from_hf_config(HfLlamaConfig.from_json_file(str(TINY / "config.json")))


def llama3_8b() -> LlamaConfig:
    return LlamaConfig(
        seq_len=8192,
        hidden_dim=4096,
        intermediate_dim=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        tie_word_embeddings=False,
    )


# Llama-3-8B by hand (H 4096, I 14336, 32 layers, 32 heads of 128, 8 KV heads, vocab 128256):
#   per layer: q 4096*4096 + k, v 2*4096*1024 + o 4096*4096 + mlp 3*4096*14336 + 2 norms 4096 = 218,112,000
#   embeddings and lm_head 2*128256*4096 = 1,050,673,152; final norm 4096; total 8,030,261,248 parameters
P8B = 8_030_261_248
# [heads, mlp] on 4 chips: o and the MLP split 4 ways; q, k, v, norms, embeddings, lm_head whole:
#   per layer 16,777,216 + 8,388,608 + 8192 + (16,777,216 + 176,160,768) / 4 = 73,408,512
P8B_TP = 32 * 73_408_512 + 1_050_673_152 + 4096
# [heads, mlp, kv_head, vocab]: all but the norms split 4 ways
P8B_TP_ALL = 32 * ((218_112_000 - 8192) // 4 + 8192) + 1_050_673_152 // 4 + 4096
# one page of 128 tokens: 32 layers x 128 slots x (8 K + 8 V heads) x 128 x 2 bytes
KV_PAGE_8B = 32 * 128 * 16 * 128 * 2


def test_8b_heads_mlp_keeps_attention_inputs_embeddings_and_kv_whole():
    f = model_footprint(llama3_8b(), 128256, mapping(TP), 4, BF16, 128, BF16)
    assert f.weight_bytes == 2 * P8B == 16_060_522_496
    assert f.weight_bytes_per_chip == 2 * P8B_TP == 6_799_499_264
    assert f.weight_fraction_per_chip == pytest.approx(0.4234, abs=1e-4)
    assert f.kv_bytes_per_page == f.kv_bytes_per_page_per_chip == KV_PAGE_8B == 16 * 2**20
    assert f.kv_fraction_per_chip == 1.0
    replicated = {name.rsplit(".", 2)[-2] for name in f.replicated}
    assert replicated == {
        "q_proj",
        "k_proj",
        "v_proj",
        "input_layernorm",
        "post_attention_layernorm",
        "norm",
        "token_embeddings",
        "lm_head",
    }
    q = next(a for a in f.weights if a.name.endswith("q_proj.weight"))
    assert q.axes == ("layer", "kv_head", "q_heads_per_group", "head_size", "embed")
    assert f.sharded_axes == ("heads", "mlp") and f.indivisible == ()
    assert len(f.kv_page) == 32 and f.kv_bytes_per_chip(1000) == 1000 * KV_PAGE_8B


def test_8b_sharding_kv_head_and_vocab_quarters_weights_and_kv():
    f = model_footprint(llama3_8b(), 128256, mapping(TP_ALL), 4, BF16, 128, BF16)
    assert f.weight_bytes == 2 * P8B
    assert f.weight_bytes_per_chip == 2 * P8B_TP_ALL == 4_015_529_984
    assert f.weight_fraction_per_chip <= 0.27
    assert f.kv_bytes_per_page == KV_PAGE_8B
    assert f.kv_bytes_per_page_per_chip == KV_PAGE_8B // 4 == 4 * 2**20
    assert f.kv_fraction_per_chip <= 0.26
    # only the norms stay whole: 65 vectors of 4096
    assert f.replicated_weight_bytes == (2 * 32 + 1) * 4096 * 2
    page = f.kv_page[0]
    assert page.axes == ("page", "slot", "kv_head", "head_size")
    assert page.shape == (1, 128, 16, 128) and page.spec == (None, None, "model", None)


def test_abstract_mesh_plans_more_chips_than_this_machine_has():
    assert len(jax.devices()) == 4
    f = model_footprint(llama3_8b(), 128256, mapping(TP_ALL), 8, BF16, 128, BF16)
    assert f.weight_bytes_per_chip == 2 * (32 * ((218_112_000 - 8192) // 8 + 8192) + 1_050_673_152 // 8 + 4096)
    assert f.kv_bytes_per_page_per_chip == KV_PAGE_8B // 8


# The tiny model by hand (H 64, I 256, 4 layers, 4 heads of 16, 4 KV heads, vocab 24):
#   per layer: q, k, v, o 4 * 64*64 + mlp 3*64*256 + 2 norms 64 = 65,664; embeddings 2*24*64; final norm 64
P_TINY = 4 * 65_664 + 2 * 24 * 64 + 64
P_TINY_TP = 4 * (3 * 4096 + 128 + (4096 + 49_152) // 4) + 2 * 24 * 64 + 64
P_TINY_TP_ALL = 4 * ((65_664 - 128) // 4 + 128) + 2 * 24 * 64 // 4 + 64


def test_tiny_model_matches_its_checkpoint_and_the_hand_count():
    header = (TINY / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", header[:8])
    tensors = {k: v for k, v in json.loads(header[8 : 8 + n]).items() if k != "__metadata__"}
    in_checkpoint = sum(int(np.prod(t["shape"])) for t in tensors.values())
    f = model_footprint(tiny_config(), 24, mapping(TP), 4, jnp.float32, 16, BF16)
    assert in_checkpoint == P_TINY == 265_792
    assert f.weight_bytes == 4 * P_TINY
    assert f.weight_bytes_per_chip == 4 * P_TINY_TP == 4 * 106_048
    # 4 layers x 16 slots x (4 K + 4 V heads) x 16 x 2 bytes, whole on every chip
    assert f.kv_bytes_per_page == f.kv_bytes_per_page_per_chip == 4 * 16 * 8 * 16 * 2


@pytest.mark.parametrize("axes", [TP, TP_ALL], ids=["heads-mlp", "heads-mlp-kv_head-vocab"])
def test_tiny_model_per_chip_bytes_match_what_haliax_puts_on_each_device(axes):
    """Shard the real tiny model and allocate a real engine-style cache on 4 CPU devices, then weigh each device."""
    import haliax as hax
    from haliax import Axis
    from jax.sharding import Mesh
    from levanter.inference.page_table import PageTable

    config, pages, page_size = tiny_config(), 8, 16
    f = model_footprint(config, 24, mapping(axes), 4, jnp.float32, page_size, BF16)
    mesh = Mesh(np.array(jax.devices()).reshape(1, 1, 4), ("replica", "data", "model"))
    with hax.partitioning.set_mesh(mesh), hax.axis_mapping(mapping(axes)):
        model = hax.shard(config.build(Axis("vocab", 24), key=jax.random.PRNGKey(0)), mapping(axes))
        spec = PageTable.init(pages, 4, page_size, 4).spec()
        cache = hax.named_jit(model.initial_cache)(spec, dtype=BF16)  # as InferenceEngine does

    def per_device(tree) -> dict:
        held: dict = {}
        for leaf in jax.tree_util.tree_leaves(tree):
            for shard in leaf.addressable_shards:
                held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
        return held

    weights, kv = per_device(model), per_device(cache)
    assert len(weights) == len(kv) == 4
    assert max(weights.values()) == f.weight_bytes_per_chip == 4 * (P_TINY_TP if axes == TP else P_TINY_TP_ALL)
    assert max(kv.values()) == pages * f.kv_bytes_per_page_per_chip
    assert f.kv_fraction_per_chip == (1.0 if axes == TP else 0.25)


def test_uneven_vocab_is_reported_and_jax_refuses_it():
    import haliax as hax
    from jax.sharding import Mesh

    f = model_footprint(tiny_config(), 25, mapping(TP_ALL), 4, jnp.float32, 16, BF16)
    assert {(i.name, i.axis, i.size, i.shards) for i in f.indivisible} == {
        ("embeddings.token_embeddings.weight", "vocab", 25, 4),
        ("lm_head.weight", "vocab", 25, 4),
    }
    embed = next(a for a in f.weights if a.name == "embeddings.token_embeddings.weight")
    assert embed.bytes_per_chip == 7 * 64 * 4  # counted at the padded ceil(25 / 4) rows
    mesh = Mesh(np.array(jax.devices()).reshape(1, 1, 4), ("replica", "data", "model"))
    with hax.partitioning.set_mesh(mesh), pytest.raises(ValueError, match="evenly divide"):
        hax.shard(hax.zeros({"vocab": 25, "embed": 64}), mapping(TP_ALL))


def test_sharding_both_query_head_axes_is_refused_with_a_fix():
    with pytest.raises(ShardingConfigError) as err:
        model_footprint(tiny_config(), 24, mapping(["heads", "kv_head", "q_heads_per_group"]), 4, BF16, 16, BF16)
    e = err.value
    assert e.field == "trainer.tensor_parallel_axes"
    assert e.value == ["heads", "kv_head", "q_heads_per_group"] and e.suggested == ["heads", "kv_head"]
    assert "q_proj.weight" in str(e) and "Use ['heads', 'kv_head']" in str(e)


def test_a_mapping_to_an_axis_the_host_mesh_lacks_is_refused():
    with pytest.raises(ShardingConfigError, match=r"'mlp' to \['tensor'\].*e\.g\. mlp: model"):
        model_footprint(tiny_config(), 24, {"mlp": "tensor"}, 4, BF16, 16, BF16)


@pytest.mark.parametrize(
    "heads, kv_heads, model, axes, kv_bytes",
    [
        (32, 8, 4, TP, 2),  # Llama-3-8B, the current sharding
        (32, 8, 4, TP_ALL, 2),  # and the proposed one: 2 KV heads per chip
        (32, 8, 8, TP_ALL, 2),  # 1 KV head per chip: 2 combined bf16 heads tile
        (4, 4, 4, TP_ALL, 2),  # the tiny model
        (32, 8, 4, ["heads", "q_heads_per_group"], 2),  # 4 query heads per group split 4 ways
        (40, 8, 8, TP, 4),  # float32 KV, 8 heads whole
        (32, 8, 4, TP_ALL, 1),  # 8-bit KV, 2 per chip: 4 combined heads = one 32-bit word
    ],
)
def test_head_tiling_accepts(heads, kv_heads, model, axes, kv_bytes):
    check_head_tiling(heads, kv_heads, model, axes, kv_dtype_bytes=kv_bytes)


def test_head_tiling_refuses_kv_heads_the_model_axis_does_not_divide():
    with pytest.raises(HeadTilingError) as err:
        check_head_tiling(16, 2, 4, ["heads", "mlp", "kv_head"])
    e = err.value
    assert isinstance(e, ValueError)
    assert (e.field, e.value, e.suggested) == ("trainer.model_axis_size", 4, 2)
    msg = str(e)
    assert "trainer.tensor_parallel_axes ['heads', 'kv_head', 'mlp'] with trainer.model_axis_size 4" in msg
    assert "kv_head (2) 4 ways" in msg
    assert "Set trainer.model_axis_size: 2 or trainer.tensor_parallel_axes: ['heads', 'mlp']." in msg


def test_head_tiling_refuses_query_heads_split_unevenly():
    with pytest.raises(HeadTilingError, match=r"heads \(12\) 8 ways.*trainer\.model_axis_size: 4") as err:
        check_head_tiling(12, 4, 8, ["heads", "mlp"])
    assert err.value.suggested == 4


def test_head_tiling_refuses_both_query_head_axes():
    with pytest.raises(HeadTilingError) as err:
        check_head_tiling(32, 8, 4, ["kv_head", "q_heads_per_group"])
    e = err.value
    assert (e.field, e.value, e.suggested) == (
        "trainer.tensor_parallel_axes",
        ["kv_head", "q_heads_per_group"],
        ["kv_head"],
    )
    assert "Set trainer.tensor_parallel_axes: ['kv_head']." in str(e)


def test_head_tiling_refuses_what_the_tpu_kernel_cannot_tile():
    # 8-bit KV on 8 chips: 1 KV head per chip is 2 combined 1-byte heads, half a 32-bit word
    with pytest.raises(HeadTilingError) as err:
        check_head_tiling(32, 8, 8, TP_ALL, kv_dtype_bytes=1)
    e = err.value
    assert (e.field, e.value, e.suggested) == ("trainer.model_axis_size", 8, 4)
    assert "1 KV heads per chip (2 combined K/V heads of 1-byte dtype)" in str(e)
    assert "falls back to its reference attention" in str(e)
    assert "trainer.tensor_parallel_axes: ['heads', 'mlp', 'vocab']" in str(e)
    # 12 KV heads in bf16: neither whole (12) nor split (6, 3) tiles; nothing to suggest
    with pytest.raises(HeadTilingError, match="No model axis size or head-axis choice fixes it") as err:
        check_head_tiling(36, 12, 4, TP)
    assert (err.value.field, err.value.suggested) == ("trainer.tensor_parallel_axes", None)


def test_head_tiling_refuses_a_model_whose_query_heads_do_not_group():
    with pytest.raises(HeadTilingError, match=r"model.num_heads 30 .* model.num_kv_heads 4.*e\.g\. 3") as err:
        check_head_tiling(30, 4, 1, [])
    assert err.value.field == "model.num_kv_heads"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int8])
def test_kernel_rule_matches_the_installed_kernel(dtype):
    """The tiling rule encoded here, against the pinned JAX kernel's own check (it runs without a TPU)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention.kernel import get_min_heads_per_blk

    for combined in range(2, 132, 2):
        try:
            get_min_heads_per_blk(combined // 2, combined, dtype, dtype)
            accepted = True
        except ValueError:
            accepted = False
        assert _kernel_tiles(combined, jnp.dtype(dtype).itemsize) == accepted, combined


def test_import_starts_no_jax_backend():
    code = (
        "import sys, levanter_multihost.footprint as f; "
        "assert 'jax' not in sys.modules, 'jax imported'; "
        "f.check_head_tiling(32, 8, 4, ['heads', 'mlp', 'kv_head']); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
