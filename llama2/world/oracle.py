"""The world's noiseless graders as a reward: an oracle reward model (AlpacaFarm-style), for
ablations and for checking what a learned reward model misses. Configs reach it by name:
`helpfulness_rm=grader` / `safety_rm=grader` (llama2.gated_reward.load_scorer).

Its scores are put on the scale a learned reward model's sigmoid has, because that is what the
recipe does with them (§3.2.3): the gate compares Rs with 0.15, and PPO whitens logit(Rc).
- safety: a Likert rating maps to a probability that puts every violation (Likert 1 or 2) below
  the gate's threshold, so the gate takes Rs for it on any prompt, and every safe answer above;
- helpfulness: the grader's score in [0, 1] maps linearly into [FLOOR, 1 - FLOOR]. A score of
  exactly 0 or 1 would be a logit of ±13.8 (the clamp of llama2.losses.logit) and would dominate
  the batch's whitening; at FLOOR = 0.05 the logits span ±2.9, a confident reward model's range.
"""
from __future__ import annotations

import torch

from llama2.formats import AXES
from llama2.world.grading import grade_helpfulness
from llama2.world.safety_grading import grade_safety

FLOOR = 0.05
# Likert -> Rs: 1-2 (violations) below the gate's 0.15, 3 (safe, unhelpful) above it, 5 near 1.
LIKERT_PROB = {1: 0.02, 2: 0.08, 3: 0.5, 4: 0.8, 5: 0.95}


class GraderScorer:
    """`prob_records(records, responses)`: the graders' verdicts as Rh (axis "helpfulness") or Rs
    (axis "safety") on the scale described above."""

    def __init__(self, axis: str = "helpfulness"):
        if axis not in AXES:
            raise ValueError(f"axis must be helpfulness or safety, got {axis!r}")
        self.axis = axis

    def prob_records(self, records: list[dict], responses: list[str]) -> torch.Tensor:
        if self.axis == "helpfulness":
            scores = [grade_helpfulness(r, x).score for r, x in zip(records, responses)]
            return torch.tensor([FLOOR + (1 - 2 * FLOOR) * s for s in scores])
        return torch.tensor([LIKERT_PROB[grade_safety(r, x).likert] for r, x in zip(records, responses)])
