"""PPO on top of the rejection-sampling model (Llama 2 §3.2.3; the recipe of Stiennon et al. 2020).

    llama2 rlhf ppo --config configs/rlhf/ppo_tiny.yaml policy=runs/rs/final [key=value ...] [--resume]
    torchrun --nproc_per_node 8 -m llama2 rlhf ppo --config configs/rlhf/ppo_7B.yaml policy=...

Objective: max E_{p~D, g~π}[R(g | p)] with R(g | p) = R~c(g | p) − β·KL(π_θ(g | p) ‖ π_0(g | p)), where
Rc = Rs if the prompt is a safety prompt or Rs < 0.15 else Rh, and R~c = WHITEN(LOGIT(Rc)).
Each iteration: sample one answer per prompt of the batch from π_θ (512 prompts in the paper),
score it with the frozen reward models, compute per-token rewards (−β·KL on every token, R~c at
the last), GAE advantages with the value model, then ONE pass over the batch in mini-batches of 64
with one gradient step each on the clipped PPO objective (clip 0.2) and the clipped value loss.
AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1, gradient clipping 1.0, constant lr 1e-6;
β = 0.01 (7B/13B) or 0.005 (34B/70B); 200-400 iterations, early stopping on held-out prompts.

Models: the policy π_θ (trained) and the reference π_0 (frozen) both start from `policy`; the value
model is a scalar-head transformer initialised from a reward model; the helpfulness and safety
reward models are frozen (a checkpoint, `grader` for the built-in world's graders as an oracle,
or `module:attr` naming a scorer object of your own). Under FSDP, generation runs on full weights
consolidated once per iteration and freed afterwards (the paper's fix for a ~20x slowdown), each
rank sampling its share of the prompts. The result loads in `llama2 chat`.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from llama2.chat_format import ChatFormat
from llama2.checkpoint import build_model, read_checkpoint, save_native
from llama2.checkpoint_base import CheckpointError
from llama2.config import ConfigError, save_config
from llama2.cpu_kernels import Ragged
from llama2.distributed import Dist, all_reduce_sum, full_state_dict, setup, teardown
from llama2.formats import AXES, read_records
from llama2.gated_reward import GatedReward, check_reward_axes, load_gated_reward, prompt_axis
from llama2.generation import Decoder, SamplingParams
from llama2.losses import gae, logit, ppo_policy_loss, value_loss, whiten
from llama2.model import ModelArgs
from llama2.recipes.common import config_dict, kill_hook, place_model, recipe_cli, resume_latest
from llama2.rollout import (PPOBatch, Rollout, action_positions, consolidated_policy, generation_chunks, global_whiten,
                            iteration_prompts, logprobs_and_entropy, pack_rollouts, pad_rollouts, sample_rollouts,
                            scatter, shaped_rewards, token_logprobs)
from llama2.train import (Checkpointer, LossScaler, MetricsLogger, OptimConfig, autocast, build_optimizer,
                          clip_grad_norm, resolve_dtype, seed_everything)


def ppo_optim() -> OptimConfig:
    # §3.2.3: AdamW β1 0.9, β2 0.95, eps 1e-5, weight decay 0.1, clipping 1.0, constant lr 1e-6.
    return OptimConfig(lr=1e-6, schedule="constant", warmup_steps=0)


@dataclass
class PPOConfig:
    out_dir: str = "runs/ppo"
    policy: str = ""  # the model to improve: the latest rejection-sampling checkpoint (§3.2.3); also π_0
    helpfulness_rm: str = "grader"  # Rh: a reward model checkpoint | grader | module:attr
    safety_rm: str = "grader"  # Rs: likewise
    safety_threshold: float = 0.15  # Rc = Rs when Rs < 0.15 (precision 0.89, recall 0.55 in the paper)
    # Which prompts PPO trains and early-stops on, by the reward model that judges them (§3.2.3:
    # all): `safety` = safety prompts, `helpfulness` = the others (as in rejection sampling).
    reward_axes: list[str] = field(default_factory=lambda: list(AXES))
    value_model: str = ""  # scalar-head checkpoint; "" = the helpfulness reward model (or, with a
    #                        non-checkpoint reward, the policy's weights under a new zero head)
    prompts: list[str] = field(default_factory=list)  # prompt files (JSONL/Parquet `prompts` records)
    eval_prompts: list[str] = field(default_factory=list)  # held-out prompts for early stopping
    eval_size: int = 256  # held-out prompts scored per evaluation
    chat_format: str = "auto"  # auto | llama2 | template (as in SFT)
    batch_size: int = 512  # prompts (= rollouts) per PPO iteration (§3.2.3)
    mini_batch_size: int = 64  # rollouts per gradient step, all ranks together; one pass (§3.2.3)
    micro_batch_size: int = 8  # rollouts per rank per forward/backward (memory only: same update)
    forward_batch_size: int = 0  # rollouts per rank per no-grad pass (reference log-probs, values) before
    #                              the updates; 0 = micro_batch_size. These passes keep no activations,
    #                              so they can take more at once (trl's local_rollout_forward_batch_size)
    generation_batch_size: int = 64  # prompts sampled together (one seed per chunk)
    max_prompt_tokens: int = 1024  # longer prompts are skipped (and counted)
    max_new_tokens: int = 512  # answer length cap
    temperature: float = 1.0  # sampling temperature; log-probs use the same (the policy is what is sampled)
    kl_coef: float = 0.01  # β: 0.01 for 7B/13B, 0.005 for 34B/70B (§3.2.3)
    clip: float = 0.2  # PPO clip ε (§3.2.3)
    value_clip: float = 0.2  # clip of the value update around the old value (Stiennon et al.)
    gamma: float = 1.0  # no discount within an answer (Stiennon et al.)
    lam: float = 0.95  # GAE λ (Stiennon et al.)
    iterations: int = 400  # §3.2.3: 200-400 iterations
    eval_every: int = 25  # iterations between held-out evaluations (0 = never)
    patience: int = 4  # stop after this many evaluations without a new best held-out reward (0 = never)
    optim: OptimConfig = field(default_factory=ppo_optim)  # the policy's AdamW
    value_optim: OptimConfig = field(default_factory=ppo_optim)  # the value model's (the paper gives one setting)
    reward_batch_size: int = 32  # answers per reward-model forward
    dtype: str = "auto"
    activation_checkpointing: bool = False
    ckpt_every: int = 10  # iterations between checkpoints
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"


# ----------------------------------------------------------------------------- setup helpers


def load_prompts(paths: list[str], fmt, max_tokens: int, what: str,
                 axes: list[str] | None = None) -> tuple[list[dict], list[list[int]], int]:
    """Prompt records (those whose `prompt_axis` is in `axes`, if given), their ids in the chat
    format, and how many were too long (skipped, counted)."""
    records, ids, skipped = [], [], 0
    for p in paths:
        for r in read_records(p, "prompts"):
            if axes is not None and prompt_axis(r) not in axes:
                continue
            x = fmt.prompt_ids(r["messages"])
            if len(x) > max_tokens:
                skipped += 1
                continue
            records.append(r)
            ids.append(x)
    if not records:
        raise ConfigError(f"{what}: no prompt of at most max_prompt_tokens={max_tokens} tokens"
                          + (f" for reward_axes {axes}" if axes is not None else "") + f" in {paths}")
    return records, ids, skipped


def value_init(cfg: PPOConfig) -> tuple[ModelArgs, dict, str]:
    """(args, weights, source) of the value model: a reward model's, or the policy's under a zero head."""
    path = cfg.value_model
    if not path and cfg.helpfulness_rm != "grader" and Path(cfg.helpfulness_rm).exists():
        path = cfg.helpfulness_rm
    ck = read_checkpoint(path or cfg.policy)
    if ck.args.head == "scalar":
        return ck.args, ck.state, ck.source
    # A zero head starts every value at 0 (the mean of the whitened score); the trunk is the policy's.
    args = ModelArgs.from_dict({**ck.args.to_dict(), "head": "scalar", "tie_embeddings": False})
    state = {k: v for k, v in ck.state.items() if k != "output.weight"}
    state["output.weight"] = torch.zeros(1, args.dim, dtype=state["tok_embeddings.weight"].dtype)
    return args, state, f"{ck.source} (new scalar head)"


def gather_objects(items: list, d: Dist) -> list:
    """Every rank's list, concatenated in rank order (rollouts are small: token ids and floats)."""
    if not d.enabled:
        return list(items)
    out: list = [None] * d.world_size
    torch.distributed.all_gather_object(out, items)
    return [x for part in out for x in part]


def generate(policy, tokenizer, fmt, prompts: list[list[int]], d: Dist, dtype, cfg: PPOConfig, iteration: int,
             seed: int) -> list[Rollout]:
    """This rank's rollouts for its share of `prompts`, sampled from consolidated full weights."""
    model = consolidated_policy(policy, d, dtype)
    decoder = Decoder(model, tokenizer)
    params = SamplingParams.for_chat(fmt, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                     top_p=1.0, top_k=0)
    chunks = generation_chunks([len(p) for p in prompts], cfg.generation_batch_size, d)
    rollouts = sample_rollouts(decoder, prompts, chunks, params, seed, iteration)
    del decoder, model  # free the consolidated copy before training resumes
    policy.train()  # Decoder put it in eval mode (no dropout here, but activation checkpointing cares)
    return rollouts


class Scored(NamedTuple):
    """A rollout and its rewards: Rh, Rs, Rc (probabilities) and whether Rc took the safety score."""

    rollout: Rollout
    helpfulness: float
    safety: float
    gated: float
    used_safety: bool


def score(reward: GatedReward, records: list[dict], rollouts: list[Rollout], d: Dist) -> dict[int, Scored]:
    """Score this rank's rollouts, then share everything: {batch position: Scored}."""
    s = reward([records[r.index] for r in rollouts], [r.text for r in rollouts]) if rollouts else None
    mine = [Scored(r, float(s.helpfulness[j]), float(s.safety[j]), float(s.gated[j]), bool(s.used_safety[j]))
            for j, r in enumerate(rollouts)]
    return {item.rollout.index: item for item in gather_objects(mine, d)}


def minibatch_rows(batch: int, mini: int, iteration: int, seed: int, d: Dist) -> list[list[int]]:
    """Batch positions this rank trains on in each mini-batch: a fresh shuffle per iteration, each
    mini-batch split evenly across ranks (so the global mini-batch does not depend on world size)."""
    order = np.random.default_rng((seed, iteration, 1)).permutation(batch).tolist()
    per_rank = mini // d.world_size
    return [order[s + d.rank * per_rank: s + (d.rank + 1) * per_rank] for s in range(0, batch, mini)]


def rollout_length(scored: dict, i: int) -> int:
    return len(scored[i].rollout.prompt) + len(scored[i].rollout.response)


@torch.no_grad()
def prepare_batches(reference, value_model, scored: dict, whitened: torch.Tensor, rows: list[list[int]],
                    cfg: PPOConfig, d: Dist, dtype) -> tuple[list[list[PPOBatch]], dict]:
    """Reference log-probs, values, shaped rewards and GAE for this rank's rows.

    Computed for the whole batch before the first update: the first mini-batch's step changes π_θ,
    and every ratio must be against the policy that sampled (θ_old), whose log-probs the rollouts
    carry from generation. These passes need no mini-batch structure, so rows go through them
    sorted by length (attention's padded copy stays small); the model sees them unpadded.
    """
    stats = torch.zeros(3, dtype=torch.float64)  # Σ KL per sequence, tokens, sequences
    per_row = {}  # batch position -> (old log-probs, values, advantages, returns), each (n_i,)
    mine = sorted((i for mb in rows for i in mb), key=lambda i: (rollout_length(scored, i), i))
    step = cfg.forward_batch_size or cfg.micro_batch_size
    for s in range(0, len(mine), step):
        part = mine[s: s + step]
        rolls = [scored[i].rollout for i in part]
        tokens, rmask, lengths = pack_rollouts(rolls)  # the model passes: one unpadded row
        tokens, rmask = tokens.to(d.device), rmask.to(d.device)
        mask = pad_rollouts(rolls)[1].to(d.device)  # GAE: one row per rollout (same token order)
        sel, rsel = mask.bool(), rmask.bool()
        targets = tokens[:, 1:][rsel]
        with autocast(d.device, dtype):
            # outputs at the N action positions only (`keep`): the head and the last block's rest run there
            ragged, keep = Ragged(lengths, d.device), action_positions(rmask)
            ref_logits = reference(tokens, lengths=ragged, keep=keep)  # (N, V)
            values = value_model(tokens, lengths=ragged, keep=keep)[:, 0].float()  # V before each token
        logp = torch.tensor([x for i in part for x in scored[i].rollout.logprobs], device=d.device)  # θ_old
        ref_logp = token_logprobs(ref_logits, targets, cfg.temperature)
        del ref_logits
        rewards, kl = shaped_rewards(whitened[part].to(d.device), scatter(logp, mask), scatter(ref_logp, mask), mask,
                                     cfg.kl_coef)
        adv, ret = gae(rewards, scatter(values, mask), mask, cfg.gamma, cfg.lam)
        n = mask.sum(1).long().tolist()
        for i, *row in zip(part, logp.split(n), values.split(n), adv[sel].split(n), ret[sel].split(n)):
            per_row[i] = row
        stats += torch.tensor([kl.sum().item(), len(logp), len(part)], dtype=torch.float64)
    # Advantages are whitened over every response token of the global batch (Stiennon et al.).
    order = list(per_row)
    white = global_whiten(torch.cat([per_row[i][2] for i in order]), d).split([len(per_row[i][2]) for i in order])
    for i, a in zip(order, white):
        per_row[i][2] = a

    batches = []
    for mb in rows:
        mb = sorted(mb, key=lambda i: (rollout_length(scored, i), i))  # similar lengths share a micro-batch
        batches.append([])
        for s in range(0, len(mb), cfg.micro_batch_size):
            part = mb[s: s + cfg.micro_batch_size]
            tokens, mask, lengths = pack_rollouts([scored[i].rollout for i in part])
            cat = [torch.cat([per_row[i][k] for i in part]) for k in range(4)]
            batches[-1].append(PPOBatch(tokens.to(d.device), mask.to(d.device), *cat, lengths))
    kl_sum, n_tok, n_seq = all_reduce_sum(stats, d).tolist()
    return batches, {"kl": kl_sum / n_seq}


EVAL_STREAM = 2**31  # the "iteration" whose seeds evaluation samples with: no training iteration uses it


@torch.no_grad()
def held_out_reward(policy, tokenizer, fmt, reward, records, prompts, d, dtype, cfg: PPOConfig) -> float:
    """Mean Rc of one sampled answer per held-out prompt (fixed seed: evaluations are comparable)."""
    rollouts = generate(policy, tokenizer, fmt, prompts, d, dtype, cfg, EVAL_STREAM, cfg.seed)
    scored = score(reward, records, rollouts, d)
    return sum(v.gated for v in scored.values()) / len(scored)


def save_policy(policy, d: Dist, path: Path, args, tokenizer, meta: dict) -> None:
    state = full_state_dict(policy, d)  # collective under FSDP: every rank calls it
    if d.is_main:
        save_native(path, state, args, tokenizer, meta=meta)


# ----------------------------------------------------------------------------- the recipe


def main(cfg: PPOConfig, resume: bool = False) -> int:
    if not cfg.policy:
        raise ConfigError("policy: the checkpoint to improve is required (the rejection-sampling model)")
    if not cfg.prompts:
        raise ConfigError("prompts: at least one prompt file is required")
    check_reward_axes(cfg.reward_axes)
    d = setup(cfg.device)
    if cfg.mini_batch_size % d.world_size or cfg.batch_size % cfg.mini_batch_size:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of mini_batch_size={cfg.mini_batch_size}, "
                          f"itself a multiple of the {d.world_size} ranks")
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    dtype = resolve_dtype(cfg.dtype, d.device)

    # ---- models: policy π_θ and reference π_0 from the same checkpoint, the value model, the rewards
    ck = read_checkpoint(cfg.policy)
    tokenizer = ck.tokenizer()
    if tokenizer is None:
        raise ConfigError(f"policy: {cfg.policy} has no tokenizer")
    if ck.args.head != "lm":
        raise CheckpointError(f"policy: {cfg.policy} has a {ck.args.head!r} head, not a language model")
    args = ck.args
    if cfg.max_prompt_tokens + cfg.max_new_tokens > args.max_seq_len:
        raise ConfigError(f"max_prompt_tokens + max_new_tokens = {cfg.max_prompt_tokens + cfg.max_new_tokens} "
                          f"exceeds the policy's context of {args.max_seq_len}")
    fmt = ChatFormat(tokenizer, cfg.chat_format)
    policy = place_model(build_model(args, ck.state, ck.source).train(), d, dtype, cfg.activation_checkpointing)
    # π_0 gets its own copy: build_model assigns the given tensors, and the policy's are updated in place.
    ref_state = {k: v.clone() for k, v in ck.state.items()}
    reference = place_model(build_model(args, ref_state, ck.source).requires_grad_(False), d, dtype)
    del ck, ref_state
    v_args, v_state, v_source = value_init(cfg)
    value_model = place_model(build_model(v_args, v_state, v_source).train(), d, dtype, cfg.activation_checkpointing)
    del v_state
    reward = load_gated_reward(cfg.helpfulness_rm, cfg.safety_rm, cfg.safety_threshold, cfg.reward_batch_size,
                               d.device, dtype, where="helpfulness_rm/safety_rm")

    # ---- prompts
    records, prompts, skipped = load_prompts(cfg.prompts, fmt, cfg.max_prompt_tokens, "prompts", cfg.reward_axes)
    if cfg.batch_size > len(prompts):
        raise ConfigError(f"batch_size={cfg.batch_size} but only {len(prompts)} training prompts")
    eval_records, eval_prompts = [], []
    if cfg.eval_prompts and cfg.eval_every:
        eval_records, eval_prompts, _ = load_prompts(cfg.eval_prompts, fmt, cfg.max_prompt_tokens, "eval_prompts",
                                                     cfg.reward_axes)
        eval_records, eval_prompts = eval_records[: cfg.eval_size], eval_prompts[: cfg.eval_size]

    # ---- optimizers, checkpoints (policy + value + both optimizers; RNG per rank), resume
    opt_policy, opt_value = build_optimizer(policy, cfg.optim), build_optimizer(value_model, cfg.value_optim)
    for opt, oc in ((opt_policy, cfg.optim), (opt_value, cfg.value_optim)):
        for g in opt.param_groups:
            g["lr"] = oc.lr  # constant schedule (§3.2.3)
    trained = torch.nn.ModuleDict({"policy": policy, "value": value_model})  # one DCP state for both
    scaler = LossScaler(dtype, cfg.optim.loss_scale)  # float16 only: dynamic loss scaling (one scale for both losses)
    ckpt = Checkpointer(out, d, keep=cfg.keep_checkpoints)
    start, best, bad_evals = 0, -math.inf, 0
    if resume:
        saved = resume_latest(ckpt, trained, [opt_policy, opt_value], cfg,
                              ["policy", "prompts", "batch_size", "mini_batch_size", "seed", "kl_coef",
                               "reward_axes"])
        start, best, bad_evals = saved["step"], saved["best_eval"], saved["bad_evals"]
        scaler.load_state_dict(saved.get("scaler"))
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    log = MetricsLogger(out, d, cfg.iterations, "ppo", initial=start)
    if start == 0:
        axes = "" if set(cfg.reward_axes) == set(AXES) else f" of reward_axes {cfg.reward_axes}"
        log.write(f"[ppo] {len(prompts)} training prompts{axes} ({skipped} too long, skipped), {len(eval_prompts)} held out; "
                  f"{cfg.iterations} iterations of {cfg.batch_size} rollouts, mini-batches of {cfg.mini_batch_size}; "
                  f"{d.world_size} rank(s)")
        if eval_prompts:
            best = held_out_reward(policy, tokenizer, fmt, reward, eval_records, eval_prompts, d, dtype, cfg)
            log.log(0, {"eval_reward": best}, advance=0)
            save_policy(policy, d, out / "best", args, tokenizer, {"stage": "ppo", "iteration": 0})

    it = start - 1  # the last iteration run (for the export's metadata when nothing is left to run)
    for it in range(start, cfg.iterations):
        # ---- 1. generation: one answer per prompt from π_θ, each rank its share of the prompts
        t0 = time.perf_counter()
        batch_idx = iteration_prompts(len(prompts), cfg.batch_size, it, cfg.seed)
        rollouts = generate(policy, tokenizer, fmt, [prompts[i] for i in batch_idx], d, dtype, cfg, it, cfg.seed)
        t1 = time.perf_counter()

        # ---- 2. scoring: Rc from the gated reward models, R~c = WHITEN(LOGIT(Rc)) over the whole batch,
        #         then the no-grad passes (π_θold, π_0, V), shaped rewards and GAE for this rank's rows
        scored = score(reward, [records[i] for i in batch_idx], rollouts, d)
        rh, rs, rc, gated = (torch.tensor([float(getattr(scored[i], k)) for i in range(cfg.batch_size)])
                             for k in ("helpfulness", "safety", "gated", "used_safety"))
        whitened = whiten(logit(rc))
        rows = minibatch_rows(cfg.batch_size, cfg.mini_batch_size, it, cfg.seed, d)
        batches, pstats = prepare_batches(reference, value_model, scored, whitened, rows, cfg, d, dtype)
        t2 = time.perf_counter()

        # ---- 3. training: one pass, one gradient step per mini-batch on the clipped objectives
        sums = torch.zeros(4, dtype=torch.float64)  # policy loss, value loss, clip fraction, entropy (token-weighted)
        grad_norms, skipped = [], 0
        for micro in batches:
            # Each token counts once in its mini-batch's mean, however the mini-batch is split into
            # micro-batches and ranks (FSDP averages gradients over ranks, hence × world size).
            n_tokens = all_reduce_sum(torch.tensor(sum(b.mask.sum().item() for b in micro), dtype=torch.float64), d)
            for b in micro:
                weight = b.mask.sum().item() / n_tokens.item() * d.world_size
                with autocast(d.device, dtype):
                    ragged, keep = Ragged(b.lengths, d.device), action_positions(b.mask)
                    logits = policy(b.tokens, lengths=ragged, keep=keep)  # (N, V) at the response positions
                    values = value_model(b.tokens, lengths=ragged, keep=keep)[:, 0].float()  # (N,)
                # entropy of π_θ on the response tokens, read off the update's own forward (as trl does)
                logp, entropy = logprobs_and_entropy(logits, b.tokens[:, 1:][b.mask.bool()], cfg.temperature)
                every = torch.ones_like(logp)  # PPOBatch holds response tokens only: all count
                pg_loss, clip_frac = ppo_policy_loss(logp, b.old_logprobs, b.advantages, every, cfg.clip)
                v_loss = value_loss(values, b.old_values, b.returns, every, cfg.value_clip)
                scaler.scaled((pg_loss + v_loss) * weight).backward()  # separate models: each gets only its own loss
                sums += torch.tensor([pg_loss.item(), v_loss.item(), clip_frac.item(), entropy.mean().item()],
                                     dtype=torch.float64) * weight / d.world_size
            scaler.unscale_(policy, value_model)
            norms = (clip_grad_norm(policy, cfg.optim.grad_clip), clip_grad_norm(value_model, cfg.value_optim.grad_clip))
            if scaler.step(sum(norms), opt_policy, opt_value):  # fp16: an overflowed mini-batch is skipped
                grad_norms.append(norms)
            else:
                skipped += 1
            opt_policy.zero_grad(set_to_none=True)
            opt_value.zero_grad(set_to_none=True)
        pg_sum, v_sum, clip_sum, ent_sum = (all_reduce_sum(sums, d) / len(batches)).tolist()
        t3 = time.perf_counter()

        # ---- log, evaluate, checkpoint
        lengths = torch.tensor([float(len(scored[i].rollout.response)) for i in range(cfg.batch_size)])
        metrics = {
            "reward": rc.mean().item(),  # Rc, the gated score (probability scale)
            "reward_logit": logit(rc).mean().item(),  # before whitening (R~c itself has mean 0, std 1)
            "objective": (whitened.mean() - cfg.kl_coef * pstats["kl"]).item(),  # R(g|p) = R~c − β·KL
            "reward_helpfulness": rh.mean().item(), "reward_safety": rs.mean().item(),
            "gated_by_safety": gated.mean().item(), "kl": pstats["kl"], "entropy": ent_sum,
            "clip_frac": clip_sum, "policy_loss": pg_sum, "value_loss": v_sum,
            "grad_norm": max((g[0] for g in grad_norms), default=0.0),
            "value_grad_norm": max((g[1] for g in grad_norms), default=0.0),
            "response_len": lengths.mean().item(),
            "time_generation": t1 - t0, "time_scoring": t2 - t1, "time_training": t3 - t2,
        }
        metrics.update(scaler.metrics(skipped))
        if not all(math.isfinite(v) for v in metrics.values()):
            log.close()
            raise FloatingPointError(f"iteration {it + 1}: non-finite metrics {metrics}; stopping. "
                                     f"Last good checkpoint: {ckpt.latest() or 'none'}")
        stop = False
        if eval_prompts and ((it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iterations):
            metrics["eval_reward"] = held_out_reward(policy, tokenizer, fmt, reward, eval_records, eval_prompts, d, dtype, cfg)
            if metrics["eval_reward"] > best:
                best, bad_evals = metrics["eval_reward"], 0
                save_policy(policy, d, out / "best", args, tokenizer, {"stage": "ppo", "iteration": it + 1,
                                                                       "eval_reward": best})
            else:
                bad_evals += 1
                stop = bool(cfg.patience) and bad_evals >= cfg.patience
        log.log(it + 1, metrics, show=("reward", "kl", "entropy", "clip_frac", "eval_reward"))
        if cfg.ckpt_every and ((it + 1) % cfg.ckpt_every == 0 or it + 1 == cfg.iterations or stop):
            ckpt.save(it + 1, trained, [opt_policy, opt_value],
                      {"config": config_dict(cfg), "best_eval": best, "bad_evals": bad_evals,
                       "prompts_seen": (it + 1) * cfg.batch_size, "scaler": scaler.state_dict()})
        kill_hook(it + 1)
        if stop:
            log.write(f"[ppo] early stop at iteration {it + 1}: held-out reward has not improved on {best:.4f} "
                      f"for {bad_evals} evaluations")
            break
    log.close()

    # ---- export: the best policy on held-out prompts when evaluated, else the last one
    final = out / "final"
    if eval_prompts and (out / "best").is_dir():
        if d.is_main:
            best_ck = read_checkpoint(out / "best")
            save_native(final, best_ck.state, args, tokenizer, meta={**best_ck.meta, "config": config_dict(cfg)})
    else:
        save_policy(policy, d, final, args, tokenizer, {"stage": "ppo", "iteration": it + 1,
                                                        "config": config_dict(cfg)})
    if d.is_main:
        print(f"[ppo] done: {final}  (chat with it: llama2 chat --model {final})", flush=True)
    teardown()
    return 0


def cli(argv: list[str]) -> int:
    return recipe_cli(argv, PPOConfig, main, "llama2 rlhf ppo", __doc__.split("\n\n")[0])


if __name__ == "__main__":  # `python -m llama2.recipes.ppo ...` (also under torchrun); usually `llama2 rlhf ppo`
    sys.exit(cli(sys.argv[1:]))
