#!/usr/bin/env python
"""Peak memory of HF -> Megatron -> HF conversion of a ~0.5B-parameter model, as a ratio of its size.

  python benchmarks/bench_convert_memory.py [--workdir runs/bench-convert] [--dtype bfloat16]

Writes a random model of Qwen2.5-0.5B's shape (494M parameters, tied embeddings),
then runs each conversion tool in its own subprocess and reads that process's peak
RSS (getrusage RUSAGE_SELF inside it) and the largest peak of its own children
(dist_checkpointing forks file writers that share the parent's pages copy-on-write).
A baseline subprocess that imports the same libraries and starts the same process
group, but converts nothing, gives the fixed runtime overhead. Ratios are against
the model's size in bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(argv: list[str]) -> None:
    """Run one tool (or the baseline) in this process and print its peak RSS."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    what, rest = argv[0], argv[1:]
    if what == "make":
        import torch

        from megatron_amopo.convert.tiny_hf import QWEN25_05B, make_tiny_hf_model

        make_tiny_hf_model(
            rest[0], "qwen2", tied=True, dtype=getattr(torch, rest[1]), max_shard_size="2GB", **QWEN25_05B
        )
        rc = 0
    elif what == "baseline":
        import megatron.core  # noqa: F401
        import safetensors  # noqa: F401

        from megatron_amopo.convert.runtime import single_process_distributed

        with single_process_distributed():
            rc = 0
    else:
        import importlib.util

        spec = importlib.util.spec_from_file_location(what, os.path.join(ROOT, "tools", f"{what}.py"))
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        rc = tool.main(rest)
    kib = 1024  # Linux reports ru_maxrss in KiB
    print(
        json.dumps(
            {
                "rc": rc,
                "self_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib,
                "children_peak_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib,
            }
        )
    )


def _measure(*argv: str) -> dict:
    t0 = time.time()
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *argv], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if out["rc"] != 0:
        raise RuntimeError(f"{argv[0]} returned {out['rc']}:\n{res.stderr[-3000:]}")
    out["seconds"] = round(time.time() - t0, 1)
    return out


def _self_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench-convert"))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--keep", action="store_true", help="keep the model files afterwards")
    args = p.parse_args(argv)
    # This process stays small (no torch): Linux carries a process's peak RSS across
    # fork+exec into the child's RUSAGE_SELF, so a large parent would mask the children.
    hf, mc, out = (os.path.join(args.workdir, n) for n in ("hf", "mcore", "hf-export"))
    shutil.rmtree(args.workdir, ignore_errors=True)
    _measure("make", hf, args.dtype)
    with open(os.path.join(hf, "config.json")) as fh:
        cfg = json.load(fh)
    model_bytes = _dir_bytes(hf) - sum(
        os.path.getsize(os.path.join(hf, f)) for f in os.listdir(hf) if not f.endswith(".safetensors")
    )
    rows = {
        "baseline (imports + process group)": _measure("baseline"),
        "HF -> Megatron": _measure("convert_hf_to_megatron", "--hf-path", hf, "--save", mc),
        "Megatron -> HF": _measure("convert_megatron_to_hf", "--load", mc, "--save", out),
    }
    base = rows["baseline (imports + process group)"]["self_peak_bytes"]
    params = model_bytes // (2 if args.dtype == "bfloat16" else 4)
    print(
        f"model: Qwen2.5-0.5B shape ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
        f"vocab {cfg['vocab_size']}, tied), {params / 1e6:.0f}M parameters, {args.dtype}, "
        f"{model_bytes / 1e9:.3f} GB of weights; parent RSS {_self_peak() / 1e6:.0f} MB"
    )
    print(f"{'run':38s} {'peak RSS':>10s} {'ratio':>6s} {'(peak-base)/model':>18s} {'children peak':>14s} {'time':>7s}")
    for name, r in rows.items():
        peak = r["self_peak_bytes"]
        print(
            f"{name:38s} {peak / 1e9:8.3f}GB {peak / model_bytes:6.2f} {(peak - base) / model_bytes:18.2f} "
            f"{r['children_peak_bytes'] / 1e9:12.3f}GB {r['seconds']:6.1f}s"
        )
    print(json.dumps({"model_bytes": model_bytes, "runs": rows}))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
    else:
        sys.exit(main())
