"""Model and engine for ``bench/decode_program.py``: the checkpoint as the sampler loads it, or random / abstract weights.

Abstract weights (shapes only, nothing allocated) let the loops of the 8B TPU config's program be traced and
compiled on this CPU, partitioned as on a v5p host.
"""

import dataclasses
import math
import os
import re
from pathlib import Path

KNOWN_SHAPES = {
    # HF-style shapes of checkpoints that cannot be read offline (as levanter_multihost.capacity_inputs knows them)
    r"llama-?3(\.\d)?-8b": {
        "hidden_dim": 4096,
        "intermediate_dim": 14336,
        "num_layers": 32,
        "num_heads": 32,
        "num_kv_heads": 8,
        "vocab": 128256,
    },
}


def engine_for(config, B: int, context: int):
    """The engine of B slots that decodes B sequences of ``context`` tokens per iteration."""
    c = config.engine
    pages = B * math.ceil((context + 1) / c.page_size) + 1
    max_seq_len = max(c.max_seq_len, context + 1)
    return dataclasses.replace(
        c,
        max_seqs=B,
        max_tokens_per_round=B,
        max_queued_tokens=max(B, 1),
        max_seqs_in_prefill=B,
        max_pages=pages,
        max_seq_len=max_seq_len,
    )


class Setup:
    """Model, tokenizer (or None), sampler, and how to make a fresh engine or an abstract gen_state."""

    def __init__(self, config, args):
        import jax

        from levanter_multihost import model_loading

        self.config = config
        self.engine_config = config.engine
        self.abstract = False
        ref = config.hf_checkpoint
        local = ref is not None and os.path.isdir(ref.model_name_or_path)
        self.tokenizer = None
        if local:
            from levanter.compat.hf_checkpoints import RepoRef, load_tokenizer

            from levanter_multihost.runplan import ModelSource

            checkpoint = model_loading.resolve_location(ref.model_name_or_path, "hf_checkpoint")
            self.tokenizer = load_tokenizer(
                model_loading.resolve_location(config.tokenizer or checkpoint, "tokenizer")
            )
        if local and not args.random_weights:
            source = ModelSource(RepoRef(checkpoint, ref.revision), None, config.model, config.trainer)
            self.model = model_loading.load_model(source, self.tokenizer)
            self.source = f"checkpoint {ref.model_name_or_path}"
        else:
            model_config, vocab = self._model_config(config, local)
            self.abstract = args.loops_only and not local
            self.model = build_random_model(model_config, vocab, config.trainer, abstract=self.abstract)
            self.source = ("abstract shapes of " if self.abstract else "random weights, shape of ") + str(
                ref.model_name_or_path if ref else "config.model"
            )
        from levanter.layers.sampler import Sampler

        self.sampler = Sampler(self.model.Vocab)
        jax.block_until_ready(self.model) if not self.abstract else None

    @staticmethod
    def _model_config(config, local):
        import haliax as hax
        from levanter.models.llama import LlamaConfig

        ref = config.hf_checkpoint
        if local:
            converter = config.model.hf_checkpoint_converter(ref_checkpoint=os.path.abspath(ref.model_name_or_path))
            model_config = converter.config_from_hf_checkpoint(os.path.abspath(ref.model_name_or_path))
            import json

            vocab = json.loads((Path(ref.model_name_or_path) / "config.json").read_text())["vocab_size"]
            return model_config, hax.Axis("vocab", vocab)
        name = (ref.model_name_or_path if ref else "").lower()
        shape = next((s for pattern, s in KNOWN_SHAPES.items() if re.search(pattern, name)), None)
        if shape is None:
            raise SystemExit(f"No config.json for {name!r} offline and not a known shape ({list(KNOWN_SHAPES)}).")
        shape = dict(shape)
        vocab = shape.pop("vocab")
        return LlamaConfig(seq_len=config.engine.max_seq_len, **shape), hax.Axis("vocab", vocab)

    def fresh_engine(self):
        from levanter.inference.engine import InferenceEngine

        return InferenceEngine.from_model_with_config(
            model=self.model, tokenizer=self.tokenizer, config=self.engine_config
        )

    def gen_state_for_tracing(self):
        """A fresh engine's gen_state, or its abstract shapes (nothing allocated) for an abstract model."""
        if not self.abstract:
            engine = self.fresh_engine()
            return engine.gen_state, engine
        import equinox as eqx
        from levanter.inference import engine as engine_module
        from levanter.inference.engine import GenState
        from levanter.inference.page_table import PageTable

        c = self.engine_config
        if c.max_pages is None:
            raise SystemExit("--loops_only with abstract weights needs engine.max_pages set in the config.")
        # as InferenceEngine.from_model_with_config builds it, with the KV cache as shapes only
        table = PageTable.init(c.max_pages, c.max_seqs, c.page_size, c.max_pages_per_seq)
        cache = eqx.filter_eval_shape(lambda m: m.initial_cache(table.spec(), dtype=c.compute_dtype), self.model)
        cache = with_shardings(cache, self.config.trainer.compute_axis_mapping)
        # the engine's own name for the class, which the decode-step seam replaces
        decode_state = engine_module.DecodeState.init(
            table,
            max_stop_seqs=c.max_stop_seqs,
            max_stop_tokens=c.max_stop_tokens,
            max_queued_tokens=c.max_queued_tokens,
            enable_logprobs=c.enable_logprobs,
        )
        return GenState(cache=cache, decode_state=decode_state), None


def build_random_model(model_config, vocab, trainer, abstract: bool):
    import equinox as eqx
    import haliax as hax
    import jax
    from haliax.partitioning import round_axis_for_partitioning

    mapping = trainer.compute_axis_mapping
    vocab = round_axis_for_partitioning(vocab, mapping)

    def build(key):
        return trainer.mp.cast_to_compute(model_config.build(vocab, key=key))

    if abstract:
        return with_shardings(eqx.filter_eval_shape(build, jax.random.PRNGKey(0)), mapping)
    return hax.named_jit(build, axis_resources=mapping)(jax.random.PRNGKey(0))


def with_shardings(abstract_tree, mapping):
    """Abstract arrays carrying the shardings the axis mapping gives them on the current mesh (as loading the
    model or ``named_jit(model.initial_cache)`` would place them), so the program is partitioned as for real."""
    import haliax as hax
    import haliax.tree_util as htu
    import jax
    from haliax import NamedArray

    shardings = hax.partitioning.infer_resource_partitions(abstract_tree, mapping, preserve_existing_shardings=False)

    def attach(node, sharding):
        if isinstance(node, NamedArray) and sharding is not None:
            a = node.array
            return NamedArray(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), node.axes)
        return node

    return htu.tree_map(attach, abstract_tree, shardings, is_leaf=lambda x: isinstance(x, NamedArray))
