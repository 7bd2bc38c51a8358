"""Dimension-aware pair prompts.

A group has P = D + 1 pairs (layout in docs/DESIGN.md): pair 0 carries a general prompt that
asks for all selected dimensions at once; pair k (1..D) names dimension k, gives a short rubric
of the dataset's real score range and states the target score, which is the CHOSEN response's
score on dimension k, in both the chosen and the rejected sequence of that pair.

Each pair's prompt is formatted from the templates alone (``build_pair_prompts``); nothing of an
earlier pair's prompt is carried into a later one.

Templates may be overridden from a YAML or JSON file with the keys of ``DEFAULT_TEMPLATES``;
``descriptions`` is merged per dimension. Placeholders: {dimension}, {description},
{dimensions}, {rubric}, {target}, {score_min}, {score_max}, {score_mid}.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

DEFAULT_TEMPLATES = {
    "general": (
        "Answer the user so that the reply is good on every one of these qualities at the same time: "
        "{dimensions}. Do not trade one of them away for another."
    ),
    "dimension": (
        "This reply is judged on {dimension}: {description}\n"
        "Scale: {rubric}\n"
        "Write a reply whose {dimension} deserves a score of {target}."
    ),
    "rubric": (
        "from {score_min} to {score_max}; {score_min} means the quality is missing, {score_mid} means it is "
        "acceptable with clear flaws, {score_max} means it could not be better."
    ),
    "descriptions": {
        "helpfulness": "how well the reply meets the user's actual need.",
        "correctness": "whether every fact and step in the reply is true and no needed fact is left out.",
        "coherence": "how clear, consistent and easy to follow the reply is.",
        "complexity": "how much expertise is needed to write the reply (basic language up to specialist depth).",
        "verbosity": "how much detail the reply gives relative to what was asked.",
        "instruction_following": "how closely the reply obeys every instruction and constraint in the request.",
        "honesty": "whether the reply states its uncertainty and avoids claiming what it does not know.",
        "truthfulness": "whether the reply is free of invented facts and misleading statements.",
        "overall": "the overall quality of the reply as a whole.",
    },
}


def load_templates(path: Optional[str]) -> dict:
    """Default templates, updated from a YAML/JSON file when one is given."""
    templates = json.loads(json.dumps(DEFAULT_TEMPLATES))
    if not path:
        return templates
    with open(path, encoding="utf-8") as fh:
        if path.lower().endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(fh) or {}
        else:
            data = json.load(fh)
    unknown = set(data) - set(DEFAULT_TEMPLATES)
    if not isinstance(data, dict) or unknown:
        raise ValueError(
            f"{path}: prompt template file may only have the keys {sorted(DEFAULT_TEMPLATES)}, got {sorted(unknown)}"
        )
    descriptions = data.pop("descriptions", {}) or {}
    templates.update({k: str(v) for k, v in data.items()})
    templates["descriptions"].update({k: str(v) for k, v in descriptions.items()})
    return templates


def fmt_score(x: float) -> str:
    """4.0 -> '4', 7.5 -> '7.5' (scores are shown the way a rater would write them)."""
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}".rstrip("0")


class PromptBuilder:
    """Formats the P pair prompts of a group from templates, dimensions and the score range."""

    def __init__(self, templates: dict, dimensions: list[str], score_min: float, score_max: float) -> None:
        missing = [d for d in dimensions if d not in templates["descriptions"]]
        if missing:
            raise ValueError(
                f"no description for dimensions {missing}; add them under 'descriptions' in --prompt-templates"
            )
        self.templates, self.dimensions = templates, list(dimensions)
        self.lo, self.hi = score_min, score_max
        scale = {
            "score_min": fmt_score(score_min),
            "score_max": fmt_score(score_max),
            "score_mid": fmt_score((score_min + score_max) / 2),
        }
        self.rubric = templates["rubric"].format(**scale)
        self.scale = scale

    def general(self) -> str:
        return self.templates["general"].format(
            dimensions=", ".join(d.replace("_", " ") for d in self.dimensions), **self.scale
        )

    def dimension(self, k: int, target: float) -> str:
        """Prompt of pair k+1: dimension ``self.dimensions[k]`` with the chosen response's score as target."""
        name = self.dimensions[k]
        return self.templates["dimension"].format(
            dimension=name.replace("_", " "),
            description=self.templates["descriptions"][name],
            rubric=self.rubric,
            target=fmt_score(target),
            **self.scale,
        )

    def build_pair_prompts(self, chosen_scores: list[float]) -> list[str]:
        """[P] prompts: general first, then one per dimension, each formatted fresh."""
        return [self.general()] + [self.dimension(k, s) for k, s in enumerate(chosen_scores)]

    def template_hash(self, placement: str) -> str:
        blob = json.dumps(
            {
                "templates": self.templates,
                "dimensions": self.dimensions,
                "placement": placement,
                "range": [self.lo, self.hi],
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()
