"""Measure how a requested per-dimension score steers generation (e.g. verbosity -> reply length).

    amopo-evaluate-control --model HF_DIR --input heldout_rows.jsonl --dimension verbosity \\
        [--scores 0 2 4] [--num-prompts 24] [--max-new-tokens 128] [--output control.json]

Greedy replies to the first ``--num-prompts`` distinct prompts of ``--input`` (HelpSteer2 rows:
a ``prompt`` field, multi-turn prompts in HelpSteer2's form) at each requested score, with the
dimension prompt the training data used (same templates and placement as amopo-preprocess).
Prints the mean reply length (tokens) per requested score and Spearman's rank correlation between
requested score and length with a 95% bootstrap interval over prompts; ``--output`` also keeps every reply.
"""

from __future__ import annotations

import json
import os
import sys

from megatron_amopo.data.config import DEFAULT_SCORE_RANGE, PLACEMENTS
from megatron_amopo.runtime.errors import ArgumentParser, InputError, UsageError, entry_point


def read_prompts(path: str, limit: int) -> list[list[dict]]:
    """Chat turns of the first ``limit`` distinct prompts of a HelpSteer2-style JSONL file."""
    from megatron_amopo.data.records import BadRow, parse_turns

    seen, prompts = set(), []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                prompt = json.loads(line)["prompt"]
                turns = parse_turns(prompt)
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise SystemExit(f"{path} line {n}: not a row with a 'prompt' string ({err!r})") from None
            except BadRow as bad:
                raise SystemExit(f"{path} line {n}: {bad.reason}: {bad.detail}") from None
            if prompt in seen:
                continue
            seen.add(prompt)
            prompts.append(turns)
            if len(prompts) == limit:
                break
    return prompts


def parse_args(argv):
    lo, hi = DEFAULT_SCORE_RANGE["helpsteer2"]
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory (e.g. amopo-export-hf)")
    p.add_argument("--input", required=True, help="JSONL rows with a 'prompt' field (e.g. the held-out split)")
    p.add_argument("--dimension", required=True, help="dimension whose score is requested, e.g. verbosity")
    p.add_argument("--scores", type=float, nargs="+", default=[0.0, 2.0, 4.0], help="requested scores")
    p.add_argument("--num-prompts", type=int, default=24, help="distinct prompts taken from the start of --input")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (left-padded)")
    p.add_argument("--score-min", type=float, default=lo, help="lowest score of the scale the model was trained on")
    p.add_argument("--score-max", type=float, default=hi, help="highest score of that scale")
    p.add_argument("--prompt-placement", choices=PLACEMENTS, default="system", help="as in preprocessing")
    p.add_argument("--prompt-templates", default=None, help="template file used in preprocessing, if any")
    p.add_argument("--output", default=None, help="write the summary and every reply as JSON here")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"--model {args.model} has no config.json: give a Hugging Face model directory")
    if not os.path.isfile(args.input):
        p.error(f"--input {args.input} does not exist")
    if len(set(args.scores)) < 2:
        p.error(f"--scores needs at least two different scores, got {args.scores}")
    bad = [s for s in args.scores if not args.score_min <= s <= args.score_max]
    if bad:
        p.error(f"--scores {bad} lie outside the scale [{args.score_min}, {args.score_max}]")
    for name in ("num_prompts", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        p.error(f"the directory of --output {args.output} does not exist")
    return args


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_amopo.data.prompts import PromptBuilder, load_templates

    try:
        builder = PromptBuilder(load_templates(args.prompt_templates), [args.dimension], args.score_min, args.score_max)
    except ValueError as err:
        raise UsageError(f"--dimension {args.dimension}: {err}", "see --prompt-templates and --dimension") from err
    prompts = read_prompts(args.input, args.num_prompts)
    if len(prompts) < 2:
        raise InputError(f"--input {args.input} has {len(prompts)} distinct prompts", "give at least 2")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_amopo.evaluation.control import generate_at_scores, summarize_control

    torch.manual_seed(0)
    from megatron_amopo.convert.hf_io import HFWeights

    HFWeights(args.model)  # a missing, truncated or corrupt weight file is named before transformers loads it
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    print(
        f"{args.model}: {len(prompts)} prompts x scores {args.scores} of {args.dimension}, greedy, "
        f"<= {args.max_new_tokens} new tokens",
        flush=True,
    )
    replies = generate_at_scores(
        model,
        tok,
        prompts,
        builder,
        args.dimension,
        args.scores,
        placement=args.prompt_placement,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=lambda m: print(m, flush=True),
    )
    summary = summarize_control(replies, args.scores)
    for s, v in summary["per_score"].items():
        print(
            f"{args.dimension} {s}: mean length {v['mean_length']:.1f} tokens over {v['replies']} replies "
            f"({v['at_max_new_tokens']} hit --max-new-tokens)"
        )
    lo, hi = summary["spearman_ci95"]
    print(
        f"Spearman(requested {args.dimension}, length) = {summary['spearman_score_length']:.3f} "
        f"[{lo:.3f}, {hi:.3f}] (95% bootstrap over prompts) over {summary['num_replies']} replies; "
        f"{summary['prompts_same_reply_at_every_score']} of "
        f"{summary['prompts']} prompts got the same reply at every requested score"
    )
    if args.output:
        result = {
            "model": args.model,
            "input": args.input,
            "dimension": args.dimension,
            "scores": args.scores,
            "num_prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            **summary,
            "replies": replies,
        }
        tmp = args.output + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(tmp, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
