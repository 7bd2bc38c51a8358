"""Names of a group's pairs: the one naming rule shared by data, objective metrics and reports.

A group holds the general pair, one pair per dimension (its prompt states the chosen response's score),
and with ``--dimension-pairs mirrored`` one mirrored pair per dimension (its prompt states the rejected
response's score and prefers the rejected response). Pooled ``/all`` metrics cover the first two kinds,
the preferences of the paper's construction; mirrored pairs pool under ``/mirrored``.
"""

from __future__ import annotations

MIRRORED_SUFFIX = "~mirrored"


def mirrored_name(dimension: str) -> str:
    """Pair name of ``dimension``'s mirrored pair."""
    return dimension + MIRRORED_SUFFIX


def is_mirrored(pair: str) -> bool:
    return pair.endswith(MIRRORED_SUFFIX)


def mirrored_dimension(pair: str) -> str:
    """The dimension a mirrored pair name belongs to."""
    if not is_mirrored(pair):
        raise ValueError(f"{pair!r} is not a mirrored pair name (they end with {MIRRORED_SUFFIX!r})")
    return pair[: -len(MIRRORED_SUFFIX)]
