"""Gwet's AC1/AC2 against worked examples from the literature, with the arithmetic shown."""
from fractions import Fraction as F

import pytest

from llama2.agreement import gwet, gwet_ac1, gwet_ac2, percent_agreement, weight_matrix

N = None
# Gwet (2014), Handbook of Inter-Rater Reliability, 4th ed., p. 120: 4 raters, 12 subjects,
# categories 1..5, missing ratings (no rater rated every subject). Published (irrCAC):
# AC1 0.775 (pa 0.818, pe 0.190); AC2 quadratic 0.914 (0.975, 0.714); linear 0.859 (0.939,
# 0.571); ordinal 0.899 (0.968, 0.685).
FOUR_RATERS = [
    [1, 1, N, 1], [2, 2, 3, 2], [3, 3, 3, 3], [3, 3, 3, 3], [2, 2, 2, 2], [1, 2, 3, 4],
    [4, 4, 4, 4], [1, 1, 2, 1], [2, 2, 2, 2], [N, 5, 5, 5], [N, N, 1, 1], [N, N, 3, N],
]


def test_ac1_four_raters_by_hand():
    # p_a: subjects with >= 2 ratings (all but #12). Agreeing pairs / all pairs per subject:
    # #2 (2,2,3,2): 3*2/(4*3) = 1/2;  #6 (1,2,3,4): 0;  #8 (1,1,2,1): 1/2;  the 8 others: 1.
    pa = (8 + F(1, 2) + 0 + F(1, 2)) / 11  # = 9/11
    # pi_k = mean over the 12 subjects of r_ik / r_i:
    # k=1: #1 1 + #6 1/4 + #8 3/4 + #11 1 = 3      k=2: #2 3/4 + #5 1 + #6 1/4 + #8 1/4 + #9 1 = 13/4
    # k=3: #2 1/4 + #3 1 + #4 1 + #6 1/4 + #12 1 = 7/2     k=4: #6 1/4 + #7 1 = 5/4     k=5: #10 1 = 1
    pi = [F(3), F(13, 4), F(7, 2), F(5, 4), F(1)]
    pi = [p / 12 for p in pi]
    assert sum(pi) == 1
    pe = sum(p * (1 - p) for p in pi) / (5 - 1)  # identity weights: T_w = q
    ac1 = (pa - pe) / (1 - pe)

    got = gwet(FOUR_RATERS)
    assert got.pa == pytest.approx(float(pa), abs=1e-12)
    assert got.pe == pytest.approx(float(pe), abs=1e-12)
    assert got.coefficient == pytest.approx(float(ac1), abs=1e-12)
    # ... and the published values.
    assert (round(got.coefficient, 3), round(got.pa, 3), round(got.pe, 3)) == (0.775, 0.818, 0.190)
    assert gwet_ac1(FOUR_RATERS) == got.coefficient
    assert percent_agreement(FOUR_RATERS) == pytest.approx(9 / 11)


def test_ac2_quadratic_four_raters_by_hand():
    # Quadratic weights on 1..5: w = 1 - d^2/16 for distance d. T_w sums the 5x5 matrix:
    # d=0: 5 cells * 1, d=1: 8 * 15/16, d=2: 6 * 12/16, d=3: 4 * 7/16, d=4: 2 * 0  ->  75/4.
    w = weight_matrix([1, 2, 3, 4, 5], "quadratic")
    assert sum(map(sum, w)) == pytest.approx(75 / 4)
    # p_a: r*_ik = sum_l w_kl r_il. Subject #2 (three 2s, one 3): r*_2 = 3 + 15/16, r*_3 = 3*15/16 + 1,
    # so sum_k r_ik (r*_ik - 1) / 12 = (3 * (2 + 15/16) + 1 * 45/16) / 12 = (186/16) / 12 = 31/32.
    # #6 (1,2,3,4): each rating's r* - 1 sums the weights to the other three ratings:
    # 1: 15/16+12/16+7/16 = 34/16; 2: 15+15+12 = 42/16; 3: 12+15+15 = 42/16; 4: 7+12+15 = 34/16
    # -> (34+42+42+34)/16/12 = 152/192 = 19/24.  #8 (1,1,2,1): like #2 -> 31/32.  Others agree: 1.
    pa = (8 + F(31, 32) + F(19, 24) + F(31, 32)) / 11
    pi = [F(3, 12), F(13, 48), F(7, 24), F(5, 48), F(1, 12)]  # as in the AC1 test
    pe = F(75, 4) / (5 * 4) * sum(p * (1 - p) for p in pi)
    ac2 = (pa - pe) / (1 - pe)

    got = gwet(FOUR_RATERS, weights="quadratic")
    assert got.pa == pytest.approx(float(pa), abs=1e-12)
    assert got.pe == pytest.approx(float(pe), abs=1e-12)
    assert got.coefficient == pytest.approx(float(ac2), abs=1e-12)
    assert (round(got.coefficient, 3), round(got.pa, 3), round(got.pe, 3)) == (0.914, 0.975, 0.714)


@pytest.mark.parametrize("weights, published", [
    ("linear", (0.859, 0.939, 0.571)),
    ("ordinal", (0.899, 0.968, 0.685)),
])
def test_ac2_other_weights_match_published(weights, published):
    got = gwet(FOUR_RATERS, weights=weights)
    assert (round(got.coefficient, 3), round(got.pa, 3), round(got.pe, 3)) == published


def test_two_raters_high_agreement_example():
    # Gwet (2008), the "paradox" example: 125 subjects, 2 raters, agree on "+" 118 times,
    # disagree 5 + 2 times, never agree on "-". Kappa is about -0.02; AC1 stays high.
    rows = [["+", "+"]] * 118 + [["+", "-"]] * 5 + [["-", "+"]] * 2
    pa = F(118, 125)
    pi_plus = (F(123, 125) + F(120, 125)) / 2  # = 243/250
    pe = 2 * pi_plus * (1 - pi_plus) / (2 - 1)
    ac1 = (pa - pe) / (1 - pe)
    assert gwet_ac1(rows) == pytest.approx(float(ac1), abs=1e-12)
    assert round(gwet_ac1(rows), 2) == 0.94


def test_perfect_agreement_is_one():
    rows = [[5, 5, 5], [4, 4, 4], [1, 1, N], [2, 2, 2]]
    for weights in ("identity", "linear", "quadratic", "ordinal"):
        assert gwet(rows, categories=[1, 2, 3, 4, 5], weights=weights).coefficient == pytest.approx(1.0)
    # Everybody always in the same single category: still perfect, not a division by zero.
    assert gwet_ac1([["a", "a"], ["a", "a"]]) == 1.0
    # With the full scale given, one used category is perfect agreement too.
    assert gwet_ac2([[5, 5, 5]] * 4, categories=[1, 2, 3, 4, 5]) == pytest.approx(1.0)


def test_systematic_disagreement_is_below_zero():
    # Two raters who always disagree on a balanced binary item: pa = 0, pe = 1/2 -> AC1 = -1.
    assert gwet_ac1([["y", "n"], ["n", "y"]] * 5) == pytest.approx(-1.0)


def test_ordinal_weights_by_hand():
    # q = 3 ranks: M(d) = C(d+1, 2): d=1 -> 1, d=2 -> 3 = M_max. w = 1 - M/M_max.
    assert weight_matrix(["lo", "mid", "hi"], "ordinal") == [
        [1.0, pytest.approx(2 / 3), 0.0], [pytest.approx(2 / 3), 1.0, pytest.approx(2 / 3)],
        [0.0, pytest.approx(2 / 3), 1.0]]


def test_errors_are_clear():
    with pytest.raises(ValueError, match="two or more ratings"):
        gwet([[1, N], [N, 2]])
    with pytest.raises(ValueError, match="subject 1: rating 7"):
        gwet([[1, 1], [7, 1]], categories=[1, 2, 3])
    with pytest.raises(ValueError, match="unknown weights"):
        gwet([[1, 1]], weights="cubic")
    with pytest.raises(ValueError, match="AC2 needs weights"):
        gwet_ac2([[1, 1]], weights="identity")
