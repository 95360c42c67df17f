"""The reward RLHF optimises (Llama 2 §3.2.3): two reward models combined by a safety gate.

    Rc(g | p) = Rs(g | p)  if IS_SAFETY(p) or Rs(g | p) < 0.15,  else Rh(g | p)

Rs and Rh are the safety and helpfulness reward models' scores as probabilities (sigmoid of the
scalar head). The threshold 0.15 gave precision 0.89 and recall 0.55 on the paper's safety test
set. Rejection sampling ranks samples by Rc; PPO then optimises whiten(logit(Rc)) − β·KL.

A scorer is anything with `prob(dialogs, responses) -> Tensor` (llama2.reward_scoring.RewardScorer),
or with `prob_records(records, responses)` when it needs the prompt record (the built-in world's
graders as an oracle reward). With only one reward model, it is used for both.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llama2.config import ConfigError, load_object
from llama2.formats import AXES
from llama2.losses import gated_reward
from llama2.reward_scoring import RewardScorer

# Scorers a config names instead of a checkpoint. Reached by name, so the engine never imports the
# built-in world: it is the world's graders as a reward (an oracle, for ablations).
NAMED_SCORERS = {"grader": "llama2.world.oracle:GraderScorer"}


def check_reward_axes(axes: list[str], key: str = "reward_axes") -> None:
    """`reward_axes` (rejection sampling, PPO): a non-empty list of helpfulness and/or safety:
    the prompts whose rewards are optimised, by `prompt_axis`."""
    if not axes or not set(axes) <= set(AXES):
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
        rh = scorer_prob(self.helpfulness, records, responses)
        rs = rh if self.safety is self.helpfulness else scorer_prob(self.safety, records, responses)
        is_safety = torch.tensor([bool(r.get("is_safety", False)) for r in records])
        used = is_safety | (rs < self.threshold)
        return RewardScores(rh, rs, gated_reward(rs, rh, is_safety, self.threshold), used)


def scorer_prob(scorer, records: list[dict], responses: list[str]) -> torch.Tensor:
    """A scorer's probabilities for responses to prompt records (`prob_records` when it has one)."""
    if hasattr(scorer, "prob_records"):
        return scorer.prob_records(records, responses).float()
    return scorer.prob([r["messages"] for r in records], responses).float()


def load_scorer(spec: str, axis: str, batch_size: int = 32, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, where: str = "reward model"):
    """One axis's scorer from a spec: a reward-model checkpoint, a name of NAMED_SCORERS (`grader`,
    built for the axis), or `module:attr` naming a scorer object or a class called without arguments."""
    if spec in NAMED_SCORERS:
        return load_object(NAMED_SCORERS[spec], where)(axis)
    if ":" in spec and not Path(spec).exists():
        obj = load_object(spec, where)
        return obj() if isinstance(obj, type) else obj
    if not Path(spec).exists():
        raise ConfigError(f"{where}: reward model not found: {spec!r} (a checkpoint path, `grader` or module:attr)")
    return RewardScorer(spec, batch_size=batch_size, device=device, dtype=dtype)


def load_gated_reward(helpfulness: str, safety: str = "", threshold: float = 0.15, batch_size: int = 32,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      where: str = "reward model") -> GatedReward:
    """Rc from two specs (see `load_scorer`); an empty `safety`, or the same checkpoint twice, loads
    one model for both axes (a user with a single reward model)."""
    if not helpfulness:
        raise ConfigError(f"{where}: the helpfulness reward model is required (a checkpoint path, or `grader`)")
    rh = load_scorer(helpfulness, "helpfulness", batch_size, device, dtype, where)
    same = not safety or (safety == helpfulness and safety not in NAMED_SCORERS)
    rs = None if same else load_scorer(safety, "safety", batch_size, device, dtype, where)
    return GatedReward(rh, rs, threshold)
