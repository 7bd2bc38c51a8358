"""Generate replies from a Hugging Face model directory with a dimension-aware AMoPO prompt:
one reply to --prompt, or the answer file of a benchmark's question file.

    amopo-generate --model DIR --prompt "How do I boil an egg?" --dimension helpfulness --score 4
    amopo-generate --model DIR --input question.jsonl --output answers/my-model.jsonl \\
        --format mt_bench --batch-size 16 --max-new-tokens 1024

The system message is the same dimension prompt the training data used (the prompt
templates of megatron_amopo/data/prompts.py), so the aligned model can be steered per
dimension; with --input every question gets it. Formats and resuming: docs/EVALUATION.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any

from megatron_amopo.data.config import PLACEMENTS
from megatron_amopo.evaluation.benchmarks import FORMATS
from megatron_amopo.evaluation.generation import BACKENDS
from megatron_amopo.runtime.errors import ArgumentParser, UsageError, entry_point


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--model", required=True, help="Hugging Face model directory (e.g. an exported checkpoint)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one user message; the reply is printed")
    what.add_argument("--input", help="a benchmark's question file (see --format)")
    p.add_argument("--output", help="answer file to write (with --input); an existing one is resumed")
    p.add_argument("--format", choices=FORMATS, help="question/answer format of --input/--output")
    p.add_argument("--model-id", default=None, help="generator / model_id in the answers (default: --model's name)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="auto: vllm if installed and a GPU, else hf")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call (hf backend)")
    p.add_argument("--dimension", default=None, help="dimension to steer (default: the general prompt)")
    p.add_argument("--score", type=float, default=None, help="target score for --dimension (default: --score-max)")
    p.add_argument("--dimensions", nargs="+", default=["helpfulness", "correctness", "coherence"])
    p.add_argument("--score-min", type=float, default=0.0)
    p.add_argument("--score-max", type=float, default=4.0)
    p.add_argument("--prompt-placement", choices=PLACEMENTS, default="system", help="as in preprocessing")
    p.add_argument("--prompt-templates", default=None, help="template file, as given to preprocessing")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 32 with --prompt, 1024 with --input")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampled")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.dimension is not None and args.dimension not in args.dimensions:
        p.error(f"--dimension {args.dimension!r} is not one of --dimensions {args.dimensions}")
    if args.input is not None and (args.output is None or args.format is None):
        p.error("--input needs --output and --format")
    if args.input is None and (args.output is not None or args.format is not None):
        p.error("--output and --format apply with --input, not --prompt")
    if args.batch_size < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error("need --batch-size >= 1, --temperature >= 0 and 0 < --top-p <= 1")
    if args.max_new_tokens is None:
        args.max_new_tokens = 32 if args.input is None else 1024
    return args


def system_prompt(args) -> str:
    """The AMoPO prompt, built by the same PromptBuilder as preprocessing."""
    from megatron_amopo.data.prompts import PromptBuilder, load_templates

    builder = PromptBuilder(load_templates(args.prompt_templates), args.dimensions, args.score_min, args.score_max)
    if args.dimension is None:
        return builder.general()
    score = args.score if args.score is not None else args.score_max
    return builder.dimension(args.dimensions.index(args.dimension), score)


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_amopo.convert.hf_io import HFWeights
    from megatron_amopo.evaluation.generation import Sampling, choose_backend

    system = system_prompt(args)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    if args.prompt is not None:
        HFWeights(args.model)  # a missing, truncated or corrupt weight file is named before transformers loads it
        return single(args, system, sampling)
    from megatron_amopo.evaluation.benchmarks import AnswerStore, read_questions
    from megatron_amopo.evaluation.generation import answer_all, load_generator

    model_id = args.model_id or os.path.basename(os.path.normpath(args.model))
    try:  # every check before the model loads: the question file's format, existing answers, the backend
        questions = read_questions(args.input, args.format)
        store = AnswerStore(args.output, args.format, questions, model_id)
        backend = choose_backend(args.backend)
    except (ValueError, OSError) as err:
        raise UsageError(str(err), "give --format the question file's format and an --output of this model") from err
    todo = len(store.pending())
    print(f"{len(questions)} questions, {len(questions) - todo} already answered in {args.output}; backend {backend}")
    if todo:
        HFWeights(args.model)
        gen = load_generator(backend, args.model, args.seed)
        answer_all(store, gen, sampling, system, args.prompt_placement, model_id, args.batch_size)
    else:
        store.finish()
    print(f"wrote {args.output}")
    return 0


def single(args, system: str, sampling) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList

    from megatron_amopo.evaluation.generation import conversation
    from megatron_amopo.runtime.progress import progress

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    messages = conversation(system, [], args.prompt, args.prompt_placement)
    encoded = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    # return_dict=True gives a BatchEncoding; transformers types the result as every form it can take
    assert isinstance(encoded, Mapping), type(encoded)
    ids: Mapping[str, Any] = encoded
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    with progress(total=args.max_new_tokens, desc="generate", unit=" tokens") as bar:
        out = model.generate(
            **ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=sample,
            stopping_criteria=StoppingCriteriaList([_tick(bar)]),
            **(dict(temperature=args.temperature, top_p=args.top_p) if sample else {}),
        )
    reply = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"system: {system}\nuser: {args.prompt}\nassistant: {reply}")
    return 0


def _tick(bar):
    """A stopping criterion that never stops: it advances ``bar`` once per generated token."""
    import torch
    from transformers import StoppingCriteria

    class Tick(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
            bar.update()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return Tick()


if __name__ == "__main__":
    sys.exit(main())
