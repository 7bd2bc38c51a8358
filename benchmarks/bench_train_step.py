"""One AMoPO training step (forward + backward + optimizer) against a Hugging Face baseline.

Both sides train the same synthetic AMoPO samples (2(D+1) sequences each: a shared prompt,
chosen and rejected responses for the general pair and D dimension pairs) on a model of
the given shape with random weights:

  ours      megatron_amopo: the run set-up's TransformerConfig (``training.run.setup_model``),
            ``build_model`` (Megatron GPTModel + DDP; TE spec with TE, else
            the local spec with SDPA attention), ``build_optimizer`` (Megatron mixed
            precision: bf16 weights, fp32 main weights and Adam state), ``step.forward_step``
            / ``loss_func`` through ``training.engine.Engine`` (the trainer's step); packed rows.
  baseline  transformers ``AutoModelForCausalLM`` (SDPA attention, fp32 weights, bf16
            autocast on GPU: HF Trainer's bf16 mode), the 2(D+1) sequences of each sample
            padded to the longest of the micro-batch, the published loss math (full-vocabulary
            ``log_softmax`` and ``softmax``, a Python loop over sequences:
            ``bench_loss_path.baseline_stats``) into the same ``amopo_loss``, torch AdamW
            with gradient clipping at 1.0 (HF Trainer's default, ours clips at 1.0 too).

Each side runs in its own subprocess (clean memory statistics). Reported per side: step
time, samples/s, tokens/s (real tokens: no padding), peak memory (GPU: max allocated; CPU:
peak RSS) and MFU = model FLOPs / step time / peak, with the FLOPs model, peak table and
memory reading of ``megatron_amopo.training.throughput`` (the trainer logs the same). Peak:
989 TFLOP/s dense bf16 for H100/H200 SXM, or ``--peak-tflops``.

    python benchmarks/bench_train_step.py --model tiny --steps 2            # CPU, seconds
    python benchmarks/bench_train_step.py --model qwen2.5-1.5b --seq-length 1024 \\
        --micro-batch 2 --num-microbatches 2                                 # GPU
    python benchmarks/bench_train_step.py --model HF_DIR --data-path DATA --sides ours ...
                                    # a model directory's shape, the first samples of a preprocessed dataset
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from megatron_amopo.data.batch import Group
from megatron_amopo.training.throughput import device_peak_tflops, mfu, peak_memory_bytes

# Shapes from the published config.json of Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-1.5B (HF Hub).
_QWEN25 = dict(
    model_type="qwen2",
    architectures=["Qwen2ForCausalLM"],
    hidden_act="silu",
    vocab_size=151936,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    torch_dtype="bfloat16",
)
MODELS = {
    "qwen2.5-0.5b": dict(
        _QWEN25,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
    ),
    "qwen2.5-1.5b": dict(
        _QWEN25,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=131072,
    ),
}


def hf_config(name: str) -> dict:
    """A shape of ``MODELS``, ``tiny``, or the config.json of a Hugging Face model directory."""
    if name == "tiny":
        from megatron_amopo.convert.tiny_hf import tiny_hf_config

        return tiny_hf_config("qwen2", max_position_embeddings=4096)
    if name not in MODELS:
        from megatron_amopo.model.architectures import load_hf_config

        return load_hf_config(name)
    return dict(MODELS[name])


def dataset_groups(path: str, num_samples: int) -> list[Group]:
    """The first ``num_samples`` groups of a dataset written by tools/preprocess_data.py."""
    from megatron_amopo.data.reader import PreferenceGroupDataset

    ds = PreferenceGroupDataset(path)
    if len(ds) < num_samples:
        raise SystemExit(f"--data-path {path} has {len(ds)} groups; the step needs {num_samples}")
    return [ds[g] for g in range(num_samples)]


def make_groups(num_samples: int, dims: int, seq_length: int, vocab: int, seed: int) -> list[Group]:
    """Synthetic samples: prompt of 10-40 % of S, each response up to the rest (<= S positions)."""
    gen = torch.Generator().manual_seed(seed)
    S, groups = seq_length, []
    for g in range(num_samples):
        p = int(torch.randint(S // 10, 2 * S // 5, (1,), generator=gen))
        prompt = torch.randint(0, vocab, (p,), generator=gen)
        seqs, starts = [], []
        for _ in range(2 * (dims + 1)):
            r = int(torch.randint(max(S // 10, 2), S + 1 - p + 1, (1,), generator=gen))
            seqs.append(torch.cat([prompt, torch.randint(0, vocab, (r,), generator=gen)]))
            starts.append(p)
        groups.append(
            Group(
                tokens=seqs,
                response_start=torch.tensor(starts),
                group_id=g,
                row_id=g,
                chosen_scores=torch.rand(dims, generator=gen) * 5,
                rejected_scores=torch.rand(dims, generator=gen) * 5,
            )
        )
    return groups


def model_flops(cfg: dict, lengths: list[int]) -> float:
    """Training FLOPs of the sequences with these position counts (``throughput.training_flops``)."""
    from megatron_amopo.model.architectures import arch_from_hf_config
    from megatron_amopo.training.throughput import training_flops

    return training_flops(arch_from_hf_config(cfg), lengths)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(step, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    losses, times = [], []
    for i in range(warmup + steps):
        _sync()
        t0 = time.perf_counter()
        losses.append(step())
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return losses, times


# --------------------------------------------------------------------------- ours
def run_ours(args, cfg: dict, chunks: list[list[Group]]) -> dict:
    from megatron_amopo.config import (
        AmopoConfig,
        CheckpointConfig,
        OptimizerConfig,
        ParallelConfig,
        RunConfig,
        TrainDataConfig,
        TrainingConfig,
    )
    from megatron_amopo.data.batch import build_micro_batch
    from megatron_amopo.model.architectures import arch_from_hf_config
    from megatron_amopo.model.build import build_model
    from megatron_amopo.model.provider import transformer_engine_available
    from megatron_amopo.runtime.comm import free_port
    from megatron_amopo.runtime.distributed import DistEnv, initialize_distributed, set_seed
    from megatron_amopo.training.engine import Engine
    from megatron_amopo.training.optimizer import build_optimizer
    from megatron_amopo.training.run import setup_model
    from megatron_amopo.training.step import bind_forward_step

    cuda = torch.cuda.is_available()
    run_cfg = RunConfig(
        parallel=ParallelConfig(),
        training=TrainingConfig(
            micro_batch_size=args.micro_batch, train_iters=1, bf16=cuda, seq_length=args.seq_length
        ),
        optimizer=OptimizerConfig(lr=args.lr, lr_warmup_fraction=0.0),
        checkpoint=CheckpointConfig(),
        data=TrainDataConfig(),
        amopo=AmopoConfig(output_layer=args.output_layer),
    )
    initialize_distributed(run_cfg.parallel, DistEnv(0, 1, 0, "127.0.0.1", free_port()))
    set_seed(args.seed)
    disabled = set(filter(None, args.disable.split(",")))
    overrides = {"bias_activation_fusion": False} if "swiglu-fusion" in disabled else {}
    # The trainer's model: the run set-up's TransformerConfig (training.run.setup_model), Megatron DDP.
    model_setup = setup_model(run_cfg, arch=arch_from_hf_config(cfg), **overrides)
    model = build_model(model_setup.arch, model_setup.config)
    if args.weights:
        _load_hf_weights(model[0], args.weights)
    optimizer = build_optimizer(model, run_cfg.optimizer, run_cfg.training)
    if "fused-adam" in disabled:  # diagnostic: torch's default multi-tensor AdamW, as megatron-core builds it
        for group in optimizer.optimizer.param_groups:
            group["fused"], group["foreach"] = False, None
    step_fn = bind_forward_step(run_cfg.amopo, chunk_tokens=args.chunk_tokens)
    engine = Engine(model, step_fn, optimizer)  # the trainer's step: the same engine, no scheduler
    if args.layout.startswith("packed"):
        thd = {"packed-thd": True, "packed-mask": False}.get(args.layout, model_setup.thd)
        batches = [build_micro_batch(c, "packed", seq_length=args.seq_length, thd=thd) for c in chunks]
    else:
        batches = [build_micro_batch(c, "padded") for c in chunks]
        if args.layout == "padded-causal":  # right-padded rows: plain causal attention is exact for real tokens
            batches = [dataclasses.replace(b, attention_mask=None) for b in batches]

    def step() -> float:
        reports = engine.forward_backward(batches)
        engine.step(increment=0)
        return float(sum(r.loss_sum for r in reports) / sum(r.count for r in reports))

    losses, times = _timed(step, args.steps, args.warmup)
    if args.profile:
        _profile(step)
    attention, layout = "te" if transformer_engine_available() else "sdpa", args.layout
    if layout == "packed":  # what the training step's default chose
        layout = "packed-thd" if model_setup.thd else "packed-mask"
    return dict(
        losses=losses,
        times=times,
        rows=sum(b.tokens.shape[0] for b in batches),
        attention=f"{attention}/{layout}"
        + "".join(f"/no-{d}" for d in sorted(disabled))
        + ("/fused-output-layer" if args.output_layer == "fused" else ""),
    )


def _profile(step) -> None:
    """One more step under torch.profiler; the ops that took the most device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        step()
        _sync()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60), flush=True)


@torch.no_grad()
def _load_hf_weights(model, path: str) -> None:
    from megatron_amopo.convert.hf_to_megatron import fill_model, plan_import
    from megatron_amopo.model.sharding import unwrap

    fill_model(unwrap(model), plan_import(path))


# ----------------------------------------------------------------------- baseline
def run_baseline(args, cfg: dict, chunks: list[list[Group]]) -> dict:
    from bench_loss_path import baseline_stats  # a sibling: benchmarks/ is sys.path[0] when this runs as a script
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_amopo.config import AmopoConfig
    from megatron_amopo.data.batch import MicroBatch, build_micro_batch
    from megatron_amopo.objective.amopo import amopo_loss

    torch.manual_seed(args.seed)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    hf_cfg = AutoConfig.for_model(
        cfg["model_type"], **{k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "torch_dtype")}
    )
    with device:
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
    if args.save_weights:
        model.save_pretrained(args.save_weights)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    batches = [build_micro_batch(c, "padded") for c in chunks]  # one sequence per row, padded to the longest
    num_pairs, amopo_cfg = args.dims + 1, AmopoConfig()
    total_samples = sum(len(c) for c in chunks)

    def micro(batch: MicroBatch) -> torch.Tensor:
        inp = {k: getattr(batch, k).to(device) for k in ("tokens", "labels", "loss_mask", "segment_ids")}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(input_ids=inp["tokens"], attention_mask=(inp["segment_ids"] >= 0).long()).logits
            stats = baseline_stats(inp, logits).pairs(num_pairs)
            loss_B, _ = amopo_loss(stats, amopo_cfg, sample_ids=batch.sample_ids.to(device))
        loss = loss_B.sum() / total_samples
        loss.backward()
        return loss.detach()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = sum(micro(b) for b in batches)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss)

    losses, times = _timed(step, args.steps, args.warmup)
    return dict(losses=losses, times=times, rows=sum(b.tokens.shape[0] for b in batches), attention="hf-sdpa")


# -------------------------------------------------------------------------- driver
def run_side(args) -> None:
    """Subprocess body: one side, results as JSON to --out."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cfg = hf_config(args.model)
    num_samples = args.micro_batch * args.num_microbatches
    groups = (
        dataset_groups(args.data_path, num_samples)
        if args.data_path
        else make_groups(num_samples, args.dims, args.seq_length, cfg["vocab_size"], args.seed)
    )
    chunks = [groups[i : i + args.micro_batch] for i in range(0, len(groups), args.micro_batch)]
    try:
        res = (run_ours if args.side == "ours" else run_baseline)(args, cfg, chunks)
    except torch.cuda.OutOfMemoryError as err:  # a result too: the baseline may not fit where ours does
        print(f"{args.side}: out of GPU memory: {str(err).splitlines()[0]}", file=sys.stderr)
        res = dict(oom=True, losses=[float("nan")], times=[float("inf")], rows=0, attention="-")
    lengths = [len(s) - 1 for g in groups for s in g.tokens]
    res.update(
        peak_memory=peak_memory_bytes(), samples=len(groups), tokens=sum(lengths), flops=model_flops(cfg, lengths)
    )
    with open(args.out, "w") as fh:
        json.dump(res, fh)


def _spawn(args, side: str, tmp: str, extra: list[str]) -> dict:
    out = os.path.join(tmp, f"{side}.json")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--side",
        side,
        "--out",
        out,
        "--model",
        args.model,
        "--seq-length",
        str(args.seq_length),
        "--micro-batch",
        str(args.micro_batch),
        "--num-microbatches",
        str(args.num_microbatches),
        "--dims",
        str(args.dims),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--seed",
        str(args.seed),
        "--lr",
        str(args.lr),
        "--layout",
        args.layout,
        *(["--chunk-tokens", str(args.chunk_tokens)] if args.chunk_tokens else []),
        *(["--data-path", args.data_path] if args.data_path else []),
        "--output-layer",
        args.output_layer,
        "--disable",
        args.disable,
        *(["--profile"] if args.profile else []),
        *extra,
    ]
    subprocess.run(cmd, check=True)
    with open(out) as fh:
        return json.load(fh)


def summarize(name: str, res: dict, peak: float | None) -> dict:
    t = sorted(res["times"])[len(res["times"]) // 2]  # median step
    row = dict(
        side=name,
        oom=bool(res.get("oom")),
        attention=res["attention"],
        step_s=t,
        samples_per_s=res["samples"] / t,
        tokens_per_s=res["tokens"] / t,
        peak_mem_gib=res["peak_memory"] / 2**30,
        tflops=res["flops"] / t / 1e12,
        mfu=mfu(res["flops"], t, 1, peak),
        first_loss=res["losses"][0],
        rows=res["rows"],
    )
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default="tiny",
        help=f"tiny, {', '.join(MODELS)}, or a Hugging Face model directory (its config.json)",
    )
    p.add_argument(
        "--data-path",
        default=None,
        help="train on the first samples of this preprocessed dataset instead of synthetic ones "
        "(its dimensions set --dims)",
    )
    p.add_argument("--seq-length", type=int, default=256, help="row length S (longest sequence's positions)")
    p.add_argument("--micro-batch", type=int, default=2, help="samples (groups of 2(D+1) sequences) per micro-batch")
    p.add_argument("--num-microbatches", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--dims", type=int, default=4, help="D preference dimensions (P = D + 1 pairs per sample)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: 989 on H100/H200)")
    p.add_argument(
        "--same-weights",
        action="store_true",
        help="start ours from the baseline's initial weights (saved and converted): first losses must agree",
    )
    p.add_argument(
        "--layout",
        default="packed",
        choices=["packed", "packed-thd", "packed-mask", "padded", "padded-causal"],
        help="ours: packed rows as the training step feeds them (training.step.packed_thd_default), "
        "forced to one THD stream (TE, or variable-length flash attention without TE), or forced "
        "to rows with their block-diagonal mask; one padded row per sequence with its mask, or "
        "padded rows with plain causal attention (no mask: flash kernel)",
    )
    p.add_argument("--chunk-tokens", type=int, default=None, help="ours: tokens per chunk of the log-prob kernel")
    p.add_argument(
        "--output-layer",
        default="logits",
        choices=["logits", "fused"],
        help="ours: --amopo-output-layer (fused: log-probs from the hidden states, no logits tensor)",
    )
    p.add_argument(
        "--disable",
        default="",
        help="ours, diagnostic: comma list of speed-ups to turn off: "
        "swiglu-fusion (compiled SwiGLU), fused-adam (single-kernel AdamW)",
    )
    p.add_argument("--sides", default="ours,baseline", help="which sides to run (ours-only for variants)")
    p.add_argument("--profile", action="store_true", help="ours: print a torch.profiler table of one more step")
    p.add_argument("--json", default=None, help="write the summary here")
    p.add_argument("--side", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--save-weights", default=None, help=argparse.SUPPRESS)
    p.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model not in ("tiny", *MODELS) and not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"--model {args.model!r}: not one of tiny, {', '.join(MODELS)} nor a directory with a config.json")
    if args.data_path and not args.side:
        from megatron_amopo.data.reader import PreferenceGroupDataset

        args.dims = PreferenceGroupDataset(args.data_path).num_pairs - 1
    if args.side:
        run_side(args)
        return {}
    sides = args.sides.split(",")
    if "ours" not in sides or not set(sides) <= {"ours", "baseline"}:
        raise SystemExit(f"--sides must be ours or ours,baseline, got {args.sides!r}")
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        base = None
        if "baseline" in sides:
            base = _spawn(args, "baseline", tmp, ["--save-weights", hf_dir] if args.same_weights else [])
        ours = _spawn(args, "ours", tmp, ["--weights", hf_dir] if args.same_weights and base else [])
    device, peak = device_peak_tflops(args.peak_tflops)
    rows = [summarize("ours", ours, peak)] + ([summarize("baseline", base, peak)] if base else [])
    summary = dict(
        model=args.model,
        device=device,
        seq_length=args.seq_length,
        micro_batch=args.micro_batch,
        num_microbatches=args.num_microbatches,
        dims=args.dims,
        samples_per_step=ours["samples"],
        real_tokens_per_step=ours["tokens"],
        peak_tflops=peak,
        results=rows,
        speedup=float("nan"),
        memory_ratio=float("nan"),
    )
    if base:
        b = rows[1]
        summary["speedup"] = rows[0]["tokens_per_s"] / b["tokens_per_s"] if b["tokens_per_s"] else float("inf")
        summary["memory_ratio"] = rows[0]["peak_mem_gib"] / max(b["peak_mem_gib"], 1e-9)
    _print(summary)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1)
    return summary


def _print(s: dict) -> None:
    print(
        f"\n{s['model']} on {s['device']}: S={s['seq_length']}, {s['samples_per_step']} samples/step "
        f"({s['micro_batch']} x {s['num_microbatches']} micro-batches, D={s['dims']}), "
        f"{s['real_tokens_per_step']} real tokens/step"
    )
    print(
        f"{'side':9} {'attention':16} {'step s':>8} {'samples/s':>10} {'tokens/s':>10} {'peak GiB':>9} "
        f"{'TFLOP/s':>8} {'MFU':>6} {'rows':>5} {'loss@1':>10}"
    )
    for r in s["results"]:
        if r["oom"]:
            print(f"{r['side']:9} out of GPU memory (peak {r['peak_mem_gib']:.2f} GiB before failing)")
            continue
        mfu_s = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(
            f"{r['side']:9} {r['attention']:16} {r['step_s']:8.3f} {r['samples_per_s']:10.2f} "
            f"{r['tokens_per_s']:10.0f} {r['peak_mem_gib']:9.2f} {r['tflops']:8.1f} {mfu_s:>6} {r['rows']:5d} "
            f"{r['first_loss']:10.6f}"
        )
    if len(s["results"]) > 1:
        print(f"ours / baseline: throughput x{s['speedup']:.2f}, peak memory x{s['memory_ratio']:.2f}")


if __name__ == "__main__":
    main()
