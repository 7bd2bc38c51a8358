"""Configuration of preference-data preprocessing: record format, dimension prompts, truncation.

Same pattern as ``megatron_amopo/config.py``: every field has a default and a one-line
``help``; ``__post_init__`` fills per-format defaults and raises ``ValueError`` naming the
flag and the fix. Flags come from ``add_dataclass_args`` (prefix ``data`` is not used so the
preprocessing tool keeps short flag names such as ``--seq-length``).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal, Optional

from megatron_amopo.config import check_choices
from megatron_amopo.config import config_field as _f
from megatron_amopo.objective.pairs import mirrored_name

Format = Literal["amopo", "helpsteer2", "pairs"]
Placement = Literal["system", "user_prefix"]
CutEnds = Literal["even", "keep", "drop"]
DimensionPairs = Literal["paper", "mirrored"]
PLACEMENTS = typing.get_args(Placement)
HELPSTEER2_ATTRS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")

# Per-format defaults: dimensions and the dataset's real score range (HelpSteer2 0-4;
# UltraFeedback overall scores 1-10; AMoPO-style fine-grained UltraFeedback ratings 1-5).
DEFAULT_DIMENSIONS = {
    "helpsteer2": ["helpfulness", "correctness", "coherence"],
    "amopo": ["helpfulness", "correctness", "instruction_following"],
    "pairs": ["overall"],
}
DEFAULT_SCORE_RANGE = {"helpsteer2": (0.0, 4.0), "amopo": (1.0, 5.0), "pairs": (1.0, 10.0)}
DEFAULT_FIELD_MAP = {
    "prompt": "prompt",
    "chosen": "chosen",
    "rejected": "rejected",
    "score_chosen": "metadata.score_chosen",
    "score_rejected": "metadata.score_rejected",
}


def pair_names(dimensions: list[str], dimension_pairs: str = "paper") -> list[str]:
    """Names of a group's P pairs in layout order: general, the dimensions, then their mirrored pairs."""
    names = ["general", *dimensions]
    if dimension_pairs == "mirrored":
        names += [mirrored_name(d) for d in dimensions]
    return names


def parse_field_map(text: str) -> dict[str, str]:
    """``"prompt=question,chosen=a.b"`` -> dict over the keys of ``DEFAULT_FIELD_MAP``."""
    out = dict(DEFAULT_FIELD_MAP)
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in DEFAULT_FIELD_MAP or not value:
            raise ValueError(
                f"--field-map entry {item!r} must be KEY=FIELD with KEY in {sorted(DEFAULT_FIELD_MAP)} "
                "(nested fields with dots, e.g. score_chosen=metadata.score_chosen)"
            )
        out[key] = value
    return out


@dataclass
class DataConfig:
    """Preference records -> groups of 2(D+1) tokenised sequences."""

    format: Format = _f("helpsteer2", "input record format: amopo, helpsteer2 or pairs", flag="--format")
    # dimensions, score_min and score_max are typed as resolved: __post_init__ replaces None by the format's default
    dimensions: list[str] = _f(
        None,
        "score dimensions D (default per format: helpsteer2 helpfulness correctness coherence; "
        "amopo helpfulness correctness instruction_following; pairs overall)",
    )
    score_min: float = _f(None, "lowest score of the dataset's scale (default: helpsteer2 0, amopo 1, pairs 1)")
    score_max: float = _f(None, "highest score of the dataset's scale (default: helpsteer2 4, amopo 5, pairs 10)")
    pair_rule: str = _f(
        "mean",
        "which response is chosen: mean (higher mean of the selected dimensions), pareto (at least as good "
        "on every dimension and better on one), or one dimension name; ties are dropped and counted. "
        "as-given (amopo, pairs): the file's chosen/rejected, ties included, as the published AMoPO code trains",
    )
    field_map: str = _f(
        "",
        "pairs format: comma-separated KEY=FIELD overrides of prompt, chosen, rejected, score_chosen, "
        "score_rejected (dots reach nested fields)",
    )
    seq_length: int = _f(
        2048,
        "model sequence length S; a stored sequence has at most S+1 tokens (Megatron GPT shifts "
        "S+1 tokens into S inputs and S labels)",
    )
    response_share: float = _f(
        0.5,
        "share of a sequence's free token budget the response keeps before it is cut from its end; "
        "the user content is cut first",
    )
    max_user_loss: float = _f(0.5, "drop a group that would lose more than this fraction of its user-content tokens")
    cut_ends: CutEnds = _f(
        "even",
        "when one response of a group is cut by --seq-length and the other is whole: even (score neither "
        "end-of-turn token, so the pair loss does not teach the model to skip the stop after a finished "
        "answer), keep (the whole response keeps its end-of-turn token), or drop (skip the group)",
    )
    dimension_pairs: DimensionPairs = _f(
        "paper",
        "paper: one pair per dimension, its prompt stating the chosen response's score (the paper's construction); "
        "mirrored: also, for every dimension on which the two responses' scores differ, a pair whose prompt states "
        "the rejected response's score and prefers the rejected response (P = 1 + 2D; docs/DESIGN.md)",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if self.dimensions is None:
            self.dimensions = list(DEFAULT_DIMENSIONS[self.format])
        # "--dimensions a,b" and "--dimensions a b" mean the same
        self.dimensions = [d.strip() for item in self.dimensions for d in item.split(",") if d.strip()]
        if not self.dimensions or len(set(self.dimensions)) != len(self.dimensions):
            raise ValueError(f"--dimensions must be a non-empty list of distinct names, got {self.dimensions}")
        if self.format == "helpsteer2":
            bad = [d for d in self.dimensions if d not in HELPSTEER2_ATTRS]
            if bad:
                raise ValueError(f"--dimensions {bad} are not HelpSteer2 attributes; choose from {HELPSTEER2_ATTRS}")
        if self.format == "pairs" and len(self.dimensions) != 1:
            raise ValueError("--format pairs has one score per response: give exactly one --dimensions name")
        lo, hi = DEFAULT_SCORE_RANGE[self.format]
        self.score_min = lo if self.score_min is None else float(self.score_min)
        self.score_max = hi if self.score_max is None else float(self.score_max)
        if not self.score_min < self.score_max:
            raise ValueError(f"--score-min ({self.score_min}) must be below --score-max ({self.score_max})")
        if self.pair_rule == "as-given" and self.format == "helpsteer2":
            raise ValueError(
                "--pair-rule as-given keeps a file's chosen/rejected, but helpsteer2 rows are single rated "
                "responses; use mean, pareto or an attribute name, or --format amopo / pairs"
            )
        known = ("mean", "pareto", "as-given") + tuple(self.dimensions)
        if self.format == "helpsteer2":
            known += HELPSTEER2_ATTRS
        if self.pair_rule not in known:
            raise ValueError(
                f"--pair-rule must be mean, pareto, as-given or a dimension name {self.dimensions}, "
                f"got {self.pair_rule!r}"
            )
        if self.field_map and self.format != "pairs":
            raise ValueError("--field-map is only used with --format pairs")
        self.field_paths = parse_field_map(self.field_map)
        if self.seq_length < 8:
            raise ValueError(f"--seq-length must be >= 8, got {self.seq_length}")
        if not 0.0 < self.response_share < 1.0:
            raise ValueError(f"--response-share must be in (0, 1), got {self.response_share}")
        if not 0.0 <= self.max_user_loss <= 1.0:
            raise ValueError(f"--max-user-loss must be in [0, 1], got {self.max_user_loss}")

    @property
    def num_pairs(self) -> int:
        """P: the general pair, one pair per dimension and, when mirrored, one mirrored pair per dimension."""
        return len(self.pair_names)

    @property
    def pair_names(self) -> list[str]:
        return pair_names(self.dimensions, self.dimension_pairs)


@dataclass
class PromptConfig:
    """Dimension prompts: wording and where they go in the chat."""

    placement: Placement = _f(
        "system",
        "where the pair prompt goes: system (a system message) or user_prefix (prepended to the final user turn)",
        flag="--prompt-placement",
    )
    template_file: Optional[str] = _f(
        None,
        "YAML or JSON file overriding the prompt templates (keys: general, dimension, rubric, descriptions)",
        flag="--prompt-templates",
    )

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class PreprocessConfig:
    """Input, output and execution of tools/preprocess_data.py."""

    input: str = _f("", "input file: .jsonl, .json or .parquet", flag="--input")
    output: str = _f("", "output dataset directory (written to a temporary path, renamed at the end)", flag="--output")
    tokenizer: str = _f("", "local Hugging Face tokenizer directory (its chat template is used)", flag="--tokenizer")
    workers: int = _f(1, "tokenisation worker processes", flag="--workers")
    strict: bool = _f(False, "stop at the first bad row with its line number and reason", flag="--strict")
    overwrite: bool = _f(False, "replace an existing output directory", flag="--overwrite")
    limit: Optional[int] = _f(None, "read at most this many input rows", flag="--limit")
    chunk_size: int = _f(16, "groups per worker task", flag="--chunk-size")
    progress: bool = _f(True, "show a tqdm progress bar", flag="--progress")
    max_skipped_fraction: float = _f(
        1.0,
        "fail (exit 4, nothing written) when more than this fraction of the groups is skipped; "
        "no groups at all always fails",
        flag="--max-skipped-fraction",
    )

    def __post_init__(self) -> None:
        if not self.input:
            raise ValueError("--input is required: a .jsonl, .json or .parquet file")
        if not self.output:
            raise ValueError("--output is required: the dataset directory to write")
        if not self.tokenizer:
            raise ValueError("--tokenizer is required: a local Hugging Face tokenizer directory")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.chunk_size < 1:
            raise ValueError(f"--chunk-size must be >= 1, got {self.chunk_size}")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"--max-skipped-fraction must be in [0, 1], got {self.max_skipped_fraction}")


SPLIT_NAMES = ("train", "valid", "heldout")


@dataclass
class SplitConfig:
    """Preference rows -> train / valid / held-out row files with no prompt in two of them (tools/split_data.py)."""

    input: str = _f("", "input file: .jsonl, .json or .parquet", flag="--input")
    output: str = _f("", "output directory for train.jsonl, valid.jsonl, heldout.jsonl and split.json", flag="--output")
    split: str = _f(
        "80,10,10", "train,valid,heldout percentages of the distinct prompts (a 0 writes no file)", flag="--split"
    )
    seed: int = _f(1234, "seed of the prompt permutation; the same seed and prompts give the same split", flag="--seed")
    overwrite: bool = _f(False, "replace an existing output directory", flag="--overwrite")

    def __post_init__(self) -> None:
        if not self.input:
            raise ValueError("--input is required: a .jsonl, .json or .parquet file")
        if not self.output:
            raise ValueError("--output is required: the directory to write the split row files to")
        self.fractions()

    def fractions(self) -> tuple[float, float, float]:
        """The three percentages as fractions summing to 1."""
        try:
            parts = tuple(float(x) for x in str(self.split).split(","))
        except ValueError:
            parts = ()
        if len(parts) != 3 or min(parts) < 0 or parts[0] <= 0:
            raise ValueError(
                f"--split must be three non-negative numbers train,valid,heldout with train > 0, "
                f"e.g. 80,10,10; got {self.split!r}"
            )
        total = sum(parts)
        return tuple(p / total for p in parts)  # type: ignore[return-value]
