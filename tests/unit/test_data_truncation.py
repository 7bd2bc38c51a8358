"""Truncation keeps the pair prompt, the template's control tokens and the end of the question."""

import re
from pathlib import Path

import pytest

from megatron_amopo.data.config import DataConfig, PromptConfig
from megatron_amopo.data.prompts import PromptBuilder, load_templates
from megatron_amopo.data.records import PreferenceRecord, Skip, iter_rows, records
from megatron_amopo.data.tokenization import GroupEncoder, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
HS2 = str(ROOT / "data" / "helpsteer2" / "train_rows.jsonl")
TOK = str(ROOT / "data" / "tokenizer-qwen2")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOK)


def _encoder(tok, **data):
    cfg = DataConfig(format="helpsteer2", **data)
    builder = PromptBuilder(load_templates(None), cfg.dimensions, cfg.score_min, cfg.score_max)
    return GroupEncoder(tok, cfg, PromptConfig(), builder), cfg


def test_all_helpsteer2_rows_at_512(tok):
    enc, cfg = _encoder(tok, seq_length=512)
    assert enc.piecewise  # the fast path must agree with whole-text encoding (checked at init)
    recs = [r for r in records(iter_rows(HS2), cfg) if isinstance(r, PreferenceRecord)]
    kept = truncated = dropped = cut = uneven = 0
    for rec in recs:
        group = enc.encode(rec)
        if isinstance(group, Skip):
            assert group.reason == "truncation_limit"
            dropped += 1
            continue
        kept += 1
        truncated += group.user_tokens_lost > 0
        prompts = enc.builder.build_pair_prompts(rec.chosen_scores)
        question_end = rec.turns[-1]["content"][-60:]
        users = set()
        for i, (seq, start) in enumerate(zip(group.sequences, group.response_start)):
            assert len(seq) <= 513
            text = tok.decode(seq)
            head = f"<|im_start|>system\n{prompts[i // 2]}<|im_end|>\n<|im_start|>"
            assert text.startswith(head)
            assert f"{question_end}<|im_end|>\n<|im_start|>assistant\n" in text
            assert tok.decode(seq[:start]).endswith("<|im_start|>assistant\n")
            response = tok.decode(seq[start:])
            whole = (rec.chosen, rec.rejected)[i % 2]
            if response.endswith("<|im_end|>"):  # the whole response and its end-of-turn token
                assert group.responses_cut == 0 and response[: -len("<|im_end|>")].strip() == whole.strip()
            else:  # cut (or, under "even", whole beside a cut one): a prefix, no end-of-turn token anywhere
                assert group.responses_cut > 0
                assert "<|im_end|>" not in response and whole.startswith(response.rstrip())
                cut += len(response.strip()) < len(whole.strip())
            users.add(text[len(head) : text.rindex("<|im_start|>assistant")])
        assert len(users) == 1  # the same (possibly cut) conversation in all 2P sequences
        uneven += group.responses_cut == 1
    assert kept + dropped == len(recs) and truncated > 50 and kept > 300 and cut > 100 and uneven > 20


def _ends(tok, group) -> list[tuple[bool, bool]]:
    """Per pair: does (chosen, rejected) end with the end-of-turn token?"""
    last = [int(seq[-1]) == tok.eos_token_id for seq in group.sequences]
    return list(zip(last[0::2], last[1::2]))


@pytest.mark.parametrize("cut_ends", ["even", "keep", "drop"])
def test_one_cut_response(tok, cut_ends):
    """A pair never compares a stop against no stop unless cut_ends=keep asks for it."""
    enc, cfg = _encoder(tok, seq_length=384, cut_ends=cut_ends)
    counts = {0: 0, 1: 0, 2: 0}
    skipped = 0
    for rec in records(iter_rows(HS2, limit=300), cfg):
        if not isinstance(rec, PreferenceRecord):
            continue
        group = enc.encode(rec)
        if isinstance(group, Skip):
            skipped += group.reason == "cut_response"
            if group.reason == "cut_response":
                assert cut_ends == "drop" and "response is cut, the other is whole" in group.detail
            continue
        counts[group.responses_cut] += 1
        ends = _ends(tok, group)
        if group.responses_cut == 0:
            assert ends == [(True, True)] * len(ends)
        elif group.responses_cut == 2 or cut_ends == "even":
            assert ends == [(False, False)] * len(ends)
        else:
            assert cut_ends == "keep" and len(set(ends)) == 1 and ends[0] in ((True, False), (False, True))
    assert counts[0] > 10 and counts[2] > 10
    if cut_ends == "drop":
        assert counts[1] == 0 and skipped > 20
    else:
        assert counts[1] > 20 and skipped == 0


def test_cut_ends_is_checked():
    with pytest.raises(ValueError, match="--cut-ends must be one of"):
        DataConfig(format="helpsteer2", cut_ends="strip")


def test_oldest_turns_go_first(tok):
    enc, cfg = _encoder(tok, seq_length=512, max_user_loss=1.0)
    recs = [r for r in records(iter_rows(HS2), cfg) if isinstance(r, PreferenceRecord) and len(r.turns) >= 5]
    checked = 0
    for rec in recs:
        group = enc.encode(rec)
        if group.user_tokens_lost == 0:
            continue
        text = tok.decode(group.sequences[0][: group.response_start[0]])  # up to the response
        kept_turns = re.findall(r"<\|im_start\|>(user|assistant)\n(.*?)<\|im_end\|>", text, re.S)
        n = len(kept_turns)
        tail = [(t["role"], t["content"]) for t in rec.turns[-n:]]
        # the kept history is the newest n turns; only the first kept one may be cut, at its start
        assert kept_turns[1:] == tail[1:]
        assert kept_turns[0][0] == tail[0][0] and tail[0][1].endswith(kept_turns[0][1])
        assert n < len(rec.turns) or len(kept_turns[0][1]) < len(tail[0][1])
        checked += 1
    assert checked >= 5


def test_response_keeps_its_share(tok):
    enc, cfg = _encoder(tok, seq_length=512, max_user_loss=1.0, response_share=0.7)
    whole, _ = _encoder(tok, seq_length=100_000)
    recs = [r for r in records(iter_rows(HS2, limit=400), cfg) if isinstance(r, PreferenceRecord)]
    n_tok = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    seen = 0
    for rec in recs:
        n_resp = n_tok(rec.chosen)
        if n_resp < 600:
            continue
        n_user = sum(n_tok(t["content"]) for t in rec.turns)
        full = whole.encode(rec)  # untruncated: overhead = pair prompt + template tokens
        free = min(513 - (len(full.sequences[i]) - n_user - n_resp) for i in range(0, len(full.sequences), 2))
        group = enc.encode(rec)
        for i in range(0, len(group.sequences), 2):
            assert group.sequences[i][-1] != tok.eos_token_id  # a cut response has no end-of-turn token
            kept = len(group.sequences[i]) - group.response_start[i]
            assert kept >= int(0.7 * free) - 1
        seen += 1
    assert seen >= 3


def test_group_that_cannot_fit_is_too_long(tok):
    enc, cfg = _encoder(tok, seq_length=64)
    rec = next(r for r in records(iter_rows(HS2), cfg) if isinstance(r, PreferenceRecord))
    out = enc.encode(rec)
    assert isinstance(out, Skip) and out.reason == "too_long" and "--seq-length 64" in out.detail
