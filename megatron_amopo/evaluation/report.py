"""Per-group evaluation detail and bootstrap confidence intervals over prompts.

An evaluation of a preprocessed split keeps, for every group (one prompt with its chosen and
rejected response), the margin beta * (a_c - a_r) of each pair; accuracy is margin > 0. Means
get a 95% percentile-bootstrap interval from resampling groups; the gain of one checkpoint
over another gets a paired bootstrap (the same resampled groups for both), so it reflects the
change on each prompt rather than the spread between prompts. Pure numpy apart from
``gather_per_group``, which collects the records from the ranks of an evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Optional

import numpy as np
from numpy.typing import ArrayLike

from megatron_amopo.objective.pairs import is_mirrored, mirrored_dimension, mirrored_name

if TYPE_CHECKING:  # the reports' type only: this module stays numpy apart from gather_per_group
    from megatron_amopo.training.step import StepReport

METRICS = ("accuracy", "margin")
STEER_METRICS = ("steerability", "flip_rate")
ALL = "all"  # pseudo-pair: per group, the mean over its general and dimension pairs (mirrored ones left out)
DEFAULT_RESAMPLES = 10000


def group_records(reports: Sequence[StepReport], row_ids: np.ndarray, pair_names: Sequence[str]) -> list[dict]:
    """One record per evaluated group from this rank's schedule reports.

    A record is ``{"group_id", "row_id", "margin/<pair>": float or None}``; None marks a pair
    with an empty response (left out of that pair's statistics, as in the training metrics).
    """
    out = []
    for rep in reports:
        margins_BP, valid_BP = rep.pair_margins.double().cpu(), rep.pair_valid.cpu()
        if margins_BP.shape[1] != len(pair_names):
            raise ValueError(f"reports have {margins_BP.shape[1]} pairs but pair_names has {len(pair_names)}")
        for b, g in enumerate(rep.sample_ids.tolist()):
            rec: dict[str, Optional[float]] = {"group_id": int(g), "row_id": int(row_ids[int(g)])}
            for k, name in enumerate(pair_names):
                rec[f"margin/{name}"] = float(margins_BP[b, k]) if bool(valid_BP[b, k]) else None
            out.append(rec)
    return out


def gather_per_group(
    reports: Sequence[StepReport], row_ids: np.ndarray, pair_names: Sequence[str], reporting: bool
) -> list[dict]:
    """Every rank's group records (reporting ranks contribute theirs), sorted by group id."""
    import torch.distributed as dist

    mine = group_records(reports, row_ids, pair_names) if reporting else []
    if not dist.is_initialized():
        return sorted(mine, key=lambda r: r["group_id"])
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return sorted((r for part in everyone for r in part), key=lambda r: r["group_id"])


def pair_names_of(records: Sequence[dict]) -> list[str]:
    """Pair names present in the records, in their order."""
    if not records:
        return []
    return [k.split("/", 1)[1] for k in records[0] if k.startswith("margin/")]


def mirrored_dimensions(records: Sequence[dict]) -> list[str]:
    """Dimensions whose mirrored pair is in the records (``--dimension-pairs mirrored``), in order."""
    return [mirrored_dimension(p) for p in pair_names_of(records) if is_mirrored(p)]


def values(records: Sequence[dict], pair: str, metric: str) -> dict[int, float]:
    """group_id -> the group's value of ``metric`` on ``pair``; groups without one are left out.

    accuracy (0/1) and margin of a pair, or of ``ALL`` (mean over the group's general and dimension
    pairs). For a dimension with mirrored pairs: steerability = margin of pair k + margin of its mirrored
    pair k' (how far stating a response's own score instead of the other's moves the preference toward
    it; 0 for a model that ignores the dimension prompt) and flip_rate = 1[both margins > 0] (each of the
    two prompts makes the model prefer the response whose score it states).
    """
    if metric in STEER_METRICS:
        return _steer_values(records, pair, metric)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS + STEER_METRICS}, got {metric!r}")
    value = (lambda m: float(m > 0)) if metric == "accuracy" else float
    out = {}
    for r in records:
        if pair == ALL:
            ms = [m for k, m in r.items() if k.startswith("margin/") and m is not None and not is_mirrored(k)]
            if ms:
                out[int(r["group_id"])] = sum(value(m) for m in ms) / len(ms)
            continue
        m = r.get(f"margin/{pair}")
        if m is not None:
            out[int(r["group_id"])] = value(m)
    return out


def _steer_values(records: Sequence[dict], dimension: str, metric: str) -> dict[int, float]:
    if records and f"margin/{mirrored_name(dimension)}" not in records[0]:
        raise ValueError(
            f"{metric} of {dimension!r} needs its mirrored pair: evaluate data preprocessed with "
            "--dimension-pairs mirrored"
        )
    out = {}
    for r in records:
        m, m_mirror = r.get(f"margin/{dimension}"), r.get(f"margin/{mirrored_name(dimension)}")
        if m is None or m_mirror is None:
            continue  # the two responses tie on this dimension: no mirrored pair
        out[int(r["group_id"])] = float(m + m_mirror) if metric == "steerability" else float(m > 0 and m_mirror > 0)
    return out


def bootstrap_means(x: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of ``resamples`` resamples (with replacement) of the rows of x."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap of an empty sample")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // x.size)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        means[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
    return means


def mean_ci(
    x: ArrayLike, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile-bootstrap interval at ``level``."""
    x = np.asarray(x, dtype=np.float64)
    means = bootstrap_means(x, resamples, seed)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(x.mean()), float(lo), float(hi)


def summarize_groups(
    records: Sequence[dict],
    pair_names: Optional[Sequence[str]] = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict:
    """``{"<metric>/<pair>": mean, "<metric>_ci95/<pair>": [low, high], "groups/<pair>": n}`` for every pair
    and ``ALL``, plus ``steerability`` and ``flip_rate`` (``"groups_steer/<dimension>"``) of every dimension with
    mirrored pairs."""
    out: dict = {}
    pairs = list(pair_names or pair_names_of(records)) + [ALL]
    steer = mirrored_dimensions(records)
    for pair, metrics, count in [(p, METRICS, "groups") for p in pairs] + [
        (d, STEER_METRICS, "groups_steer") for d in steer
    ]:
        for metric in metrics:
            v = values(records, pair, metric)
            if not v:
                continue
            mean, lo, hi = mean_ci(list(v.values()), resamples, seed)
            out[f"{metric}/{pair}"], out[f"{metric}_ci95/{pair}"] = mean, [lo, hi]
            out[f"{count}/{pair}"] = len(v)
    return out


def paired_gain(
    before: Sequence[dict],
    after: Sequence[dict],
    pair: str,
    metric: str,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float, int]:
    """(gain, low, high, n): mean of after - before over the groups both evaluated, with its
    paired-bootstrap 95% interval. Refuses evaluations of different group sets."""
    b, a = values(before, pair, metric), values(after, pair, metric)
    ids_b = {int(r["row_id"]) for r in before}
    ids_a = {int(r["row_id"]) for r in after}
    if ids_a != ids_b:
        raise ValueError(
            f"the two evaluations cover different groups ({len(ids_b)} vs {len(ids_a)} rows, "
            f"{len(ids_a ^ ids_b)} not shared): evaluate both checkpoints on the same dataset"
        )
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"no group has a value for pair {pair!r} in both evaluations")
    mean, lo, hi = mean_ci([a[g] - b[g] for g in common], resamples, seed)
    return mean, lo, hi, len(common)


def write_records(path: str, records: Iterable[dict]) -> None:
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def read_records(path: str) -> list[dict]:
    """Group records of a ``tools/evaluate.py --per-group-output`` file."""
    with open(path) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    if not records or "group_id" not in records[0] or not pair_names_of(records):
        raise ValueError(f"{path}: not a per-group evaluation file (tools/evaluate.py --per-group-output)")
    return records


def fmt_ci(mean: float, lo: float, hi: float, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(mean)} [{f.format(lo)}, {f.format(hi)}]"


def comparison_table(
    baseline: Sequence[dict],
    arms: Sequence[tuple[str, Sequence[dict]]],
    pair_names: Sequence[str],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> str:
    """Markdown table: per arm and pair, accuracy and margin with 95% intervals, and the paired gain
    over ``baseline`` (the untrained model) with its 95% interval; '*' marks a gain interval
    that excludes zero."""
    head = (
        "| arm | pair | n | accuracy [95% CI] | accuracy gain [95% CI] | margin [95% CI] "
        "| margin gain [95% CI] |\n|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for pair in pair_names:
        acc = values(baseline, pair, "accuracy")
        if not acc:
            continue
        cells = [fmt_ci(*mean_ci(list(values(baseline, pair, m).values()), resamples, seed)) for m in METRICS]
        lines.append(f"| untrained | {pair} | {len(acc)} | {cells[0]} | | {cells[1]} | |")
    for name, recs in arms:
        for pair in pair_names:
            if not values(recs, pair, "accuracy"):
                continue
            row = [name, pair]
            for metric in METRICS:
                level = fmt_ci(*mean_ci(list(values(recs, pair, metric).values()), resamples, seed))
                gain, lo, hi, n = paired_gain(baseline, recs, pair, metric, resamples, seed)
                mark = "*" if lo > 0 or hi < 0 else ""
                row += [level, fmt_ci(gain, lo, hi, signed=True) + mark]
            lines.append(f"| {row[0]} | {row[1]} | {n} | {' | '.join(row[2:])} |")
    return "\n".join(lines)


def format_intervals(summary: dict, pair_names: Sequence[str]) -> str:
    """One console line per pair (and ``ALL``): accuracy and margin with their 95% intervals; one per
    dimension with mirrored pairs: steerability and flip rate."""
    lines = []
    for pair in [*pair_names, ALL]:
        if f"accuracy/{pair}" not in summary:
            continue
        acc = fmt_ci(summary[f"accuracy/{pair}"], *summary[f"accuracy_ci95/{pair}"])
        margin = fmt_ci(summary[f"margin/{pair}"], *summary[f"margin_ci95/{pair}"])
        lines.append(f"  {pair}: accuracy {acc} | margin {margin} | {summary[f'groups/{pair}']} groups (95% bootstrap)")
    for key in summary:
        if key.startswith("steerability/"):
            dim = key.split("/", 1)[1]
            steer = fmt_ci(summary[key], *summary[f"steerability_ci95/{dim}"])
            flip = fmt_ci(summary[f"flip_rate/{dim}"], *summary[f"flip_rate_ci95/{dim}"])
            lines.append(
                f"  {dim} steerability {steer} | flip rate {flip} | {summary[f'groups_steer/{dim}']} groups "
                "whose responses differ on it (95% bootstrap)"
            )
    return "\n".join(lines)


def steerability_table(
    baseline: Sequence[dict],
    arms: Sequence[tuple[str, Sequence[dict]]],
    dimensions: Sequence[str],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> str:
    """Markdown table: per model and dimension, steerability and flip rate with 95% intervals and the paired
    gain over ``baseline`` ('*': the gain's interval excludes zero)."""
    lines = [
        "| model | dimension | n | steerability [95% CI] | steerability gain [95% CI] | flip rate [95% CI] "
        "| flip rate gain [95% CI] |\n|---|---|---|---|---|---|---|"
    ]
    for name, recs in [("untrained", baseline), *arms]:
        for dim in dimensions:
            cells, n = [], 0
            for metric in STEER_METRICS:
                v = values(recs, dim, metric)
                n = len(v)
                cells.append(fmt_ci(*mean_ci(list(v.values()), resamples, seed)) if v else "")
                if recs is baseline:
                    cells.append("")
                    continue
                gain, lo, hi, _ = paired_gain(baseline, recs, dim, metric, resamples, seed)
                cells.append(fmt_ci(gain, lo, hi, signed=True) + ("*" if lo > 0 or hi < 0 else ""))
            lines.append(f"| {name} | {dim} | {n} | {' | '.join(cells)} |")
    return "\n".join(lines)
