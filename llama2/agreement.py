"""Inter-rater reliability: Gwet's AC1 and AC2 for several raters, missing ratings allowed.

Llama 2 §4.4 reports the reliability of its three safety raters with Gwet's AC1/AC2. Following
Gwet (2014, Handbook of Inter-Rater Reliability, ch. 2-3), with n subjects, q categories,
r_ik raters putting subject i in category k, r_i = sum_k r_ik and weights w_kl (w_kk = 1):

    r*_ik = sum_l w_kl r_il
    p_a   = mean over subjects with r_i >= 2 of  sum_k r_ik (r*_ik - 1) / (r_i (r_i - 1))
    pi_k  = mean over subjects with r_i >= 1 of  r_ik / r_i
    p_e   = T_w / (q (q - 1)) * sum_k pi_k (1 - pi_k),      T_w = sum_kl w_kl
    AC    = (p_a - p_e) / (1 - p_e)

Identity weights give AC1 (nominal; T_w = q, so p_e = sum_k pi_k (1 - pi_k) / (q - 1)); any
other weights give AC2 (ordinal scales such as the 5-point Likert ratings).
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from math import comb
from typing import NamedTuple

WEIGHTS = ("identity", "linear", "quadratic", "ordinal")

Ratings = Sequence[Sequence[Hashable | None]]  # one row per subject, one column per rater


class Agreement(NamedTuple):
    coefficient: float  # AC1 / AC2
    pa: float  # weighted percent agreement
    pe: float  # chance agreement


def weight_matrix(categories: Sequence, kind: str = "identity") -> list[list[float]]:
    """Gwet's agreement weights between ordered categories (numeric values where given)."""
    if kind not in WEIGHTS:
        raise ValueError(f"unknown weights {kind!r} (known: {', '.join(WEIGHTS)})")
    q = len(categories)
    numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in categories)
    x = [float(c) for c in categories] if numeric else [float(i) for i in range(q)]
    span = (max(x) - min(x)) or 1.0
    m_max = comb(q, 2) or 1  # the largest ordinal distance, between the two extreme categories

    def w(k: int, l: int) -> float:
        if k == l:
            return 1.0
        if kind == "identity":
            return 0.0
        if kind == "linear":
            return 1.0 - abs(x[k] - x[l]) / span
        if kind == "quadratic":
            return 1.0 - (x[k] - x[l]) ** 2 / span ** 2
        return 1.0 - comb(abs(k - l) + 1, 2) / m_max  # ordinal: ranks only

    return [[w(k, l) for l in range(q)] for k in range(q)]


def _counts(ratings: Ratings, categories: Sequence) -> list[list[int]]:
    index = {c: k for k, c in enumerate(categories)}
    table = []
    for i, row in enumerate(ratings):
        counts = [0] * len(categories)
        for rating in row:
            if rating is None:
                continue
            if rating not in index:
                raise ValueError(f"subject {i}: rating {rating!r} is not one of the categories {list(categories)}")
            counts[index[rating]] += 1
        table.append(counts)
    return table


def gwet(ratings: Ratings, categories: Sequence | None = None, weights: str = "identity") -> Agreement:
    """Gwet's agreement coefficient; `None` marks a missing rating. Pass `categories` (in scale
    order) when some possible ratings were never used: they still count in q."""
    if categories is None:
        categories = sorted({r for row in ratings for r in row if r is not None})
    q = len(categories)
    w = weight_matrix(categories, weights)
    table = _counts(ratings, categories)
    rated = [row for row in table if sum(row) >= 1]
    paired = [row for row in table if sum(row) >= 2]
    if not paired:
        raise ValueError("no subject has two or more ratings: agreement is undefined")

    pa = 0.0
    for row in paired:
        r_i = sum(row)
        weighted = [sum(w[k][l] * row[l] for l in range(q)) for k in range(q)]  # r*_ik
        pa += sum(row[k] * (weighted[k] - 1) for k in range(q)) / (r_i * (r_i - 1))
    pa /= len(paired)

    pi = [sum(row[k] / sum(row) for row in rated) / len(rated) for k in range(q)]
    if q < 2:  # one category: everyone agrees by construction
        return Agreement(1.0, pa, 1.0)
    t_w = sum(map(sum, w))
    pe = t_w / (q * (q - 1)) * sum(p * (1 - p) for p in pi)
    return Agreement((pa - pe) / (1 - pe), pa, pe)


def gwet_ac1(ratings: Ratings, categories: Sequence | None = None) -> float:
    """Gwet's AC1 (nominal categories)."""
    return gwet(ratings, categories, "identity").coefficient


def gwet_ac2(ratings: Ratings, categories: Sequence | None = None, weights: str = "ordinal") -> float:
    """Gwet's AC2 (ordered categories; ordinal, linear or quadratic weights)."""
    if weights == "identity":
        raise ValueError("AC2 needs weights: use gwet_ac1 for identity weights")
    return gwet(ratings, categories, weights).coefficient


def percent_agreement(ratings: Ratings, categories: Sequence | None = None) -> float:
    """Share of agreeing rater pairs per subject, averaged over subjects with two or more ratings."""
    return gwet(ratings, categories, "identity").pa


def wilson_interval(wins: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion wins / n (good near 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # The interval holds p; at p = 0 or 1 its edge is p exactly (rounding would leave it 1e-16 short).
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))
