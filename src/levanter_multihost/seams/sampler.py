"""Top-k, top-p and min-p inside Levanter's engine, per sequence, on device, vectorized over the batch.

What upstream lacks: Levanter's ``Sampler`` takes one temperature per sequence and nothing else, and
``SeqDecodingParams`` carries nothing else to it. What the seam relies on (checked by :func:`check_sampler_seam`):
the engine copies each sequence's ``SeqDecodingParams.temperature`` into ``DecodeState.temperature`` by slot,
gathers it for every sampled position (``decode_state.temperature["seq", slot_ids]``) and hands it, with that
position's logits and key, to ``engine.sampler`` — and reads it nowhere else. So a sequence that uses a control is
given the negative "temperature" ``-(1 + c)``, ``c`` a row of a small table of (temperature, top_k, top_p, min_p)
that :class:`ControlledSampler` holds as arrays, and the engine's sampler is set per batch (:func:`use`). The table
is padded to a power of two and passed as traced arrays, so a new batch's table reuses the compiled programs.

Defaults stay bit-identical: a batch in which no sequence uses a control keeps Levanter's own ``Sampler``, and
within a controlled batch a sequence without controls keeps its plain temperature and the same arithmetic (its
mask keeps every token). Greedy sequences (temperature 0) never use the table. Checked against levanter
1.2.dev1644. Can go when Levanter's ``Sampler`` and ``SeqDecodingParams`` take top-k / top-p / min-p.
"""

import inspect

import haliax as hax
import haliax.nn as hnn
import jax
import jax.numpy as jnp
import numpy as np
from levanter.layers.sampler import Sampler

from levanter_multihost import seams

ENGINE = "levanter.inference.engine"
SAMPLING_FUNCTIONS = ("_prefill_kernel", "_handle_clones", "_run_generation_loop")
"""The engine's functions that gather ``decode_state.temperature`` and call the sampler with it."""
MIN_TABLE_ROWS = 8
NO_CONTROLS = (0.0, 0.0, 1.0, 0.0)
"""(temperature, top_k, top_p, min_p) of a table row no sequence uses: every token kept."""


def check_sampler_seam() -> None:
    """Check everything the seam relies on in the pinned engine; raise :class:`SeamError` naming what moved."""
    from levanter.inference import engine
    from levanter.inference.jit_scheduler import DecodeState, SeqDecodingParams

    if list(inspect.signature(Sampler.__call__).parameters) != ["self", "logits", "temperatures", "key"]:
        raise seams._error("levanter.layers.sampler.Sampler.__call__ is no longer (logits, temperatures, *, key)")
    if "sampler" not in inspect.signature(engine.InferenceEngine.__init__).parameters:
        raise seams._error(f"{ENGINE}.InferenceEngine no longer takes a `sampler`")
    fields = {"SeqDecodingParams": SeqDecodingParams, "DecodeState": DecodeState}
    for name, cls in fields.items():
        if "temperature" not in getattr(cls, "__dataclass_fields__", {}):
            raise seams._error(f"levanter.inference.jit_scheduler.{name}.temperature is gone")
    for name in SAMPLING_FUNCTIONS:
        fn = getattr(engine, name, None)
        code = None if fn is None else inspect.unwrap(fn).__code__
        if code is None or not {"temperature", "sampler"} <= seams.global_names(code) | set(code.co_varnames):
            raise seams._error(f"{ENGINE}.{name} no longer gathers decode_state.temperature for the sampler")


def controlled_temperatures(columns: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """From each sequence's (temperature, top_k, top_p, min_p), the temperature to give the engine, and the table
    of controls (None when no sequence uses one). A sampled sequence with a control gets ``-(1 + its row)``."""
    temperature = columns[:, 0]
    controlled = (temperature > 0) & ((columns[:, 1] > 0) | (columns[:, 2] < 1) | (columns[:, 3] > 0))
    if not controlled.any():
        return temperature, None
    rows, row_of = np.unique(columns[controlled], axis=0, return_inverse=True)
    coded = temperature.copy()
    coded[controlled] = -1.0 - row_of.reshape(-1)
    size = max(MIN_TABLE_ROWS, 1 << (len(rows) - 1).bit_length())
    padding = np.tile([NO_CONTROLS], (size - len(rows), 1)).astype(np.float32)
    return coded, np.concatenate([rows, padding])


class ControlledSampler(Sampler):
    """Levanter's sampler, plus per-sequence top-k, top-p and min-p for sequences given a coded temperature.

    Applied after the temperature and in Hugging Face's order: top-k keeps the k most likely tokens, top-p the
    fewest most likely tokens whose renormalized probability reaches p, min-p those at least p times as likely as
    the most likely; a token tied with the last kept one is kept. The sampled token's log-probability is under
    the distribution it was sampled from (scaled, truncated, renormalized).
    """

    table: jax.Array
    """Rows of (temperature, top_k, top_p, min_p), float32; coded temperature ``-(1 + r)`` reads row ``r``."""

    def __init__(self, Vocab: hax.AxisSelector, table: np.ndarray):
        super().__init__(Vocab)
        self.table = jnp.asarray(table, dtype=jnp.float32)

    def __call__(self, logits, temperatures, *, key):
        coded = temperatures.array < 0
        row = jnp.where(coded, -temperatures.array - 1, 0).astype(jnp.int32)
        controls = jnp.where(coded[..., None], self.table[row], jnp.array(NO_CONTROLS))  # [..., 4]
        temperatures = hax.named(jnp.where(coded, controls[..., 0], temperatures.array), temperatures.axes)

        # from here on Levanter's arithmetic, with the tokens the controls drop masked out
        logits_f32 = logits.astype(jnp.float32)
        greedy = hax.argmax(logits_f32, axis=self.Vocab)
        safe_t = hax.where(temperatures == 0, 1.0, temperatures).astype(jnp.float32)
        scaled = hax.rearrange(logits_f32 / safe_t, (*temperatures.axes, self.Vocab))
        keep = keep_mask(scaled.array, controls[..., 1], controls[..., 2], controls[..., 3])
        masked = hax.named(jnp.where(keep, scaled.array, -jnp.inf), scaled.axes)
        samples = hax.random.categorical(key, masked, axis=self.Vocab)
        tokens = hax.where(temperatures == 0, greedy, samples)

        chosen = hnn.one_hot(tokens, self.Vocab) > 0
        log_prob_tokens = hax.sum(hax.where(chosen, masked, 0.0), axis=self.Vocab) - hnn.logsumexp(masked, self.Vocab)
        return tokens, log_prob_tokens


def keep_mask(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """Which tokens survive top-k, then top-p, then min-p; ``scaled`` is [..., vocab], the controls [...]."""
    ordered = -jnp.sort(-scaled, axis=-1)  # most likely first
    probs = jax.nn.softmax(ordered, axis=-1)
    rank = jnp.arange(scaled.shape[-1])
    in_top_k = (top_k[..., None] < 1) | (rank < top_k[..., None])
    kept = jnp.where(in_top_k, probs, 0.0)
    # top-p on the distribution top-k left, renormalized; p >= 1 keeps all (a cumulative sum can round past 1)
    before = jnp.cumsum(kept, axis=-1) - kept
    in_top_p = (top_p[..., None] >= 1) | (before < top_p[..., None] * kept.sum(-1, keepdims=True))
    above_min_p = probs >= min_p[..., None] * probs[..., :1]
    cut = jnp.min(jnp.where(in_top_k & in_top_p & above_min_p, ordered, jnp.inf), axis=-1)
    return scaled >= cut[..., None]


def use(engine, table: np.ndarray | None) -> None:
    """Give ``engine`` the sampler for a batch whose controls are ``table`` (None: Levanter's own sampler)."""
    vocab = engine.sampler.Vocab
    engine.sampler = Sampler(vocab) if table is None else ControlledSampler(vocab, table)
