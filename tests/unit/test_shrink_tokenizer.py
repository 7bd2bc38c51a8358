"""make_tiny_model.py --tokenizer-size: the real Qwen2 tokenizer cut to its first N tokens stays a working
tokenizer (same text back, same chat template and special tokens) whose ids are all below N."""

from __future__ import annotations

import os

import pytest

from megatron_amopo.convert.tiny_hf import shrink_bpe_tokenizer
from megatron_amopo.testing.pipeline import REPO

QWEN2 = os.path.join(REPO, "data", "tokenizer-qwen2")


def test_shrunk_tokenizer_round_trips_below_its_size(tmp_path):
    from transformers import AutoTokenizer

    shrink_bpe_tokenizer(QWEN2, str(tmp_path), 512)
    small, full = AutoTokenizer.from_pretrained(str(tmp_path)), AutoTokenizer.from_pretrained(QWEN2)
    chat = [{"role": "user", "content": "Wie geht's? The quick brown fox, 3.14 — ünïcødé."}]
    text = full.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert small.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text
    ids = small(text)["input_ids"]
    assert len(small) == 512 and max(ids) < 512
    assert len(ids) > len(full(text)["input_ids"])  # fewer merges: more pieces
    assert small.decode(ids) == text
    assert small.eos_token == full.eos_token and small.eos_token_id == 511  # <|im_end|>, renumbered (509 + 2)
    assert small.convert_ids_to_tokens(list(range(300))) == full.convert_ids_to_tokens(list(range(300)))


def test_shrinking_below_the_byte_tokens_is_refused(tmp_path):
    with pytest.raises(ValueError, match="size above 256"):
        shrink_bpe_tokenizer(QWEN2, str(tmp_path), 200)
