"""The RLHF losses against hand-computed values (§3.2.3)."""
import math

import pytest
import torch

from llama2.losses import gae, gated_reward, kl_penalty, logit, masked_mean, ppo_policy_loss, value_loss, whiten
from llama2.gated_reward import GatedReward


def test_safety_gate():
    rs = torch.tensor([0.9, 0.10, 0.5, 0.14, 0.16])
    rh = torch.tensor([0.2, 0.80, 0.7, 0.90, 0.30])
    is_safety = torch.tensor([True, False, False, False, False])
    # safety prompt -> Rs; Rs < 0.15 -> Rs; otherwise Rh
    assert gated_reward(rs, rh, is_safety).tolist() == pytest.approx([0.9, 0.10, 0.7, 0.14, 0.30])


def test_gated_reward_with_scorers():
    class Const:
        def __init__(self, v):
            self.v = v

        def prob(self, dialogs, responses):
            return torch.full((len(responses),), self.v)

    records = [{"messages": [], "is_safety": True}, {"messages": [], "is_safety": False}]
    out = GatedReward(Const(0.8), Const(0.1))(records, ["a", "b"])
    assert out.gated.tolist() == pytest.approx([0.1, 0.1]) and out.used_safety.tolist() == [True, True]
    out = GatedReward(Const(0.8), Const(0.5))(records, ["a", "b"])
    assert out.gated.tolist() == pytest.approx([0.5, 0.8]) and out.used_safety.tolist() == [True, False]


def test_logit_and_whiten():
    p = torch.tensor([0.5, 0.8807970779778823, 0.11920292202211755])
    assert logit(p).tolist() == pytest.approx([0.0, 2.0, -2.0], abs=1e-5)
    assert torch.isfinite(logit(torch.tensor([0.0, 1.0]))).all()
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3, population variance (4+1+0+9)/4 = 3.5
    w = whiten(x)
    assert w.tolist() == pytest.approx([(v - 3) / math.sqrt(3.5) for v in (1, 2, 3, 6)], abs=1e-6)
    assert whiten(x, shift_mean=False).tolist() == pytest.approx([(v - 3) / math.sqrt(3.5) + 3 for v in (1, 2, 3, 6)],
                                                                 abs=1e-6)


def test_kl_penalty_is_log_ratio():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert kl_penalty(logp, ref).tolist() == [0.5, -1.0]


def test_gae_hand_computed():
    # one sequence of 3 response tokens then 1 padding; gamma 1, lambda 0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.25, 0.75, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # deltas: d2 = 1 + 0 - 0.75 = 0.25; d1 = 0 + 0.75 - 0.25 = 0.5; d0 = 0 + 0.25 - 0.5 = -0.25
    # A2 = 0.25; A1 = 0.5 + 0.5*0.25 = 0.625; A0 = -0.25 + 0.5*0.625 = 0.0625
    assert adv[0].tolist() == pytest.approx([0.0625, 0.625, 0.25, 0.0])
    assert ret[0].tolist() == pytest.approx([0.5625, 0.875, 1.0, 0.0])


def test_ppo_clipped_objective_hand_computed():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    loss, frac = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(1.1, 1.1) = 1.1
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    assert frac.item() == pytest.approx(1 / 3)


def test_value_loss_hand_computed():
    v, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[2.0, 1.0]])
    # token 0: clipped v = 0.5 + clamp(0.5, -0.2, 0.2) = 0.7; max((1-2)^2, (0.7-2)^2) = 1.69
    # token 1: max(1, 1) = 1 -> 0.5 * mean(1.69, 1) = 0.6725
    assert value_loss(v, old, ret, torch.ones(1, 2)).item() == pytest.approx(0.6725)
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1, 1, 0])).item() == 2.0


def test_grader_scorer_gates_refusals(world_dir):
    import json

    from llama2.world.oracle import GraderScorer

    records = [json.loads(line) for line in (world_dir / "prompts" / "eval.jsonl").read_text().splitlines()[:300]]
    reward = GatedReward(GraderScorer("helpfulness"), GraderScorer("safety"))
    out = reward(records, ["I cannot help with that."] * len(records))
    safety_rows = torch.tensor([r["is_safety"] for r in records])
    assert safety_rows.any() and (~safety_rows).any()
    assert out.used_safety[safety_rows].all()
    # a bare refusal is safe (Rs high) where safety decides, and unhelpful where helpfulness decides
    assert out.safety[safety_rows].min() >= 0.5
    assert out.gated[~out.used_safety].mean() < 0.3


def test_grader_scorer_is_on_the_scale_the_gate_and_the_whitening_expect(world_dir):
    import json

    import random

    from llama2.world.oracle import GraderScorer
    from llama2.world.safety import bad_answer
    from llama2.world.safety_grading import grade_safety

    records = [json.loads(line) for line in (world_dir / "prompts" / "eval.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    # fully and partly compliant answers to adversarial prompts: Likert 1 and 2
    pairs = [(r, bad_answer(r, rng, kind)) for r in [r for r in records if r["is_safety"]][:40]
             for kind in ("compliant", "partial_compliant")]
    rs = GraderScorer("safety").prob_records([r for r, _ in pairs], [c for _, c in pairs])
    likert = torch.tensor([grade_safety(r, c).likert for r, c in pairs])
    assert (likert <= 2).all()
    # every violation falls under the gate's threshold, so Rc = Rs on any prompt
    assert (rs < 0.15).all()
    benign = [r for r in records if not r["is_safety"] and r["task"] != "borderline"][:50]
    gold = [r["reference"]["gold"] for r in benign]
    rs_gold = GraderScorer("safety").prob_records(benign, gold)
    assert (rs_gold > 0.15).all()
    # helpfulness 0 and 1 stay logits of a few units, not the clamp's ±13.8
    rh = GraderScorer("helpfulness").prob_records(benign + benign, gold + ["I cannot help with that."] * len(benign))
    assert rh.max() == pytest.approx(0.95) and rh.min() == pytest.approx(0.05)
    assert logit(rh).abs().max() < 3.0
