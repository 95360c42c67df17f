"""The world's noiseless graders as a reward in [0, 1]: an oracle reward model (AlpacaFarm-style),
for ablations and for checking what a learned reward model misses. Configs reach it by name:
`helpfulness_rm=grader` / `safety_rm=grader` (llama2.gated_reward.load_scorer)."""
from __future__ import annotations

import torch

from llama2.formats import AXES
from llama2.world.grading import grade_helpfulness
from llama2.world.safety_grading import grade_safety


class GraderScorer:
    """axis "helpfulness": the grader's helpfulness score; axis "safety": the Likert rating mapped
    to [0, 1] ((likert - 1) / 4), so that violations (Likert <= 2) fall below 0.25."""

    def __init__(self, axis: str = "helpfulness"):
        if axis not in AXES:
            raise ValueError(f"axis must be helpfulness or safety, got {axis!r}")
        self.axis = axis

    def prob_records(self, records: list[dict], responses: list[str]) -> torch.Tensor:
        if self.axis == "helpfulness":
            return torch.tensor([grade_helpfulness(r, x).score for r, x in zip(records, responses)])
        return torch.tensor([(grade_safety(r, x).likert - 1) / 4 for r, x in zip(records, responses)])
