"""Peak extra memory and time of the AMoPO loss path: fused output layer, current path and baseline.

Paths measured (CPU, fp32, one tensor-parallel rank), all on the same inputs in one process and
feeding the same ``amopo_loss``:

  --from hidden (default): final hidden states [R, S, H] and output weight [V, H] -> log-probs ->
  per-sequence statistics -> AMoPO loss -> backward to the hidden states and the weight.
    fused     ``fused_token_logprobs``: the logits formed chunk by chunk, never all at once
              (``--amopo-output-layer fused``).
    current   the output layer's GEMM (logits [R, S, V]) + the training step's ``token_logprobs``
              with ``inplace_backward`` (the default ``--amopo-output-layer logits``).
    baseline  the same GEMM + the published AMoPO code's approach: ``log_softmax`` and ``softmax``
              over the full vocabulary, both materialised, then a Python loop over sequences.
  --from logits: logits -> loss -> backward to the logits, ``token_logprobs`` (``ours``; with
  --out-of-place the public default, a fresh gradient tensor) against the baseline. Each run
  gets a fresh copy of the logits (untimed), an autograd op's output as in training.

Peak memory is the kernel's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs before each phase; a 1 ms RSS sampler where that is not allowed) minus
the resident size before the phase, relative to the logits' size; from hidden states, the
gradients of the hidden states and the weight (produced by every path) are not counted. Times
are the best of --repeats interleaved runs; the CPU time of this process is printed as well,
since on a shared machine the wall time depends on the load. Goals from hidden states: fused
extra <= 0.05x the logits at V = 151,936 and time <= 1.1x the current path's.

    nice -n 10 .venv/bin/python benchmarks/bench_loss_path.py                 # default sizes, H = 896
    nice -n 10 .venv/bin/python benchmarks/bench_loss_path.py --hidden 128 --lengths 256 --vocabs 32000

A size whose baseline would not fit in the memory available (estimated 7.5x the logits, at most
--memory-fraction of what is free) runs without it; the largest length (halving) at which the
baseline fits is then added for that vocabulary.
"""

from __future__ import annotations

import argparse
import functools
import gc
import threading
import time

import psutil
import torch

from megatron_amopo.config import AmopoConfig
from megatron_amopo.objective.amopo import SequenceStats, amopo_loss
from megatron_amopo.objective.fused_logprobs import fused_token_logprobs
from megatron_amopo.objective.logprobs import sequence_stats, token_logprobs

GIB = 2**30
BASELINE_FACTOR = 7.5  # inputs + fresh copy + log_softmax + softmax + their gradients + grad of the logits, slack
OURS_FACTOR = {True: 2.2, False: 3.2}  # inputs + fresh copy (+ gradient when out of place) + slack, by inplace
CURRENT_FROM_HIDDEN_FACTOR = 1.2  # --from hidden, the current path: the output layer's logits (gradient in place)


class PeakRSS:
    """Peak resident set size of this process during a ``with`` block, in bytes."""

    def __init__(self) -> None:
        self.peak = 0

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status")

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.start = self._status("VmRSS:")
        self._sampler = None
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS
        except OSError:
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self._sampler is None:
            self.peak = self._status("VmHWM:")
        else:
            self._stop.set()
            self._sampler.join()

    @property
    def extra(self) -> int:
        return max(self.peak - self.start, 0)


def make_inputs(num_seqs: int, length: int, vocab: int, prompt_frac: float, seed: int = 0) -> dict:
    """Padded layout, one sequence per row; the first ``prompt_frac`` of each row is prompt."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.empty(num_seqs, length, vocab)
    for i in range(num_seqs):  # row by row: no second full-size temporary
        logits[i].normal_(generator=gen).mul_(2.0)
    labels = torch.randint(0, vocab, (num_seqs, length), generator=gen)
    mask = torch.zeros(num_seqs, length)
    mask[:, int(prompt_frac * length) :] = 1.0
    segments = torch.arange(num_seqs)[:, None].expand(num_seqs, length).contiguous()
    return dict(logits=logits, labels=labels, loss_mask=mask, segment_ids=segments)


def make_hidden_inputs(num_seqs: int, length: int, vocab: int, hidden: int, prompt_frac: float, seed: int = 0) -> dict:
    """Final hidden states [R, S, H] and an output weight [V, H] whose logits have the scale of ``make_inputs``'."""
    inp = make_inputs(num_seqs, length, 1, prompt_frac, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    inp.pop("logits")
    inp["labels"] = torch.randint(0, vocab, (num_seqs, length), generator=gen)
    inp["hidden"] = torch.randn(num_seqs, length, hidden, generator=gen)
    inp["weight"] = torch.randn(vocab, hidden, generator=gen).mul_(2.0 / hidden**0.5)
    return inp


def fused_stats(inp: dict, hidden: torch.Tensor, weight: torch.Tensor) -> SequenceStats:
    logp = fused_token_logprobs(hidden, weight, inp["labels"], None, mask=inp["loss_mask"])
    return sequence_stats(logp, inp["segment_ids"], inp["loss_mask"], hidden.shape[0])


# Hidden states -> statistics: the fused op, and the output layer's GEMM (logits as an op's output) followed
# by the current path or by the published-style baseline.
HIDDEN_PATHS = {
    "fused": fused_stats,
    "current": lambda inp, hidden, weight: ours_stats(inp, hidden @ weight.t()),
    "baseline": lambda inp, hidden, weight: baseline_stats(inp, hidden @ weight.t()),
}


def ours_stats(inp: dict, logits: torch.Tensor, inplace_backward: bool = True) -> SequenceStats:
    logp = token_logprobs(logits, inp["labels"], None, mask=inp["loss_mask"], inplace_backward=inplace_backward)
    return sequence_stats(logp, inp["segment_ids"], inp["loss_mask"], logits.shape[0])


def baseline_stats(inp: dict, logits: torch.Tensor) -> SequenceStats:
    logp_all = logits.log_softmax(dim=-1)
    p_all = logits.softmax(dim=-1)
    index = inp["labels"].unsqueeze(-1)
    token_logp = logp_all.gather(-1, index).squeeze(-1)
    token_p = p_all.gather(-1, index).squeeze(-1)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in SequenceStats._fields}
    for i in range(logits.shape[0]):  # per sequence, in Python
        sel = inp["loss_mask"][i] > 0
        lp, p = token_logp[i][sel], token_p[i][sel].detach()
        rows["sum_logp"].append(lp.sum())
        rows["n"].append(sel.sum().float())
        rows["sum_p"].append(p.sum())
        rows["sum_p2"].append((p * p).sum())
    return SequenceStats(**{k: torch.stack(v) for k, v in rows.items()})


def run_path(name: str, stats_fn, inp: dict, cfg: AmopoConfig, num_pairs: int) -> dict:
    leaf = inp["logits"].requires_grad_(True)
    # A fresh copy: an op's output, like the output layer's; the in-place backward overwrites it.
    out = _measure(lambda: stats_fn(inp, leaf.clone()), cfg, num_pairs)
    out.update(name=name, grad=leaf.grad)
    leaf.grad = None
    leaf.requires_grad_(False)
    return out


def _measure(stats_thunk, cfg: AmopoConfig, num_pairs: int) -> dict:
    """Time and peak extra memory of stats -> AMoPO loss (forward) and of its backward."""
    with PeakRSS() as fwd_mem:
        t0, c0 = time.perf_counter(), time.process_time()
        stats = stats_thunk().pairs(num_pairs)
        num_samples = stats.n.shape[0]
        loss_B, _ = amopo_loss(stats, cfg, sample_ids=torch.arange(num_samples))
        loss = loss_B.sum()
        t_fwd = time.perf_counter() - t0
    with PeakRSS() as bwd_mem:
        t1 = time.perf_counter()
        loss.backward()
        t_bwd, cpu = time.perf_counter() - t1, time.process_time() - c0
    # Forward + backward: the higher of the two peaks, above the resident size before the forward.
    total_extra = max(fwd_mem.peak, bwd_mem.peak) - fwd_mem.start
    return dict(loss=loss.item(), fwd_s=t_fwd, bwd_s=t_bwd, cpu_s=cpu, fwd_extra=fwd_mem.extra, total_extra=total_extra)


def run_hidden_path(name: str, inp: dict, cfg: AmopoConfig, num_pairs: int) -> dict:
    """One hidden -> loss -> backward run; the extra memory leaves out the two gradients every path produces."""
    hidden, weight = inp["hidden"].requires_grad_(True), inp["weight"].requires_grad_(True)
    out = _measure(lambda: HIDDEN_PATHS[name](inp, hidden, weight), cfg, num_pairs)
    grad_bytes = 4 * (hidden.numel() + weight.numel())
    out.update(name=name, grads=(hidden.grad, weight.grad), total_extra=max(out["total_extra"] - grad_bytes, 0))
    for t in (hidden, weight):
        t.grad = None
        t.requires_grad_(False)
    return out


def bench_hidden_size(num_seqs, length, vocab, args, cfg, repeats) -> bool:
    """Print one line for this size (fused vs current, and the baseline where it fits); True when all ran."""
    tokens = num_seqs * length
    logits_bytes, param_bytes = tokens * vocab * 4, 2 * 4 * (tokens + vocab) * args.hidden  # + their gradients
    available = psutil.virtual_memory().available * args.memory_fraction
    size = f"{num_seqs} x {length} x {vocab:,}"
    if logits_bytes * CURRENT_FROM_HIDDEN_FACTOR + param_bytes > available:
        print(f"{size:>22}: skipped, logits {logits_bytes / GIB:.2f} GiB do not fit ({available / GIB:.1f} GiB usable)")
        return False
    names = ["fused", "current"] + (["baseline"] if logits_bytes * BASELINE_FACTOR + param_bytes <= available else [])
    inp = make_hidden_inputs(num_seqs, length, vocab, args.hidden, args.prompt_frac)
    runs, diff = {n: [] for n in names}, {}
    for _ in range(repeats):  # interleaved, so that every path sees the same machine load
        grads = {}
        for name in names:
            runs[name].append(run_hidden_path(name, inp, cfg, args.pairs))
            grads[name] = runs[name][-1].pop("grads")
        for name in names[1:]:
            diff[name] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads["fused"], grads[name]))
        del grads
    best = {n: _best(r) for n, r in runs.items()}
    fused, current = best["fused"], best["current"]
    line = (
        f"{size:>22} logits {logits_bytes / GIB:5.2f} GiB | "
        + " | ".join(_fmt(n, best[n], logits_bytes) for n in names)
        + f" | time fused/current {fused['total_s'] / current['total_s']:4.2f}x"
        + f" (CPU time {fused['cpu_s'] / current['cpu_s']:4.2f}x)"
        + (f", baseline/fused {best['baseline']['total_s'] / fused['total_s']:4.1f}x" if "baseline" in best else "")
        + " | vs fused: "
        + ", ".join(
            f"{n} loss diff {abs(best[n]['loss'] - fused['loss']):.1e} grad rel diff {diff[n]:.1e}" for n in names[1:]
        )
    )
    print(line, flush=True)
    return "baseline" in best


def _best(runs: list[dict]) -> dict:
    """Fastest time and highest memory over repeats (the machine may be shared)."""
    out = {k: min(r[k] for r in runs) for k in ("fwd_s", "bwd_s", "cpu_s")}
    out.update({k: max(r[k] for r in runs) for k in ("fwd_extra", "total_extra")})
    out["total_s"] = min(r["fwd_s"] + r["bwd_s"] for r in runs)
    out["loss"] = runs[0]["loss"]
    return out


def _fmt(name: str, r: dict, logits_bytes: int) -> str:
    return (
        f"{name}: fwd {r['fwd_s']:6.2f}s bwd {r['bwd_s']:6.2f}s, extra fwd {r['fwd_extra'] / logits_bytes:4.2f}x "
        f"fwd+bwd {r['total_extra'] / logits_bytes:4.2f}x"
    )


def _ratio(base_extra: int, ours_extra: int, logits_bytes: int) -> str:
    """Baseline / ours extra memory; ours below 1% of the logits (in-place gradient) reads as such."""
    if ours_extra < 0.01 * logits_bytes:
        return f"ours < 0.01x logits vs {base_extra / logits_bytes:4.2f}x"
    return f"{base_extra / ours_extra:4.1f}x less"


def bench_size(num_seqs, length, vocab, args, cfg, repeats) -> bool:
    """Print one line for this size; True when the baseline ran too."""
    logits_bytes = num_seqs * length * vocab * 4
    available = psutil.virtual_memory().available * args.memory_fraction
    size = f"{num_seqs} x {length} x {vocab:,}"
    if logits_bytes * OURS_FACTOR[not args.out_of_place] > available:
        print(f"{size:>22}: skipped, logits {logits_bytes / GIB:.2f} GiB do not fit ({available / GIB:.1f} GiB usable)")
        return False
    with_baseline = logits_bytes * BASELINE_FACTOR <= available
    inp = make_inputs(num_seqs, length, vocab, args.prompt_frac)
    ours_runs, base_runs, grad_err = [], [], None
    for _ in range(repeats):  # interleaved, so that both see the same machine load
        ours_runs.append(
            run_path(
                "ours", functools.partial(ours_stats, inplace_backward=not args.out_of_place), inp, cfg, args.pairs
            )
        )
        ours_grad = ours_runs[-1].pop("grad")
        if with_baseline:
            base_runs.append(run_path("baseline", baseline_stats, inp, cfg, args.pairs))
            base_grad = base_runs[-1].pop("grad")
            grad_err = ((base_grad - ours_grad).abs().max() / ours_grad.abs().max()).item()
            del base_grad
        del ours_grad
    ours = _best(ours_runs)
    line = f"{size:>22} logits {logits_bytes / GIB:5.2f} GiB | " + _fmt("ours", ours, logits_bytes)
    if not with_baseline:
        print(line + f" | baseline skipped (needs ~{logits_bytes * BASELINE_FACTOR / GIB:.0f} GiB)", flush=True)
        return False
    base = _best(base_runs)
    print(
        line
        + " | "
        + _fmt("baseline", base, logits_bytes)
        + (
            f" | speed-up {base['total_s'] / ours['total_s']:4.1f}x (fwd {base['fwd_s'] / ours['fwd_s']:4.1f}x), "
            f"memory fwd+bwd {_ratio(base['total_extra'], ours['total_extra'], logits_bytes)}"
            f" | loss diff {abs(base['loss'] - ours['loss']):.1e}, grad rel diff {grad_err:.1e}"
        ),
        flush=True,
    )
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=8, help="sequences (2P per sample; 8 = one sample of P = 4 pairs)")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per sample P")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--prompt-frac", type=float, default=0.25, help="leading share of each row without loss")
    parser.add_argument("--memory-fraction", type=float, default=0.6, help="share of free memory a size may use")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per size (best time kept)")
    parser.add_argument(
        "--out-of-place",
        action="store_true",
        help="ours without inplace_backward (the public default; a fresh gradient tensor)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--from",
        dest="source",
        choices=("hidden", "logits"),
        default="hidden",
        help="hidden: hidden states -> loss, fused vs current vs baseline; logits: logits -> loss",
    )
    parser.add_argument("--hidden", type=int, default=896, help="hidden size H with --from hidden (Qwen2.5-0.5B: 896)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = AmopoConfig(weighting="gaussian")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, prompt share {args.prompt_frac}, "
        f"ours {'out of place' if args.out_of_place else 'inplace_backward'}, "
        f"free memory {psutil.virtual_memory().available / GIB:.1f} GiB"
        + (f", from hidden states, H = {args.hidden}" if args.source == "hidden" else ", from logits")
    )
    bench = bench_hidden_size if args.source == "hidden" else bench_size
    print("warm-up (first-call overheads; ignore):")
    bench(args.seqs, 64, 1000, args, cfg, 1)
    print(
        "extra = peak resident memory above the start of the phase, relative to the logits' size"
        + (" (hidden states, weight and their gradients not counted)" if args.source == "hidden" else "")
    )
    for vocab in args.vocabs:
        compared = [bench(args.seqs, length, vocab, args, cfg, args.repeats) for length in args.lengths]
        length = min(args.lengths) // 2
        while not any(compared) and length >= 64:
            bytes_needed = args.seqs * length * vocab * 4 * BASELINE_FACTOR
            if bytes_needed <= psutil.virtual_memory().available * args.memory_fraction:
                compared.append(bench(args.seqs, length, vocab, args, cfg, args.repeats))
            length //= 2


if __name__ == "__main__":
    main()
