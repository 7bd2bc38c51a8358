"""The real tools as end-to-end tests run them: one subprocess runner, and the tiny Qwen2 set-up and
HelpSteer2 rows they share."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from megatron_amopo.data.config import DEFAULT_DIMENSIONS

REPO = str(Path(__file__).resolve().parents[2])
PY = sys.executable
HELPSTEER2_ROWS = "data/helpsteer2/train_rows.jsonl"
# The tiny training run most end-to-end tests share (``tiny_training_root``): sequences of TINY_SEQ
# tokens, the real Qwen2 BPE tokenizer shrunk to TINY_VOCAB tokens (the 151,680-row output layer
# would cost a 32-wide model over 30 times its own compute), the TINY_PROMPTS shortest prompts.
TINY_SEQ, TINY_VOCAB, TINY_PROMPTS = 256, 1024, 14


def run_tool(args: list[str], timeout: int = 400, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run ``args`` from the repository root with one thread per process; on failure, show the output's tail."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def torchrun_args(script: str, *flags: str, nproc: int = 2) -> list[str]:
    """The command line of ``script`` (an entry point or a tool) under torchrun with ``nproc`` local ranks."""
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script, *flags]


def run_torchrun(script: str, *flags: str, nproc: int = 2, **kw) -> subprocess.CompletedProcess:
    return run_tool(torchrun_args(script, *flags, nproc=nproc), **kw)


def tiny_qwen2_setup(
    root: Path, rows: Path, seq_length: int, dimensions: Optional[list[str]] = None, vocab: Optional[int] = None
) -> None:
    """A 2-layer Qwen2 with the real Qwen2 tokenizer -> ``root/hf`` -> ``root/init`` (Megatron), and ``rows``
    preprocessed into ``root/data`` with that tokenizer. ``vocab``: shrink the tokenizer (and the model's
    vocabulary) to that many tokens (``make_tiny_model.py --tokenizer-size``)."""
    size = ["--tokenizer-size", str(vocab), "--vocab-size", str(vocab)] if vocab else ["--vocab-size", "151680"]
    run_tool(
        [PY, "tools/make_tiny_model.py", "--arch", "qwen2", "--tied", "--tokenizer", "data/tokenizer-qwen2", *size]
        + ["--hidden-size", "32", "--ffn-hidden-size", "64", "--num-layers", "2"]
        + ["--out", str(root / "hf")]
    )
    run_tool([PY, "tools/convert_hf_to_megatron.py", "--hf-path", str(root / "hf"), "--save", str(root / "init")])
    dims = ["--dimensions", *dimensions] if dimensions else []
    run_tool(
        [PY, "tools/preprocess_data.py", "--input", str(rows), "--output", str(root / "data")]
        + ["--tokenizer", str(root / "init" / "tokenizer"), "--format", "helpsteer2", *dims]
        + ["--seq-length", str(seq_length), "--no-progress"]
    )


def tiny_training_root(root: Path) -> Path:
    """``root`` with ``hf``, ``init`` and ``data``: ``tiny_qwen2_setup`` at TINY_SEQ / TINY_VOCAB on the
    TINY_PROMPTS shortest HelpSteer2 prompts (the session fixture ``tiny_run`` of tests/conftest.py)."""
    write_shortest_rows(root / "rows.jsonl", TINY_PROMPTS)
    tiny_qwen2_setup(root, root / "rows.jsonl", TINY_SEQ, vocab=TINY_VOCAB)
    return root


def write_shortest_rows(path: Path, count: int, dimensions: Optional[list[str]] = None) -> None:
    """The ``count`` shortest bundled HelpSteer2 prompts, both rows of each, into ``path``: picked by
    examples/lib/select_helpsteer2.py, so only prompts that preprocessing with ``dimensions`` (default:
    the helpsteer2 format's) turns into a group, i.e. two different responses whose mean score differs."""
    dims = dimensions or DEFAULT_DIMENSIONS["helpsteer2"]
    run_tool(
        [PY, "examples/lib/select_helpsteer2.py", "--input", HELPSTEER2_ROWS, "--output", str(path)]
        + ["--take", str(count), "--dimensions", *dims]
    )
