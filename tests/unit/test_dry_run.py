"""pretrain_amopo.py --dry-run builds every rank's real Megatron-Core shard on the meta
device (fake process group, no GPUs): the shards add up to the Hugging Face model and
their sizes are the planner's.

All ranks are built, one process per layout (re-initialising the fake group per rank
costs ~0.3 s; the import of Megatron-Core dominates)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_amopo.model import memory
from megatron_amopo.model.architectures import arch_from_hf_config, load_hf_config
from megatron_amopo.training import dry_run

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "examples" / "model_configs"
PUBLISHED_TOTAL = {"qwen2.5-32b": 32_763_876_352, "llama3.1-8b": 8_030_261_248}
TRAIN = ["--micro-batch-size", "1", "--global-batch-size", "128", "--train-epochs", "3", "--bf16"]


def _hf_total(config: Path) -> int:
    import transformers

    cfg = transformers.AutoConfig.for_model(**json.loads(config.read_text()))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


LAYOUTS = {"qwen2.5-32b": (32, 8, 4), "llama3.1-8b": (8, 4, 2)}  # world size, TP, PP


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict:
    """Both layouts' `--rank all` reports; the two processes run side by side."""
    tmp = tmp_path_factory.mktemp("dry_run")
    procs = {}
    for model, (world, tp, pp) in LAYOUTS.items():
        cmd = [
            sys.executable,
            str(REPO / "pretrain_amopo.py"),
            "--dry-run",
            "--world-size",
            str(world),
            "--rank",
            "all",
            "--hf-config",
            str(CONFIGS / f"{model}.json"),
            "--tensor-model-parallel-size",
            str(tp),
            "--pipeline-model-parallel-size",
            str(pp),
            "--sequence-parallel",
            "--use-distributed-optimizer",
            "--json",
            str(tmp / f"{model}.json"),
            *TRAIN,
        ]
        procs[model] = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        )
    reports = {}
    for model, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        assert f"rank {LAYOUTS[model][0] - 1:>5}" in out
        reports[model] = json.loads((tmp / f"{model}.json").read_text())
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("model, world, tp, pp", [("qwen2.5-32b", 32, 8, 4), ("llama3.1-8b", 8, 4, 2)])
def test_rank_shards_add_up_to_the_hf_model_and_match_the_planner(dry_runs, model, world, tp, pp):
    report = dry_runs[model]
    arch = arch_from_hf_config(load_hf_config(str(CONFIGS / f"{model}.json")))
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == list(range(world))
    assert {(r["tp_rank"], r["pp_rank"]) for r in ranks} == {(t, p) for t in range(tp) for p in range(pp)}
    total = 0
    for r in ranks:
        numel = {name: int(torch.Size(shape).numel()) for name, shape in r["parameters"].items()}
        assert sum(numel.values()) == r["params"]
        # Norm weights are the only TP-replicated tensors: count them once per TP group.
        replicated = sum(n for name, n in numel.items() if name.endswith("layernorm.weight"))
        total += r["params"] - replicated + (replicated if r["tp_rank"] == 0 else 0)
        # The planner's weight bytes are the dry run's (bf16); the local spec keeps its norms in fp32.
        stage = memory.stage_memory(arch, memory.default_workload(), memory.Layout(**report["layout"]), r["pp_rank"])
        assert stage.weights == r["param_bytes"] == 2 * r["params"]
        assert r["built_bytes"] - r["param_bytes"] == 2 * replicated
        assert r["memory"]["total"] == stage.total
    assert total == _hf_total(CONFIGS / f"{model}.json") == PUBLISHED_TOTAL[model] == report["model_parameters"]
    if model == "qwen2.5-32b":  # the figure measured when the feature was planned
        assert ranks[0]["params"] == 1_072_674_816


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--world-size", "30", "--rank", "0"], "world size 30 is not divisible by TP x PP x CP = 8 x 4 x 1"),
        (["--world-size", "32", "--rank", "32"], "--rank 32 is out of range for --world-size 32"),
        (["--world-size", "32", "--rank", "-1"], "--rank -1 is out of range"),
        (["--world-size", "32", "--rank", "first"], "--rank must be an integer or 'all'"),
    ],
)
def test_bad_layout_or_rank_is_refused_before_building(capsys, extra, message):
    argv = [
        "--dry-run",
        "--hf-config",
        str(CONFIGS / "qwen2.5-32b.json"),
        "--tensor-model-parallel-size",
        "8",
        "--pipeline-model-parallel-size",
        "4",
        *extra,
        *TRAIN,
    ]
    assert dry_run.main(argv) == 2
    assert message in capsys.readouterr().err


def test_model_is_required_and_heads_must_divide(capsys):
    assert dry_run.main(["--dry-run", "--world-size", "8", "--rank", "0", *TRAIN]) == 2
    assert "give --hf-config PATH or --load CKPT" in capsys.readouterr().err
    argv = [
        "--dry-run",
        "--world-size",
        "8",
        "--rank",
        "0",
        "--hf-config",
        str(CONFIGS / "qwen2.5-7b.json"),
        "--tensor-model-parallel-size",
        "8",
        *TRAIN,
    ]
    assert dry_run.main(argv) == 2
    assert "does not divide num_attention_heads = 28" in capsys.readouterr().err


def _script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "pretrain_amopo.py"), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )


def test_dry_run_is_listed_in_help_and_has_its_own():
    main_help = _script("--help")
    assert main_help.returncode == 0 and "dry run (pretrain_amopo.py --dry-run --help)" in main_help.stdout
    assert "--dry-run" in main_help.stdout and "--world-size" in main_help.stdout
    dry_help = _script("--dry-run", "--help")
    assert dry_help.returncode == 0, dry_help.stderr
    assert "--world-size" in dry_help.stdout and "--rank" in dry_help.stdout and "meta device" in dry_help.stdout


def test_dry_run_flags_are_refused_without_dry_run():
    proc = _script("--world-size", "8", "--micro-batch-size", "1", "--train-iters", "1")
    assert proc.returncode == 2 and "--world-size only apply with --dry-run" in proc.stderr


def test_dry_run_asks_only_for_what_it_uses(capsys):
    """No --world-size (default: DP 1), --train-iters, --micro-batch-size or --global-batch-size."""
    argv = [
        "--dry-run",
        "--hf-config",
        str(CONFIGS / "llama3.1-8b.json"),
        "--tensor-model-parallel-size",
        "4",
        "--pipeline-model-parallel-size",
        "2",
        "--bf16",
    ]
    assert dry_run.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "world size 8 = TP4 PP2 DP1 mbs 1" in out and "peak estimate" in out
    ours, cfg = dry_run.parse_args(argv)
    assert cfg.training.global_batch_size == 2  # mbs x DP x PP: the pipeline is full, as in any real run


def _tiny_mistral(tmp_path: Path, window: int) -> tuple[Path, Path]:
    """A tiny Mistral config.json and the same model as a --load root (amopo_model.json only)."""
    from megatron_amopo.checkpoint.store import write_model_metadata
    from megatron_amopo.convert.tiny_hf import tiny_hf_config

    hf = tiny_hf_config("mistral", sliding_window=window)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(hf))
    root = tmp_path / "ckpt"
    write_model_metadata(str(root), arch_from_hf_config(hf), hf, None)
    return config, root


def test_dry_run_goes_through_the_run_set_up_from_hf_config_or_load(capsys, tmp_path):
    """The same shard and estimate from --hf-config and from --load (training.run.setup_model reads it)."""
    config, root = _tiny_mistral(tmp_path, window=256)
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--rank", "all"]
    reports = []
    for source in (["--hf-config", str(config)], ["--load", str(root)]):
        out = tmp_path / f"{source[0][2:]}.json"
        assert dry_run.main(["--dry-run", *source, *layout, "--json", str(out), "--seq-length", "128"]) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[0] == reports[1] and len(reports[0]["ranks"]) == 4


def test_dry_run_refuses_what_the_real_run_set_up_refuses(capsys, tmp_path):
    """A sequence longer than the sliding attention window: the dry run and setup_model give one message."""
    from megatron_amopo.training.run import setup_model

    config, root = _tiny_mistral(tmp_path, window=64)
    message = "--seq-length 128 is longer than this model's sliding attention window (64)"
    for source in (["--hf-config", str(config)], ["--load", str(root)]):
        assert dry_run.main(["--dry-run", *source, "--seq-length", "128"]) == 2
        assert message in capsys.readouterr().err
    _, cfg = dry_run.parse_args(["--load", str(root), "--seq-length", "128"])  # a run's RunConfig
    with pytest.raises(ValueError, match=re.escape(message)):
        setup_model(cfg)  # what pretrain_amopo.py and tools/evaluate.py call first
