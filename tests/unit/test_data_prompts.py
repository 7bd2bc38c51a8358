"""Dimension prompts: fresh per pair, target = chosen score on both sides, real score range, overrides."""

import re
from pathlib import Path

import pytest

from megatron_amopo.data.config import DataConfig, PromptConfig
from megatron_amopo.data.prompts import PromptBuilder, fmt_score, load_templates
from megatron_amopo.data.records import PreferenceRecord, iter_rows, records
from megatron_amopo.data.tokenization import GroupEncoder, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
HS2 = str(ROOT / "data" / "helpsteer2" / "train_rows.jsonl")
UF = str(ROOT / "data" / "ultrafeedback" / "train_rows_200.jsonl")
TOK = str(ROOT / "data" / "tokenizer-qwen2")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOK)


def _encoder(tok, placement="system", templates=None, **data):
    cfg = DataConfig(**data)
    builder = PromptBuilder(load_templates(templates), cfg.dimensions, cfg.score_min, cfg.score_max)
    return GroupEncoder(tok, cfg, PromptConfig(placement=placement, template_file=templates), builder), cfg


def _system(text):
    return re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S).group(1)


def _records(path, cfg, n):
    return [r for r in records(iter_rows(path, limit=n), cfg) if isinstance(r, PreferenceRecord)]


def test_pair_prompts_are_built_fresh_and_target_the_chosen_score(tok):
    enc, cfg = _encoder(tok, format="helpsteer2")
    # pick groups where chosen and rejected differ on every dimension (a wrong target would show)
    recs = [r for r in _records(HS2, cfg, 200) if all(c != x for c, x in zip(r.chosen_scores, r.rejected_scores))]
    assert len(recs) >= 3
    for rec in recs[:3]:
        prompts = enc.builder.build_pair_prompts(rec.chosen_scores)
        assert len(prompts) == cfg.num_pairs == 4
        group = enc.encode(rec)
        texts = [tok.decode(s) for s in group.sequences]
        for k in range(cfg.num_pairs):
            for side in (0, 1):
                # the system message is exactly this pair's prompt: nothing of earlier pairs carried over
                assert _system(texts[2 * k + side]) == prompts[k]
            for j in range(cfg.num_pairs):
                if j != k:
                    assert prompts[j] not in texts[2 * k]
        for k, dim in enumerate(cfg.dimensions, start=1):
            target = f"deserves a score of {fmt_score(rec.chosen_scores[k - 1])}."
            assert target in texts[2 * k] and target in texts[2 * k + 1]
            assert texts[2 * k].count("deserves a score of") == 1
            assert dim in prompts[k] and all(d not in prompts[k] for d in cfg.dimensions if d != dim)
        assert "deserves a score" not in prompts[0]
        assert all(d in prompts[0] for d in cfg.dimensions)


def test_rubric_uses_the_dataset_range(tok):
    enc, _ = _encoder(tok, format="helpsteer2")
    assert "from 0 to 4" in enc.builder.dimension(0, 3.0) and "2 means" in enc.builder.dimension(0, 3.0)
    enc, cfg = _encoder(tok, format="pairs")
    rec = _records(UF, cfg, 10)[0]
    text = tok.decode(enc.encode(rec).sequences[3])
    assert "from 1 to 10" in text and f"deserves a score of {fmt_score(rec.chosen_scores[0])}." in text
    assert fmt_score(7.5) == "7.5" and fmt_score(4.0) == "4"


def test_template_override_file_and_hash(tok, tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(
        "dimension: 'Target {dimension}={target} on [{score_min},{score_max}].'\n"
        "descriptions:\n  coherence: 'logical flow.'\n"
    )
    enc, cfg = _encoder(tok, templates=str(path), format="helpsteer2")
    default, _ = _encoder(tok, format="helpsteer2")
    assert enc.builder.dimension(0, 3.0) == "Target helpfulness=3 on [0,4]."
    assert enc.builder.templates["descriptions"]["coherence"] == "logical flow."
    assert enc.builder.template_hash("system") != default.builder.template_hash("system")
    bad = tmp_path / "bad.json"
    bad.write_text('{"dimensoin": "x"}')
    with pytest.raises(ValueError, match="may only have the keys"):
        load_templates(str(bad))


def test_user_prefix_placement(tok):
    enc, cfg = _encoder(tok, placement="user_prefix", format="helpsteer2")
    rec = _records(HS2, cfg, 10)[0]
    text = tok.decode(enc.encode(rec).sequences[2])
    prompt = enc.builder.build_pair_prompts(rec.chosen_scores)[1]
    assert f"<|im_start|>user\n{prompt}\n\n{rec.turns[-1]['content']}<|im_end|>" in text
    assert "You are Qwen" in _system(text)  # the template's own default system message
