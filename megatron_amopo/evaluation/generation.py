"""Batched answers to benchmark questions with vLLM (when installed and a GPU is present) or
Hugging Face ``generate``, both fed the same chat messages (``conversation``)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional, Protocol

from megatron_amopo.evaluation.benchmarks import AnswerStore, Question, make_answer

BACKENDS = ("auto", "hf", "vllm")


@dataclass
class Sampling:
    """Decoding settings shared by both backends; temperature 0 is greedy."""

    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


class Generator(Protocol):
    def generate(self, conversations: list[list[dict]], sampling: Sampling) -> list[str]: ...

    def count_tokens(self, text: str) -> int: ...


def choose_backend(name: str) -> str:
    """``auto`` -> vllm when it is importable and a GPU is present, else hf; an unusable choice is refused."""
    if name not in BACKENDS:
        raise ValueError(f"--backend must be one of {BACKENDS}, got {name!r}")
    has_vllm = importlib.util.find_spec("vllm") is not None
    if name == "vllm" and not has_vllm:
        raise ValueError("--backend vllm needs the vllm package: pip install -e '.[vllm]' (or use --backend hf)")
    if name != "auto":
        return name
    import torch

    return "vllm" if has_vllm and torch.cuda.is_available() else "hf"


class HFGenerator:
    """Hugging Face ``generate`` on left-padded batches (CPU or one GPU)."""

    def __init__(self, model_dir: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        # transformers 5 types PreTrainedModel.to through a wrapper that drops the bound self
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]

    def generate(self, conversations: list[list[dict]], sampling: Sampling) -> list[str]:
        import torch

        texts = [self.tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        batch = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sample = sampling.temperature > 0
        extra = dict(temperature=sampling.temperature, top_p=sampling.top_p) if sample else {}
        with torch.no_grad():
            out = self.model.generate(
                **batch,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=sample,
                pad_token_id=self.tok.pad_token_id,
                **extra,
            )
        new = out[:, batch["input_ids"].shape[1] :]
        # decode of one row gives a str; transformers 5 declares str | list[str] for every input
        return [self.tok.decode(row, skip_special_tokens=True) for row in new]  # type: ignore[misc]

    def count_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])


class VLLMGenerator:
    """vLLM's offline ``LLM.chat`` on one GPU: it batches and schedules the requests itself."""

    def __init__(self, model_dir: str, seed: int) -> None:
        from vllm import LLM

        self.llm = LLM(model=model_dir, seed=seed)
        self.tok = self.llm.get_tokenizer()

    def generate(self, conversations: list[list[dict]], sampling: Sampling) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
            max_tokens=sampling.max_new_tokens,
            seed=sampling.seed,
        )
        outs = self.llm.chat(conversations, params, use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    def count_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])


def load_generator(backend: str, model_dir: str, seed: int) -> Generator:
    return VLLMGenerator(model_dir, seed) if backend == "vllm" else HFGenerator(model_dir)


def conversation(system: Optional[str], history: list[tuple[str, str]], user: str, placement: str) -> list[dict]:
    """Chat messages: earlier (question, answer) turns, then ``user``, with the AMoPO prompt ``system``
    placed as preprocessing places it (``data.tokenization.pair_messages``)."""
    from megatron_amopo.data.tokenization import pair_messages

    turns: list[dict] = []
    for q, a in history:
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    turns.append({"role": "user", "content": user})
    return pair_messages(system, turns, placement) if system else turns


def answer_all(
    store: AnswerStore,
    gen: Generator,
    sampling: Sampling,
    system: Optional[str],
    placement: str,
    model_id: str,
    batch_size: int,
) -> int:
    """Answer the questions ``store`` does not have yet, ``batch_size`` at a time, turn by turn (a
    later turn sees the model's own earlier answers); returns how many were answered."""
    import torch

    from megatron_amopo.runtime.progress import progress

    pending = store.pending()
    torch.manual_seed(sampling.seed)
    with progress(total=len(pending), desc="generate", unit=" questions") as bar:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            replies = _answer_turns(chunk, gen, sampling, system, placement)
            store.add(
                [
                    (q, make_answer(store.fmt, q, r, [gen.count_tokens(x) for x in r], model_id))
                    for q, r in zip(chunk, replies)
                ]
            )
            bar.update(len(chunk))
    store.finish()
    return len(pending)


def _answer_turns(
    chunk: list[Question], gen: Generator, sampling: Sampling, system: Optional[str], placement: str
) -> list[list[str]]:
    replies: list[list[str]] = [[] for _ in chunk]
    for t in range(max(len(q.turns) for q in chunk)):
        active = [i for i, q in enumerate(chunk) if len(q.turns) > t]
        convs = [
            conversation(system, list(zip(chunk[i].turns[:t], replies[i])), chunk[i].turns[t], placement)
            for i in active
        ]
        for i, text in zip(active, gen.generate(convs, sampling)):
            replies[i].append(text)
    return replies
