"""Generate a reply from a Hugging Face model directory with a dimension-aware AMoPO prompt.

    python tools/generate.py --model DIR --prompt "How do I boil an egg?" --dimension helpfulness --score 4

The system message is the same dimension prompt the training data used (the
prompt templates of megatron_amopo/data/prompts.py), so the aligned model can be
steered per dimension.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_amopo.runtime import quiet  # noqa: E402
from megatron_amopo.runtime.errors import ArgumentParser, entry_point  # noqa: E402

quiet.install()  # before anything imports Megatron-Core


@entry_point
def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory (e.g. an exported checkpoint)")
    parser.add_argument("--prompt", required=True, help="the user message")
    parser.add_argument("--dimension", default=None, help="dimension to steer (default: the general prompt)")
    parser.add_argument("--score", type=float, default=None, help="target score for --dimension")
    parser.add_argument("--dimensions", nargs="+", default=["helpfulness", "correctness", "coherence"])
    parser.add_argument("--score-min", type=float, default=0.0)
    parser.add_argument("--score-max", type=float, default=4.0)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    if args.dimension is not None and args.dimension not in args.dimensions:
        parser.error(f"--dimension {args.dimension!r} is not one of --dimensions {args.dimensions}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList

    from megatron_amopo.data.prompts import PromptBuilder, load_templates
    from megatron_amopo.runtime.progress import progress

    builder = PromptBuilder(load_templates(None), args.dimensions, args.score_min, args.score_max)
    if args.dimension is None:
        system = builder.general()
    else:
        score = args.score if args.score is not None else args.score_max
        system = builder.dimension(args.dimensions.index(args.dimension), score)
    from megatron_amopo.convert.hf_io import HFWeights

    HFWeights(args.model)  # a missing, truncated or corrupt weight file is named before transformers loads it
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": args.prompt}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    torch.manual_seed(0)
    with progress(total=args.max_new_tokens, desc="generate", unit=" tokens") as bar:
        out = model.generate(
            **ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([_tick(bar)]),
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
