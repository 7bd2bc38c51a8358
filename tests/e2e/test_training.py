"""End to end: the real entry point under torchrun on 2 gloo ranks, with a tiny Qwen2
model (real Qwen2 tokenizer, shrunk) converted by the real tool and real HelpSteer2 rows
preprocessed by the real tool.

One set-up for the session (``tiny_run``, tests/conftest.py); each test launches ``pretrain_amopo.py`` (or a tool) in a
subprocess. Layout equality: the same weights and the same global batch give the
same first-step loss at TP2, PP2 and DP2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from megatron_amopo.testing.pipeline import REPO, TINY_SEQ, run_torchrun, torchrun_args

SEQ = TINY_SEQ
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def torchrun(*flags: str, nproc: int = 2, **kw) -> subprocess.CompletedProcess:
    return run_torchrun("pretrain_amopo.py", *flags, nproc=nproc, **kw)


@pytest.fixture(scope="module")
def setup(tiny_run):
    """The session's tiny run (test_console.py and test_errors.py import this fixture too)."""
    return tiny_run


@pytest.fixture(scope="module")
def tp2_run(setup):
    """TP2, 4 steps, checkpoints at steps 2 and 4: the reference the layout, resume and fallback tests
    read (each copies what it changes)."""
    full = setup / "full"
    torchrun(*common(setup, full, "--train-iters", "4", "--tensor-model-parallel-size", "2", "--save-interval", "2"))
    assert os.path.isfile(full / "iter_0000004" / "amopo_complete.json")
    return full


def common(setup, save, *extra: str) -> list[str]:
    """Flags shared by the runs; ``extra`` comes last, so it overrides (argparse keeps the last value)."""
    return [
        "--load",
        str(setup / "init"),
        "--save",
        str(save),
        "--data-path",
        str(setup / "data"),
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "2",
        "--seq-length",
        str(SEQ),
        "--lr",
        "1e-3",
        "--lr-warmup-fraction",
        "0",
        *extra,
    ]


def losses(run_dir) -> dict[int, float]:
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            row = json.loads(line)
            if row["kind"] == "train":
                out[row["iteration"]] = row["loss"]
    return out


def model_tensors(iter_dir) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(os.path.dirname(iter_dir), "model_tensors.pt")
    dcp_to_torch_save(str(iter_dir), out)
    sd = torch.load(out, weights_only=False)
    return {k: v for k, v in sd.items() if torch.is_tensor(v) and not k.startswith("optimizer")}


def test_layouts_train_and_agree(setup, tp2_run):
    first = {"tp2": losses(tp2_run)[1]}  # the first step's loss does not depend on the schedule's length
    for name, flags in (
        ("pp2", ["--pipeline-model-parallel-size", "2"]),
        ("dp2", ["--use-distributed-optimizer"]),
    ):
        save = setup / f"layout_{name}"
        proc = torchrun(*common(setup, save, "--train-iters", "2", *flags))
        assert "iter 2/2" in proc.stdout, proc.stdout[-2000:]
        assert os.path.isfile(save / "iter_0000002" / "amopo_complete.json")
        first[name] = losses(save)[1]
    assert first["pp2"] == pytest.approx(first["tp2"], rel=1e-5)
    assert first["dp2"] == pytest.approx(first["tp2"], rel=1e-5)


def test_exact_resume_and_resume_across_layouts(setup, tp2_run):
    full, half = tp2_run, setup / "half"
    proc = torchrun(
        *common(setup, half, "--train-iters", "4", "--exit-interval", "2", "--tensor-model-parallel-size", "2")
    )
    assert "--exit-interval 2: saving at iteration 2" in proc.stdout
    proc = torchrun(
        *common(setup, half, "--train-iters", "4", "--tensor-model-parallel-size", "2", "--load", str(half))
    )
    assert "starting at step 2" in proc.stdout
    a, b = losses(full), losses(half)
    assert [a[i] for i in (1, 2, 3, 4)] == [b[i] for i in (1, 2, 3, 4)]  # bit-identical
    wa, wb = model_tensors(full / "iter_0000004"), model_tensors(half / "iter_0000004")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    # The TP2 checkpoint at step 2, resumed at PP2: the same step-3 loss to fp32 tolerance.
    other = setup / "other_layout"
    proc = torchrun(
        *common(
            setup, other, "--train-iters", "3", "--pipeline-model-parallel-size", "2", "--load", half_copy(full, other)
        )
    )
    assert "starting at step 2" in proc.stdout
    assert losses(other)[3] == pytest.approx(a[3], rel=1e-5)


def half_copy(full, other) -> str:
    """A copy of ``full`` truncated to its step-2 checkpoint (so resuming starts there)."""
    import shutil

    dst = str(other) + "_src"
    shutil.copytree(full, dst, ignore=shutil.ignore_patterns("iter_0000004", "metrics.jsonl", "tensorboard"))
    with open(os.path.join(dst, "latest_checkpointed_iteration.txt"), "w") as fh:
        fh.write("2")
    return dst


def test_corrupt_newest_checkpoint_falls_back(setup, tp2_run):
    import shutil

    src = setup / "corrupt"
    shutil.copytree(tp2_run, src)
    victim = sorted(p for p in (src / "iter_0000004").iterdir() if p.suffix == ".distcp")[0]
    victim.write_bytes(victim.read_bytes()[:-10])  # truncated file: a partial write
    proc = torchrun(
        *common(
            setup,
            src,
            "--train-iters",
            "5",
            "--tensor-model-parallel-size",
            "2",
            "--load",
            str(src),
            "--save-interval",
            "1",
            "--keep-last",
            "2",
        )
    )
    assert "skipping checkpoint" in proc.stderr + proc.stdout and "iter_0000004" in proc.stderr + proc.stdout
    assert "starting at step 2" in proc.stdout
    kept = sorted(p.name for p in src.iterdir() if p.name.startswith("iter_"))
    assert kept == ["iter_0000004", "iter_0000005"]  # --keep-last 2 pruned steps 2 and 3


def test_preemption_signal_saves_and_exits_cleanly(setup):
    """The signal arrives during the evaluation after step 1: the run saves step 1 and exits then,
    without running step 2 first."""
    save = setup / "preempt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    flags = common(setup, save, "--train-iters", "200", "--tensor-model-parallel-size", "2")
    flags += ["--eval-interval", "1", "--valid-data-path", str(setup / "data")]
    args = torchrun_args("pretrain_amopo.py", *flags)
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 300
    for line in proc.stdout:
        lines.append(line)
        if (line.startswith("evaluating ") and line.endswith(" at iter 1\n")) or time.time() > deadline:
            break
    # SLURM's --signal=USR1@T reaches the training processes; signal the workers
    # themselves (torchrun, signalled, would exit non-zero by design).
    import psutil

    procs = [
        c for c in psutil.Process(proc.pid).children(recursive=True) if "pretrain_amopo.py" in " ".join(c.cmdline())
    ]
    ranks = [c for c in procs if c.ppid() == proc.pid]  # torchrun's children; their DataLoader workers are theirs
    assert len(ranks) == 2 and len(procs) > 2  # --num-workers 1
    for w in procs:  # as SLURM does: every process of the step, data workers included
        w.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    text = "".join(lines) + out
    assert proc.returncode == 0, text[-3000:]
    assert "stop signal received" in text
    with open(save / "latest_checkpointed_iteration.txt") as fh:
        it = int(fh.read())
    assert it == 1 and os.path.isfile(save / f"iter_{it:07d}" / "amopo_complete.json")
    assert "iter 2/200" not in text and "stop signal received: saving at iteration 1" in text


def test_bad_inputs_fail_early(setup):
    proc = torchrun(*common(setup, setup / "bad1", "--train-iters", "2", "--global-batch-size", "3"), check=False)
    assert proc.returncode != 0 and "--global-batch-size 3 is not divisible by --micro-batch-size x DP" in proc.stderr
    proc = torchrun(*common(setup, setup / "bad2", "--train-iters", "2", "--load", str(setup / "nothing")), check=False)
    assert proc.returncode != 0 and "no checkpoint at" in proc.stderr
    proc = torchrun(*common(setup, setup / "bad3", "--train-iters", "2", "--dimensions", "helpfulness"), check=False)
    assert proc.returncode != 0 and "built for dimensions" in proc.stderr
    # NaN: a huge learning rate blows the weights up after the first step.
    save = setup / "nan"
    proc = torchrun(
        *common(
            setup, save, "--train-iters", "4", "--tensor-model-parallel-size", "2", "--lr", "1e30", "--clip-grad", "0"
        ),
        check=False,
    )
    assert proc.returncode != 0 and "loss is nan at iteration" in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert "sample ids of the batch" in proc.stderr + proc.stdout
    assert not os.path.exists(save / "latest_checkpointed_iteration.txt")


def test_evaluate_tool(setup):
    runs = {}
    for output_layer in ("logits", "fused"):  # the fused output layer evaluates the same (tied embedding, TP2)
        out = setup / f"eval_{output_layer}.json"
        run_torchrun(
            "tools/evaluate.py",
            "--load",
            str(setup / "init"),
            "--data-path",
            str(setup / "data"),
            "--tensor-model-parallel-size",
            "2",
            "--micro-batch-size",
            "1",
            "--seq-length",
            str(SEQ),
            "--amopo-output-layer",
            output_layer,
            "--output",
            str(out),
        )
        runs[output_layer] = json.loads(out.read_text())
    values = runs["logits"]
    assert values["samples"] >= 4
    for name in ("general", "helpfulness", "correctness", "coherence"):
        assert 0.0 <= values[f"accuracy/{name}"] <= 1.0
    assert runs["fused"].keys() == values.keys()
    for key, value in values.items():
        assert runs["fused"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
