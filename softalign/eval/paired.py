"""Paired comparison of two evaluations of the same prompts and seeds: McNemar's exact test on per-image verdicts.

Every `softalign eval` run draws image `i` of prompt `p` from the seed `seed + 1000 p + i`, so two runs with the same
plan (prompts, seeds, sampler) look at the same starting noise image by image. Their verdicts are then paired, and
the question "did this stage change the accuracy?" is answered by the discordant pairs alone: `b` images right only
in the first run, `c` right only in the second. Under "no change" each discordant pair is a fair coin, so the exact
two-sided p-value is `min(1, 2 P[Binomial(b + c, 1/2) <= min(b, c)])` (McNemar 1947; the exact form as in
`statsmodels.stats.contingency_tables.mcnemar(exact=True)`). A paired test separates much smaller changes than two
overlapping Wilson intervals can, because the images both runs get right or wrong carry no noise into it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from .summary import _correct, _tag_order


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts `b` (right only in A) and `c` (right only in B)."""
    for name, value in (("b", b), ("c", c)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"mcnemar_exact: {name} must be an int >= 0, got {value!r}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def _verdicts(rows: Iterable[Mapping], name: str) -> dict[tuple[str, str], tuple[str, bool]]:
    verdicts = {}
    for index, row in enumerate(rows):
        key = (str(row.get("filename")), str(row.get("prompt")))
        if key in verdicts:
            raise ValueError(f"{name}: row {index} repeats image {key[0]!r} ({key[1]!r}); expected one row per image")
        verdicts[key] = (str(row["tag"]), _correct(row, index))
    return verdicts


def paired_tests(rows_a: Iterable[Mapping], rows_b: Iterable[Mapping]) -> dict[str, dict]:
    """Per tag (and `"all"`): the paired counts of two runs over the same images and McNemar's exact p-value.

    Images are matched by (filename, prompt), which `softalign eval` derives from the prompt index and the seed
    index. Both runs must hold exactly the same images: a difference in the plan is an error, never a silent subset.

    Returns:
        `dict`: tag -> `n` (pairs), `both`, `only_a` (b), `only_b` (c), `neither`, `delta` (accuracy B - A) and `p`.
    """
    a, b = _verdicts(rows_a, "run A"), _verdicts(rows_b, "run B")
    if a.keys() != b.keys():
        missing, extra = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise ValueError(
            "paired_tests: the runs did not score the same images (same prompts, seeds and images per prompt "
            f"expected); {len(missing)} only in A (e.g. {missing[:2]}), {len(extra)} only in B (e.g. {extra[:2]})"
        )
    cells: dict[str, list[int]] = {}
    for key, (tag, right_a) in a.items():
        tag_b, right_b = b[key]
        if tag_b != tag:
            raise ValueError(f"paired_tests: image {key[0]!r} has tag {tag!r} in A but {tag_b!r} in B")
        index = 2 * (not right_a) + (not right_b)  # both, only A, only B, neither
        for group in (tag, "all"):
            cells.setdefault(group, [0, 0, 0, 0])[index] += 1
    out = {}
    for tag in [*_tag_order(t for t in cells if t != "all"), "all"]:
        both, only_a, only_b, neither = cells[tag]
        n = both + only_a + only_b + neither
        out[tag] = {
            "n": n,
            "both": both,
            "only_a": only_a,
            "only_b": only_b,
            "neither": neither,
            "delta": (only_b - only_a) / n,
            "p": mcnemar_exact(only_a, only_b),
        }
    return out
