"""PPO rollouts (Llama 2 §3.2.3, after Stiennon et al. 2020): sampling, bookkeeping, shaped rewards.

What the PPO recipe needs besides the losses of llama2/losses.py, each piece tested on its own:
- which prompts an iteration uses and with which seed each generation chunk samples, as pure
  functions of (seed, iteration), so that a resumed or multi-process run samples exactly what a
  single uninterrupted process samples;
- `consolidated_policy`: the full policy weights gathered once per iteration for generation under
  FSDP (the paper's fix for its ~20x slower generation with sharded weights);
- rollouts that keep the log-probabilities they were sampled with (θ_old, no extra forward);
- the layout of a batch of rollouts: prompt + response right-padded in one row each (for GAE),
  or all end to end in one unpadded row (for the model passes), the response mask on the
  "action" positions where column t predicts token t + 1, and the policy's logits computed at
  those positions only;
- `shaped_rewards`: −β·KL on every response token plus the whitened score on the last one;
- `PPOBatch`: one micro-batch ready for the clipped policy and value losses.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from llama2.checkpoint import build_model
from llama2.distributed import Dist, all_reduce_sum
from llama2.generation import Decoder, SamplingParams
from llama2.losses import kl_penalty
from llama2.train import derive_seed


class Rollout(NamedTuple):
    """One sampled answer: `index` is its prompt's position in the iteration's batch."""

    index: int
    prompt: list[int]
    response: list[int]  # sampled ids, ending with the stop token when the model stopped
    text: str  # the answer as the reward models read it (stop token / stop string cut)
    logprobs: list[float]  # log π_θold of every response id (stop token included), as sampled: logits / temperature


class PPOBatch(NamedTuple):
    """A micro-batch of rollouts for the PPO update: tokens (B, L) and mask (B, L - 1) on the action
    positions (column t predicts token t + 1); the rest (N,) over the N response tokens, in the
    row-major order of mask.bool()."""

    tokens: torch.Tensor  # prompt + response, right-padded
    mask: torch.Tensor  # 1.0 where tokens[:, t + 1] is a response token (not prompt, not padding)
    old_logprobs: torch.Tensor  # log π_θold of each response token, from the policy that sampled it
    old_values: torch.Tensor  # V(state before the token), from the value model before the update
    advantages: torch.Tensor  # GAE advantages (whitened over the whole batch)
    returns: torch.Tensor  # value targets: advantages + old values (before whitening)
    lengths: list[int] | None = None  # set when tokens is one packed row (1, N): each sequence's length


# ----------------------------------------------------------------------------- prompt order and seeds


def iteration_prompts(num_prompts: int, batch_size: int, iteration: int, seed: int) -> list[int]:
    """Indices of the prompts of PPO iteration `iteration` (0-based).

    The prompt stream is a fresh permutation per epoch, read `batch_size` at a time, so the batch
    of any iteration is a pure function of (seed, iteration): resuming needs only the counter.
    """
    out: list[int] = []
    start = iteration * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), num_prompts)
        order = np.random.default_rng((seed, epoch)).permutation(num_prompts)
        out += order[offset: offset + batch_size - len(out)].tolist()
    return out


def generation_chunks(prompt_lengths: list[int], chunk_size: int, d: Dist) -> list[tuple[int, list[int]]]:
    """This rank's (chunk number, batch positions) for generation.

    Positions are sorted by prompt length (little left-padding per chunk), cut into chunks of
    `chunk_size`, and chunk k goes to rank k mod world: each rank generates for its share of the
    prompts, and chunk k holds the same prompts and seed whatever the number of ranks.
    """
    order = sorted(range(len(prompt_lengths)), key=lambda i: (-prompt_lengths[i], i))
    chunks = [order[s: s + chunk_size] for s in range(0, len(order), chunk_size)]
    return [(k, c) for k, c in enumerate(chunks) if k % d.world_size == d.rank]


# ----------------------------------------------------------------------------- generation


def consolidated_policy(policy: torch.nn.Module, d: Dist, dtype: torch.dtype) -> torch.nn.Module:
    """The policy with full (unsharded) weights for generation, on every rank.

    Under FSDP every decoding step of a sharded model would all-gather every layer again; the
    paper measured generation ~20x slower that way and instead consolidated the weights on each
    node once before generation and freed them after (§3.2.3). Single-process runs in the
    training dtype generate with the policy itself (the CPU fast path copies it anyway).
    """
    if not d.enabled and next(policy.parameters()).dtype == dtype:
        return policy

    state = {}
    for name, t in policy.state_dict().items():
        t = t.full_tensor() if hasattr(t, "full_tensor") else t  # all-gather a DTensor shard
        state[name] = t.detach()
    return build_model(policy.args, state, "policy (consolidated)", device=d.device, dtype=dtype)


def sample_rollouts(decoder: Decoder, prompts: list[list[int]], chunks: list[tuple[int, list[int]]],
                    params: SamplingParams, seed: int, iteration: int) -> list[Rollout]:
    """Sample one answer per prompt position of this rank's chunks, each chunk with its own seed.

    Each rollout keeps the log-probabilities its tokens were sampled with: they are PPO's θ_old
    (as in trl, which takes them from generation's logits), so the policy needs no extra forward
    pass over the batch. tests/test_ppo.py checks them against a full forward of the policy.
    """
    out = []
    for k, positions in chunks:
        chunk_params = SamplingParams(**{**params.__dict__, "seed": derive_seed(seed, iteration, k),
                                         "logprobs_at_temperature": True})
        for i, c in zip(positions, decoder.generate([prompts[i] for i in positions], chunk_params)):
            # The stop token is an action of the policy too: it is trained (the model learns when to
            # stop) and it is where the score lands.
            stopped = c.stop_token is not None
            response = c.tokens + ([c.stop_token] if stopped else [])
            logprobs = c.logprobs + ([c.stop_logprob] if stopped else [])
            out.append(Rollout(i, prompts[i], response, c.text.strip(), logprobs))
    return out


# ----------------------------------------------------------------------------- batch layout


def pad_rollouts(rollouts: list[Rollout], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt + response ids (B, L) and the response mask (B, L - 1) on action positions.

    Right padding needs no attention mask: causal attention never lets a real token see the padding
    after it, and every prompt starts at position 0 as it did in generation (left-padded there, with
    positions counted from each row's first real token).
    """
    L = max(len(r.prompt) + len(r.response) for r in rollouts)
    tokens = torch.full((len(rollouts), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rollouts), L - 1)
    for b, r in enumerate(rollouts):
        p, n = len(r.prompt), len(r.response)
        tokens[b, : p + n] = torch.tensor(r.prompt + r.response, dtype=torch.long)
        mask[b, p - 1: p - 1 + n] = 1.0  # column t predicts token t + 1: the response starts at column p - 1
    return tokens, mask


def pack_rollouts(rollouts: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Prompt + response ids of all rollouts end to end in one row (1, N), the response mask
    (1, N - 1) on action positions as in `pad_rollouts`, and each rollout's length.

    The model runs such a row with `lengths=` (llama2.cpu_kernels.Ragged): each sequence as if alone,
    with no padding; the response tokens come out in the same order as from `pad_rollouts`.
    """
    lengths = [len(r.prompt) + len(r.response) for r in rollouts]
    tokens = torch.tensor([t for r in rollouts for t in r.prompt + r.response], dtype=torch.long)[None]
    mask = torch.zeros(1, sum(lengths))
    start = 0
    for r, n in zip(rollouts, lengths):
        mask[0, start + len(r.prompt) - 1: start + n - 1] = 1.0  # a sequence's last token predicts nothing
        start += n
    return tokens, mask[:, :-1], lengths


def action_positions(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices into the (B, T) tokens of the N positions that `mask` (B, T - 1) marks, row-major:
    the `keep` of a model forward whose outputs are read only there (llama2.model.Transformer)."""
    rows, cols = mask.bool().nonzero(as_tuple=True)
    return rows * (mask.shape[1] + 1) + cols


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits / temperature (no division at temperature 1)."""
    return logits.float() if temperature == 1.0 else logits.float() / temperature


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(target) from logits: (N, V), (N,) -> (N,).

    Logits are divided by the sampling temperature, so that the policy PPO optimises is the
    distribution the answers were sampled from.
    """
    logits = tempered(logits, temperature)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class _TokenLogProb(torch.autograd.Function):
    """log π(target) and the (non-differentiable) entropy from one log-softmax, with the gradient
    written directly: d log p_t / d logits = onehot(t) − softmax. Autograd's gather + log-softmax
    backward would zero-fill an (N, V) tensor, scatter into it, then re-exponentiate the saved
    log-probs; this saves the softmax the entropy needs anyway and makes one pass."""

    @staticmethod
    def forward(ctx, logits, targets):
        logp_all = torch.log_softmax(logits, dim=-1)
        probs = logp_all.exp()
        entropy = -(probs * logp_all).sum(-1)
        ctx.save_for_backward(probs, targets)
        ctx.mark_non_differentiable(entropy)
        return logp_all.gather(-1, targets[:, None]).squeeze(-1), entropy

    @staticmethod
    def backward(ctx, grad, _grad_entropy):
        probs, targets = ctx.saved_tensors
        out = probs.mul_(-grad[:, None])  # probs is not needed again: reuse its memory
        out[torch.arange(len(targets), device=out.device), targets] += grad
        return out, None


def logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(target), entropy of π) from one log-softmax: (N, V), (N,) -> (N,), (N,).

    The update needs both on the same logits; the log-probs carry gradients, the entropy (logged,
    as trl does) does not.
    """
    return _TokenLogProb.apply(tempered(logits, temperature), targets)


def scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Response-token values (N,) back into the (B, T) layout of `mask` (zeros elsewhere)."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    out[mask.bool()] = values
    return out


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last response token: (B, T) -> (B,)."""
    T = mask.shape[1]
    return T - 1 - mask.flip(-1).argmax(-1)


def shaped_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, T) and KL estimates (B, T) for R(g | p) = R~c(g | p) − β·KL (§3.2.3).

    Every response token pays −β·(log π_θ − log π_0); the whitened score R~c (B,) is added at the
    last response token, where the answer is complete. Prompt and padding columns are 0.
    """
    kl = kl_penalty(logprobs, ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last_positions(mask)] += scores.to(rewards.dtype)
    return rewards, kl


def global_whiten(x: torch.Tensor, d: Dist, eps: float = 1e-8) -> torch.Tensor:
    """`losses.whiten` with the mean and (population) variance over every rank's entries.

    Advantages are whitened over all response tokens of the global batch (Stiennon et al.), so a
    rank's share is whitened with the statistics of the whole batch.
    """
    stats = torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(x.numel()), device=x.device)]).double()
    total, sq, n = all_reduce_sum(stats.to(d.device) if d.device.type == "cuda" else stats.cpu(), d).tolist()
    mean = total / max(n, 1)
    var = max(sq / max(n, 1) - mean * mean, 0.0)
    return (x - mean) * (var + eps) ** -0.5
