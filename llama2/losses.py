"""Every loss of the recipe as a plain function, each unit-tested against hand-computed values.

Language modelling (§2.2, §3.1), the reward model's binary ranking loss with a margin (§3.2.2),
and PPO's pieces (§3.2.3): the safety-gated reward, logit + whitening, the per-token KL penalty,
GAE, the clipped policy objective and the clipped value loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llama2.formats import RATINGS

IGNORE = -100  # target id that contributes no loss (prompt tokens in SFT, padding)


class _TokenCrossEntropy(torch.autograd.Function):
    """Per-token -log softmax(logits)[target] (0 where IGNORE), row chunk by row chunk in fp32.

    F.cross_entropy(logits.float()) keeps an (N, V) fp32 copy of the log-probabilities for backward
    and then fills, scatters and reads (N, V) tensors again. Here only the logits are kept; each
    chunk (~2 MB, so it stays in the L2 caches) is upcast, log-softmaxed for the loss, and in
    backward softmaxed again and turned into softmax - onehot in place: about a third less time
    than F.cross_entropy for large vocabularies (docs/results.md).
    """

    @staticmethod
    def forward(ctx, logits, targets):  # logits (N, V), targets (N,)
        valid = targets != IGNORE
        safe = targets.masked_fill(~valid, 0)[:, None]  # (N, 1)
        rows = max(1, 2**19 // logits.shape[1])  # 2 MB of fp32 per chunk
        nll = torch.cat([-torch.log_softmax(c.float(), dim=-1).gather(1, t)
                         for c, t in zip(logits.split(rows), safe.split(rows))]).squeeze(1)
        ctx.save_for_backward(logits, safe, valid)
        ctx.rows = rows
        return nll.masked_fill_(~valid, 0.0)

    @staticmethod
    def backward(ctx, g):  # g (N,)
        logits, safe, valid = ctx.saved_tensors
        scale = (g * valid)[:, None]  # (N, 1)
        fp32 = logits.dtype == torch.float32
        grad = torch.empty_like(logits)
        for i in range(0, logits.shape[0], ctx.rows):
            r = slice(i, i + ctx.rows)
            # fp32 logits: softmax straight into the gradient's rows, no chunk to copy; others: an
            # fp32 chunk, cast on the way in.
            p = torch.softmax(logits[r].float(), dim=-1, out=grad[r] if fp32 else None)
            p.scatter_add_(1, safe[r], torch.full_like(scale[r], -1.0))  # softmax - onehot
            p.mul_(scale[r])
            if not fp32:
                grad[r] = p
        return grad, None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy. logits (B, T, V), targets (B, T) with IGNORE where no loss.

    `mean` averages over the tokens that count; `sum` returns their total (for exact averaging
    across micro-batches and ranks by the caller).
    """
    targets = targets.flatten()
    losses = _TokenCrossEntropy.apply(logits.flatten(0, 1), targets)  # (B*T,)
    if reduction == "sum":
        return losses.sum()
    if reduction != "mean":
        raise ValueError(f"lm_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    return losses.sum() / (targets != IGNORE).sum()


# Margin m(r) by preference rating (Llama 2 Table 27): a larger gap for more distinct responses.
MARGINS = {
    "none": {r: 0.0 for r in RATINGS},
    "small": {"significantly better": 1.0, "better": 2 / 3, "slightly better": 1 / 3, "negligibly better/unsure": 0.0},
    "large": {"significantly better": 3.0, "better": 2.0, "slightly better": 1.0, "negligibly better/unsure": 0.0},
}


def ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Binary ranking loss with margin, -log σ(r_c − r_r − m(r)) averaged over pairs (§3.2.2)."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


def gated_reward(safety: torch.Tensor, helpful: torch.Tensor, is_safety: torch.Tensor,
                 threshold: float = 0.15) -> torch.Tensor:
    """Rc: the safety score on safety prompts or when it is below the threshold, else helpfulness (§3.2.3).

    Scores are probabilities in (0, 1) (sigmoid of the reward models' outputs).
    """
    use_safety = is_safety.bool() | (safety < threshold)
    return torch.where(use_safety, safety, helpful)


def whiten(x: torch.Tensor, eps: float = 1e-8, shift_mean: bool = True) -> torch.Tensor:
    """Zero mean, unit variance over the batch (the mean kept when shift_mean is False)."""
    mean, var = x.mean(), x.var(unbiased=False)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Inverse sigmoid, clamped away from 0 and 1 so that saturated scores stay finite."""
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate log π_θ(y_t) − log π_0(y_t) on sampled tokens (its mean over samples is the KL)."""
    return logp - ref_logp


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens. All (B, T); mask 1 on response tokens.

    Returns (advantages, returns); positions outside the mask are zero. Values after the last
    response token count as 0 (the episode ends there).
    """
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        m = mask[:, t].to(rewards.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m
        adv[:, t] = last
        # tokens outside the mask (padding after the response) pass nothing backwards
        next_value = values[:, t] * m + next_value * (1 - m)
    returns = (adv + values) * mask
    return adv, returns


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective (as a loss to minimise) and the fraction of clipped tokens."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).to(logp.dtype), mask)
    return loss, clip_frac


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> torch.Tensor:
    """Clipped value-function loss: 0.5 · max((V − R)², (clip(V) − R)²)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
