"""Peak extra memory and time of the AMoPO loss path against a full-vocabulary baseline.

Path measured (CPU, fp32, one tensor-parallel rank): logits -> per-token log-probs ->
per-sequence statistics -> AMoPO loss -> backward to the logits.

  ours      the training step's path: ``token_logprobs`` (chunked, only loss tokens,
            backward recomputes the softmax chunk-wise from the saved log-sum-exps and,
            with ``inplace_backward``, writes the gradient into the logits' own storage)
            + ``sequence_stats`` (one scatter-add per statistic). --out-of-place measures
            the public default (a fresh gradient tensor) instead.
  baseline  the published AMoPO code's approach: ``log_softmax`` and ``softmax`` over
            the full vocabulary, both materialised, then a Python loop over sequences
            for the per-sequence sums (log-probs, probabilities and their squares).

Both feed the same ``amopo_loss`` and run on the same inputs in the same process. Each
run gets a fresh copy of the logits (untimed; its backward passes the gradient
through), so that, as in training, they are the output of an autograd op.
Peak memory is the kernel's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs before each phase; a 1 ms RSS sampler where that is not
allowed) minus the resident size before the phase, reported relative to the logits'
size; times are the best of --repeats interleaved runs. Goals: forward extra <= 0.5x
logits, forward + backward extra <= 1.5x logits (the gradient of the logits itself is
1x), >= 3x faster than the baseline.

    .venv/bin/python benchmarks/bench_loss_path.py            # default sizes
    .venv/bin/python benchmarks/bench_loss_path.py --lengths 256 --vocabs 32000

A size whose baseline would not fit in the memory available (estimated 7.5x the
logits, at most --memory-fraction of what is free) runs ours only; the largest length
(halving) at which the baseline fits is then added for that vocabulary.
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
from megatron_amopo.objective.amopo import amopo_loss
from megatron_amopo.objective.logprobs import sequence_stats, stats_to_pairs, token_logprobs

GIB = 2**30
BASELINE_FACTOR = 7.5  # inputs + fresh copy + log_softmax + softmax + their gradients + grad of the logits, slack
OURS_FACTOR = {True: 2.2, False: 3.2}  # inputs + fresh copy (+ gradient when out of place) + slack, by inplace


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

    def __enter__(self) -> "PeakRSS":
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
    mask[:, int(prompt_frac * length):] = 1.0
    segments = torch.arange(num_seqs)[:, None].expand(num_seqs, length).contiguous()
    return dict(logits=logits, labels=labels, loss_mask=mask, segment_ids=segments)


def ours_stats(inp: dict, logits: torch.Tensor, inplace_backward: bool = True) -> dict:
    logp = token_logprobs(logits, inp["labels"], None, mask=inp["loss_mask"], inplace_backward=inplace_backward)
    return sequence_stats(logp, inp["segment_ids"], inp["loss_mask"], logits.shape[0])


def baseline_stats(inp: dict, logits: torch.Tensor) -> dict:
    logp_all = logits.log_softmax(dim=-1)
    p_all = logits.softmax(dim=-1)
    index = inp["labels"].unsqueeze(-1)
    token_logp = logp_all.gather(-1, index).squeeze(-1)
    token_p = p_all.gather(-1, index).squeeze(-1)
    rows = {k: [] for k in ("sum_logp", "n", "sum_p", "sum_p2")}
    for i in range(logits.shape[0]):  # per sequence, in Python
        sel = inp["loss_mask"][i] > 0
        lp, p = token_logp[i][sel], token_p[i][sel].detach()
        rows["sum_logp"].append(lp.sum())
        rows["n"].append(sel.sum().float())
        rows["sum_p"].append(p.sum())
        rows["sum_p2"].append((p * p).sum())
    return {k: torch.stack(v) for k, v in rows.items()}


def run_path(name: str, stats_fn, inp: dict, cfg: AmopoConfig, num_pairs: int) -> dict:
    leaf = inp["logits"].requires_grad_(True)
    logits = leaf.clone()  # an op's output, like the output layer's; the in-place backward overwrites it
    with PeakRSS() as fwd_mem:
        t0 = time.perf_counter()
        stats = stats_to_pairs(stats_fn(inp, logits), num_pairs)
        num_samples = stats["n"].shape[0]
        loss_B, _ = amopo_loss(stats, cfg, sample_ids=torch.arange(num_samples))
        loss = loss_B.sum()
        t_fwd = time.perf_counter() - t0
    with PeakRSS() as bwd_mem:
        t1 = time.perf_counter()
        loss.backward()
        t_bwd = time.perf_counter() - t1
    # Forward + backward: the higher of the two peaks, above the resident size before the forward.
    total_extra = max(fwd_mem.peak, bwd_mem.peak) - fwd_mem.start
    out = dict(name=name, loss=loss.item(), fwd_s=t_fwd, bwd_s=t_bwd, fwd_extra=fwd_mem.extra, total_extra=total_extra,
               grad=leaf.grad)
    del loss, loss_B, stats, logits
    leaf.grad = None
    leaf.requires_grad_(False)
    return out


def _best(runs: list[dict]) -> dict:
    """Fastest time and highest memory over repeats (the machine may be shared)."""
    out = {k: min(r[k] for r in runs) for k in ("fwd_s", "bwd_s")}
    out.update({k: max(r[k] for r in runs) for k in ("fwd_extra", "total_extra")})
    out["total_s"] = min(r["fwd_s"] + r["bwd_s"] for r in runs)
    out["loss"] = runs[0]["loss"]
    return out


def _fmt(name: str, r: dict, logits_bytes: int) -> str:
    return (f"{name}: fwd {r['fwd_s']:6.2f}s bwd {r['bwd_s']:6.2f}s, extra fwd {r['fwd_extra'] / logits_bytes:4.2f}x "
            f"fwd+bwd {r['total_extra'] / logits_bytes:4.2f}x")


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
        ours_runs.append(run_path("ours", functools.partial(ours_stats, inplace_backward=not args.out_of_place),
                                  inp, cfg, args.pairs))
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
    print(line + " | " + _fmt("baseline", base, logits_bytes) + (
        f" | speed-up {base['total_s'] / ours['total_s']:4.1f}x (fwd {base['fwd_s'] / ours['fwd_s']:4.1f}x), "
        f"memory fwd+bwd {_ratio(base['total_extra'], ours['total_extra'], logits_bytes)}"
        f" | loss diff {abs(base['loss'] - ours['loss']):.1e}, grad rel diff {grad_err:.1e}"
    ), flush=True)
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
    parser.add_argument("--out-of-place", action="store_true",
                        help="ours without inplace_backward (the public default; a fresh gradient tensor)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = AmopoConfig(weighting="gaussian")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, prompt share {args.prompt_frac}, "
          f"ours {'out of place' if args.out_of_place else 'inplace_backward'}, "
          f"free memory {psutil.virtual_memory().available / GIB:.1f} GiB")
    print("warm-up (first-call overheads; ignore):")
    bench_size(args.seqs, 64, 1000, args, cfg, 1)
    print("extra = peak resident memory above the start of the phase, relative to the logits' size")
    for vocab in args.vocabs:
        compared = [bench_size(args.seqs, length, vocab, args, cfg, args.repeats) for length in args.lengths]
        length = min(args.lengths) // 2
        while not any(compared) and length >= 64:
            bytes_needed = args.seqs * length * vocab * 4 * BASELINE_FACTOR
            if bytes_needed <= psutil.virtual_memory().available * args.memory_fraction:
                compared.append(bench_size(args.seqs, length, vocab, args, cfg, args.repeats))
            length //= 2


if __name__ == "__main__":
    main()
