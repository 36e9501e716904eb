"""Prompts into token ids: the BOS convention, chat templates (one BOS, not two), per-row overrides, and stop
strings and EOS ids into stop sequences. Tokenizers only; no model."""

import json
import shutil

import numpy as np
import pytest
from multihost import REPO
from tokenizers import processors
from transformers import AutoTokenizer

from levanter_multihost.encoding import bos_wanted, encode_prompts, eos_ids, stop_condition
from levanter_multihost.errors import ConfigError
from levanter_multihost.prompts import read_prompts

TINY = REPO / "assets" / "tiny-addition"
CHAT = [{"role": "user", "content": "7+5="}]


@pytest.fixture(scope="module")
def tiny():
    return AutoTokenizer.from_pretrained(str(TINY))


@pytest.fixture(scope="module")
def adds_bos(tmp_path_factory):
    """The tiny tokenizer made to add BOS by itself, as Llama-3's does, and with a template that writes BOS too."""
    tokenizer = AutoTokenizer.from_pretrained(str(TINY))
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tokenizer


def encode(tokenizer, records, add_bos=None, chat_template=None):
    return encode_prompts(
        records,
        tokenizer,
        chat_template=chat_template,
        add_bos=add_bos,
        max_new_tokens=6,
        temperature=0.5,
        n_generations=2,
    )


def test_bos_follows_the_tokenizer_unless_the_config_says(tiny, adds_bos):
    records = read_prompts(prompts=["12+30="])
    assert not bos_wanted(tiny, None) and bos_wanted(adds_bos, None)
    assert encode(tiny, records).tokens[0][0] != tiny.bos_token_id  # the tiny model was trained without BOS
    assert encode(tiny, records, add_bos=True).tokens[0][0] == tiny.bos_token_id
    assert encode(adds_bos, records).tokens[0][0] == adds_bos.bos_token_id
    assert encode(adds_bos, records, add_bos=False).tokens[0][0] != adds_bos.bos_token_id


def test_a_chat_template_that_writes_bos_gets_one_bos_not_two(adds_bos):
    ids = encode(adds_bos, read_prompts(prompts=[{"messages": CHAT}])).tokens[0]
    assert ids[0] == adds_bos.bos_token_id and ids[1] != adds_bos.bos_token_id
    assert adds_bos.decode(ids[1:]) == "7+5="


def test_a_template_from_the_config_wins_over_the_tokenizers(tiny):
    prompts = encode(tiny, read_prompts(prompts=[{"messages": CHAT}]), chat_template="{{ messages[0]['content'] }}1")
    assert prompts.texts == ["7+5=1"]


def test_per_row_overrides_fill_in_over_the_config(tiny):
    rows = [{"prompt": "1+2="}, {"prompt": "3+4=", "max_new_tokens": 3, "temperature": 0.0, "n_generations": 5}]
    prompts = encode(tiny, read_prompts(prompts=rows))
    assert prompts.max_new_tokens.tolist() == [6, 3]
    assert np.allclose(prompts.temperature, [0.5, 0.0]) and prompts.n_generations.tolist() == [2, 5]
    assert prompts.total_sequences == 7


def test_stop_strings_and_eos_become_the_engines_stop_sequences(tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(TINY, ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 18]}))
    assert eos_ids(tiny, str(ckpt)) == (2, 18) and eos_ids(tiny, str(TINY)) == (2,)
    stop = stop_condition(tiny, ["9", "+="], True, False, str(ckpt))
    assert stop.token_ids == ((13,), (14, 17)) and stop.sequences == ((13,), (14, 17), (2,), (18,))
    assert stop_condition(tiny, [], False, False, str(ckpt)).sequences == ()
    with pytest.raises(ConfigError, match="tokenizes to the unknown token"):
        stop_condition(tiny, ["x"], True, False, None)
