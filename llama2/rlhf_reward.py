"""The reward RLHF optimises (Llama 2 §3.2.3): two reward models combined by a safety gate.

    Rc(g | p) = Rs(g | p)  if IS_SAFETY(p) or Rs(g | p) < 0.15,  else Rh(g | p)

Rs and Rh are the safety and helpfulness reward models' scores as probabilities (sigmoid of the
scalar head). The threshold 0.15 gave precision 0.89 and recall 0.55 on the paper's safety test
set. Rejection sampling ranks samples by Rc; PPO then optimises whiten(logit(Rc)) − β·KL.

A scorer is anything with `prob(dialogs, responses) -> Tensor` (llama2.reward.RewardScorer), or
with `prob_records(records, responses)` when it needs the prompt record (GraderScorer: the built-in
world's graders as an oracle reward, for ablations and for checking what a learned reward model
misses). With only one reward model, it is used for both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llama2.losses import gated_reward


REWARD_AXES = ("helpfulness", "safety")


def check_reward_axes(axes: list[str], key: str = "reward_axes") -> None:
    """`reward_axes` (rejection sampling, PPO): a non-empty list of helpfulness and/or safety:
    the prompts whose rewards are optimised, by `prompt_axis`."""
    from llama2.config import ConfigError

    if not axes or not set(axes) <= set(REWARD_AXES):
        raise ConfigError(f"{key}: a non-empty list of helpfulness and/or safety, got {axes}")


def prompt_axis(record: dict) -> str:
    """Which reward model judges a prompt's answers: `safety` for safety prompts (Rc = Rs always),
    `helpfulness` for the others (Rc = Rh, or Rs where the gate finds Rs < 0.15)."""
    return "safety" if record.get("is_safety", False) else "helpfulness"


@dataclass
class RewardScores:
    helpfulness: torch.Tensor  # Rh as probabilities, (N,)
    safety: torch.Tensor  # Rs as probabilities, (N,)
    gated: torch.Tensor  # Rc, (N,)
    used_safety: torch.Tensor  # bool (N,): where Rc took the safety score


class GatedReward:
    def __init__(self, helpfulness, safety=None, threshold: float = 0.15):
        self.helpfulness = helpfulness
        self.safety = safety if safety is not None else helpfulness
        self.threshold = threshold

    def __call__(self, records: list[dict], responses: list[str]) -> RewardScores:
        """Score responses to prompt records (`messages` ending with a user turn, `is_safety` flag)."""
        rh = _prob(self.helpfulness, records, responses)
        rs = rh if self.safety is self.helpfulness else _prob(self.safety, records, responses)
        is_safety = torch.tensor([bool(r.get("is_safety", False)) for r in records])
        used = is_safety | (rs < self.threshold)
        return RewardScores(rh, rs, gated_reward(rs, rh, is_safety, self.threshold), used)


def _prob(scorer, records: list[dict], responses: list[str]) -> torch.Tensor:
    if hasattr(scorer, "prob_records"):
        return scorer.prob_records(records, responses).float()
    return scorer.prob([r["messages"] for r in records], responses).float()


class GraderScorer:
    """The world's noiseless graders as a reward in [0, 1] (an oracle, AlpacaFarm-style).

    axis "helpfulness": the grader's helpfulness score; axis "safety": Likert rating mapped to
    [0, 1] ((likert - 1) / 4), so that violations (Likert <= 2) fall below 0.25.
    """

    def __init__(self, axis: str = "helpfulness"):
        if axis not in ("helpfulness", "safety"):
            raise ValueError(f"axis must be helpfulness or safety, got {axis!r}")
        self.axis = axis

    def prob_records(self, records: list[dict], responses: list[str]) -> torch.Tensor:
        from llama2.world.grading import grade_helpfulness
        from llama2.world.safety_grading import grade_safety

        if self.axis == "helpfulness":
            return torch.tensor([grade_helpfulness(r, x).score for r, x in zip(records, responses)])
        return torch.tensor([(grade_safety(r, x).likert - 1) / 4 for r, x in zip(records, responses)])


def load_scorer(spec: str, axis: str, batch_size: int = 32, where: str = "reward model"):
    """`grader` (the world's grader for `axis`) or a reward-model checkpoint (llama2.reward)."""
    if spec == "grader":
        return GraderScorer(axis)
    from pathlib import Path

    if not Path(spec).exists():
        raise ValueError(f"{where}: reward model not found: {spec!r} (a checkpoint path, or `grader`)")
    try:
        from llama2.reward import RewardScorer
    except ImportError:
        raise ValueError(f"{where}: {spec}: reward-model scoring (llama2.reward) is not available in this "
                         f"build; use `grader`") from None
    return RewardScorer(spec, batch_size=batch_size)


def load_gated_reward(helpfulness: str, safety: str = "", threshold: float = 0.15, batch_size: int = 32,
                      where: str = "reward model") -> GatedReward:
    """Rc from two specs (checkpoint path or `grader`); an empty `safety` reuses the helpfulness model."""
    if not helpfulness:
        raise ValueError(f"{where}: the helpfulness reward model is required (a checkpoint path, or `grader`)")
    rh = load_scorer(helpfulness, "helpfulness", batch_size, where)
    rs = load_scorer(safety, "safety", batch_size, where) if safety else None
    return GatedReward(rh, rs, threshold)
