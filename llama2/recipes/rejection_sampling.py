"""Rejection-sampling fine-tuning (Llama 2 §3.2.3): sample K answers per prompt from the latest
model, keep the one the safety-gated reward scores highest, and fine-tune on the kept answers
like SFT.

    llama2 rlhf rejection-sampling --config configs/rlhf/rejection_sampling_tiny.yaml [key=value ...] [--resume]

The prompts are those of `split` whose reward model the run trusts (`reward_axes`: safety prompts,
helpfulness prompts, or both), then a seeded subset of `max_prompts`. Each iteration k (RUN = out_dir):
  1. optionally re-tune the sampling temperature with a best-of-N sweep (Figure 8):
     RUN/iter-k/best_of_n/ (JSON and plots);
  2. sample K answers per prompt at temperature T, in chunks of prompts written atomically to
     RUN/iter-k/samples/chunk-NNNNN.json, each scored with Rc (§3.2.3: the safety RM on safety
     prompts or when Rs < 0.15, else the helpfulness RM; or the world's graders as an oracle).
     A killed run resamples nothing that was written;
  3. keep the best answer per prompt: RUN/pool/iter-k.jsonl (prompt id, messages, response,
     reward, iteration) — optionally only where it clearly beats the prompt's median sample
     (`min_gap`);
  4. choose the fine-tuning set: `pool: all` keeps, per prompt, the best answer of every
     iteration so far (and of `pool_from`, earlier runs' pools re-scored with this run's reward)
     — the paper's choice from RLHF-V3 on, after selecting only from the last iteration's "bag"
     caused regressions; `pool: last` keeps only this iteration's;
  5. fine-tune with the SFT recipe (assistant-only loss) on RUN/iter-k/selected.jsonl:
     RUN/iter-k/sft/final; RUN/final points at the last one.
Stats per iteration (reward of the samples and of the selection, share gated by safety, time
split) go to RUN/iter-k/stats.json and RUN/stats.json.

Which checkpoint is fine-tuned: the paper samples "from the most recent model" and then
"fine-tune[s] our model on the new set of ranked samples", applying PPO later "on top of the
resulted Rejection Sampling checkpoint" — a chain of checkpoints. So by default (`init_from:
policy`) the model that produced the samples is the one fine-tuned. `init_from: initial` restarts
every iteration from `policy` on the selection (with `pool: all`, a growing set), which drifts
less at the cost of relearning it each time.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from llama2 import progress_bars
from llama2.chat_format import SPECIAL_TAGS, ChatFormat
from llama2.checkpoint import detect_format, read_checkpoint
from llama2.config import ConfigError
from llama2.dialog_data import DialogLoader, tokenize_dialogs
from llama2.formats import AXES, read_records
from llama2.gated_reward import check_reward_axes, load_gated_reward
from llama2.inference import load_for_inference
from llama2.recipes.best_of_n import best_of_n, load_prompt_records, plot_best_of_n, write_result
from llama2.recipes.common import (kill_hook, link_final, open_run, recipe_cli, write_atomic,
                                   write_jsonl_atomic)
from llama2.recipes.sft import SFTConfig, load_dialogs
from llama2.recipes.sft import main as sft_main
from llama2.sampling import DialogSampler
from llama2.train import derive_seed


def rs_sft() -> SFTConfig:
    # §3.2.3: the selected answers are fine-tuned on "similar to SFT", so the SFT recipe's paper
    # defaults apply (lr 2e-5, cosine, batch 64, 2 epochs); model, train_data and out_dir are
    # filled in per iteration.
    return SFTConfig(out_dir="")


@dataclass
class RejectionSamplingConfig:
    out_dir: str = "runs/rejection_sampling"
    policy: str = ""  # the model to improve (SFT or the previous RLHF version), any format; required
    prompts: list[str] = field(default_factory=list)  # prompt files (JSONL/Parquet, kind `prompts`)
    split: str = "train"  # only prompts of this split
    max_prompts: int = 0  # 0 = all; else a seeded random subset, the same in every iteration
    helpfulness_rm: str = "grader"  # helpfulness reward-model checkpoint, or `grader` (the world's oracle)
    safety_rm: str = "grader"  # safety reward-model checkpoint, `grader`, or "" to use the helpfulness one alone
    safety_threshold: float = 0.15  # §3.2.3: Rc = Rs when the prompt is a safety one or Rs < 0.15
    iterations: int = 1  # rejection-sampling rounds, each sampling from the previous round's model
    k: int = 4  # answers sampled per prompt (the paper explores N up to 100, Figure 7)
    temperature: float = 1.0  # sampling temperature (paper: best T moves to 1.2-1.3 as RLHF proceeds)
    top_p: float = 1.0  # nucleus sampling; 1.0 keeps the full distribution the reward ranks
    max_new_tokens: int = 128
    pool: Literal["all", "last"] = "all"  # §3.2.3: `all` = best of every iteration (from RLHF-V3 on)
    pool_from: list[str] = field(default_factory=list)  # earlier runs' pool files joining `all` (re-scored)
    min_reward: float | None = None  # drop selected answers scoring below this (paper: none, keep every best)
    # Keep a prompt's best answer only if its reward beats the median of the prompt's K samples by
    # at least this much (paper: none). Where the reward model cannot tell the answers apart its
    # pick is a random sample, and fine-tuning on random samples moves the model away from its
    # better near-greedy answers; where it clearly prefers one, the pick is worth learning.
    min_gap: float | None = None
    # A sample cut off by max_new_tokens is not an answer: as a fine-tuning target (which ends with
    # the end-of-turn token) it would teach the model to stop mid-sentence. Drop such samples from
    # the selection (they still count in the prompt's median and the stats); the paper's answers end
    # on their own (its limits are far above its answers' lengths).
    drop_truncated: bool = True
    # Which prompts are sampled and fine-tuned on, by the reward model that judges them (§3.2.3:
    # all): `safety` = the safety prompts (Rc = Rs), `helpfulness` = the others (Rc = Rh, or Rs
    # below the gate's threshold). Leave out the helpfulness ones when the helpfulness RM is at
    # chance on the policy's own answers (its accuracy on the latest batch's held-out pairs,
    # printed by the pipeline): its picks are random samples, and the gate alone would only ever
    # pick the answers the safety RM likes best there — refusals of prompts that deserve answers.
    reward_axes: list[str] = field(default_factory=lambda: list(AXES))
    # Replay (not in the paper's rejection sampling; its SFT and safety data held such examples):
    # `replay_examples` dialogs drawn (seeded, per iteration) from the SFT files in `replay`, only
    # those whose `task` is in `replay_tasks` if given, join each iteration's fine-tuning set. With
    # safety prompts alone the targets are refusals, and the model learns to refuse borderline
    # prompts too; helpful answers to borderline prompts (the tiny preset: 60 of them) hold it back.
    replay: list[str] = field(default_factory=list)
    replay_examples: int = 0
    replay_tasks: list[str] = field(default_factory=list)
    init_from: Literal["policy", "initial"] = "policy"  # fine-tune the sampling model, or `policy` every time
    retune_temperature: bool = True  # best-of-N sweep before each iteration's sampling (Figure 8: T re-tuned every iteration)
    temperatures: list[float] = field(default_factory=lambda: [0.6, 0.8, 1.0, 1.2, 1.4])  # the sweep's T
    tune_prompts: int = 32  # prompts in the sweep (a seeded subset)
    tune_n: int = 16  # samples per prompt in the sweep (>= k; the paper's figures go to 100)
    chunk_prompts: int = 64  # prompts per atomically written sampling chunk (the unit of resume)
    sample_batch_size: int = 64  # sequences decoded together
    reward_batch_size: int = 32  # sequences per reward-model forward
    sft: SFTConfig = field(default_factory=rs_sft)  # the fine-tuning step (llama2 sft's options;
    #                                                 sft.chat_format also renders the sampling prompts)
    seed: int = 0
    device: str = "auto"


# ----------------------------------------------------------------------------- helpers


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def score_samples(reward, records: list[dict], texts: list[list[str]]) -> list[dict]:
    """Score every prompt's answers with Rc in one batched call; one row per prompt:
    {prompt_id, samples: [{text, reward, helpfulness, safety, used_safety}]}."""
    flat_records = [r for r, answers in zip(records, texts) for _ in answers]
    flat_texts = [t for answers in texts for t in answers]
    s = reward(flat_records, flat_texts)
    gated, rh, rs, used = s.gated.tolist(), s.helpfulness.tolist(), s.safety.tolist(), s.used_safety.tolist()
    rows, at = [], 0
    for rec, answers in zip(records, texts):
        samples = []
        for text in answers:
            if not torch.isfinite(torch.tensor(gated[at])):
                raise FloatingPointError(f"prompt {rec['id']}: the reward is {gated[at]} (not finite)")
            samples.append({"text": text, "reward": gated[at], "helpfulness": rh[at], "safety": rs[at],
                            "used_safety": bool(used[at])})
            at += 1
        rows.append({"prompt_id": rec["id"], "samples": samples})
    return rows


def usable(text: str, forbidden=SPECIAL_TAGS) -> bool:
    """Can this answer be a training target? Not empty, and no chat-format tag that would forge a turn."""
    return bool(text.strip()) and not any(tag in text for tag in forbidden)


def best_per_prompt(records: list[dict], rows: list[dict], iteration: int, forbidden=SPECIAL_TAGS,
                    drop_truncated: bool = False) -> list[dict]:
    """The highest-Rc usable answer of each prompt (ties: the lowest sample index) as pool entries,
    with `gap`, its reward minus the median reward of all the prompt's samples. Usable: no forged
    turn, not empty and, with `drop_truncated`, not cut off by the length limit (`finish` "length").
    A prompt whose answers are all unusable gets none."""
    by_id = {r["id"]: r for r in records}
    pool = []
    for row in rows:
        rec = by_id[row["prompt_id"]]
        ranked = sorted(range(len(row["samples"])), key=lambda j: (-row["samples"][j]["reward"], j))
        j = next((j for j in ranked if usable(row["samples"][j]["text"], forbidden)
                  and not (drop_truncated and row["samples"][j].get("finish") == "length")), None)
        if j is None:
            continue
        s = row["samples"][j]
        gap = s["reward"] - statistics.median(x["reward"] for x in row["samples"])
        pool.append({"prompt_id": rec["id"], "messages": rec["messages"], "response": s["text"].strip(),
                     "reward": s["reward"], "gap": gap, "helpfulness": s["helpfulness"], "safety": s["safety"],
                     "used_safety": s["used_safety"], "iteration": iteration, "sample": j,
                     "is_safety": bool(rec.get("is_safety", False)), "task": rec.get("task")})
    return pool


def clear_preferences(pool: list[dict], min_gap: float | None) -> list[dict]:
    """The entries whose answer beats its prompt's median sample by at least `min_gap` (all if None)."""
    return pool if min_gap is None else [e for e in pool if e["gap"] >= min_gap]


def replay_dialogs(files: list[str], n: int, tasks: list[str], seed: int) -> list[dict]:
    """`n` SFT dialog records drawn from `files` (those whose `task` is in `tasks`, if given),
    seeded; all of them if fewer. Validated like any SFT file (a bad record names file and line)."""
    if n <= 0:
        return []
    pool = [r for p in files for r in read_records(p, "sft") if not tasks or r.get("task") in tasks]
    return pool if len(pool) <= n else random.Random(seed).sample(pool, n)


def select_pool(pools: list[list[dict]], mode: str) -> list[dict]:
    """The fine-tuning set (§3.2.3): per prompt, the highest-reward entry of the last pool (`last`)
    or of all pools (`all`), `pools` ordered oldest first. Ties go to the more recent pool (its
    answer is closer to what the current model writes), then to the lower sample index; the
    result is sorted by prompt id, so input order never matters."""
    if mode not in ("all", "last"):
        raise ValueError(f"pool: expected all or last, got {mode!r}")
    candidates = pools[-1:] if mode == "last" else pools
    best: dict[str, tuple] = {}
    for age, pool in enumerate(candidates):
        for entry in pool:
            rank = (entry["reward"], age, -entry["sample"])
            cur = best.get(entry["prompt_id"])
            if cur is None or rank > cur[0]:
                best[entry["prompt_id"]] = (rank, entry)
    return [best[k][1] for k in sorted(best)]


def fitting_batch(sft: SFTConfig, tokenizer, max_seq_len: int, iteration: int) -> SFTConfig:
    """`sft` with batch_size and micro_batch_size lowered to the packed rows the selected answers
    fill, when that is less than one batch (a short selection, e.g. under min_gap): the SFT recipe
    refuses data that cannot fill one batch."""
    T = min(sft.seq_len, max_seq_len)
    examples = tokenize_dialogs(load_dialogs(sft.train_data), ChatFormat(tokenizer, sft.chat_format), T,
                                sft.last_turn_only, "selected answers: ")
    rows = len(DialogLoader(examples, T, 1, seed=sft.seed, packed=sft.packed).rows(0))
    world = int(os.environ.get("WORLD_SIZE", "1"))  # the SFT step's ranks (torchrun), as llama2.distributed reads them
    if rows >= sft.batch_size:
        return sft
    batch = max(world, rows // world * world)
    say(f"iteration {iteration}: the {len(examples)} selected answers fill {rows} rows of {T} tokens, fewer than "
        f"sft.batch_size={sft.batch_size}: fine-tuning with batches of {batch}")
    return replace(sft, batch_size=batch, micro_batch_size=batch // world)


def fine_tune_on(policy: str, sft: SFTConfig, data: Path, out: Path, what: str) -> Path:
    """Fine-tune `policy` on the SFT dialogs in `data` with the SFT recipe into OUT/sft (resumed from
    its checkpoints when a run was interrupted), as GAtt and context distillation do; OUT/final then
    points at the result. Returns OUT/sft/final."""
    final = out / "sft" / "final"
    if not final.is_dir():  # written atomically at the very end of the SFT recipe
        ck = read_checkpoint(policy)
        sft_cfg = fitting_batch(replace(sft, model=policy, train_data=[str(data)], out_dir=str(out / "sft")),
                                ck.tokenizer(), ck.args.max_seq_len, 1)
        del ck
        resume = any((out / "sft" / "checkpoints").glob("step-*/train_state.json"))
        print(f"[{what}] fine-tuning {policy} on {data}" + (" (resuming)" if resume else ""), file=sys.stderr,
              flush=True)
        sft_main(sft_cfg, resume=resume)
    detect_format(final)
    link_final(out, final)
    return final


def sft_record(entry: dict) -> dict:
    """A selected answer as an SFT dialog record (llama2/formats.py, kind `sft`)."""
    return {"id": f"rs-{entry['prompt_id']}", "split": "train", "source": "rejection_sampling",
            "task": entry.get("task"),
            "messages": entry["messages"] + [{"role": "assistant", "content": entry["response"]}],
            "meta": {"reward": entry["reward"], "iteration": entry["iteration"]}}


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": statistics.fmean(values), "median": statistics.median(values),
            "max": max(values), "min": min(values)}


def rescore(reward, entries: list[dict], records: list[dict]) -> list[dict]:
    """Earlier runs' pool entries scored again with this run's reward: scores of different reward
    models are not comparable, and §3.2.3 scores with "the best reward model accessible". Entries
    for prompts outside this run are dropped."""
    by_id = {r["id"]: r for r in records}
    kept = [e for e in entries if e["prompt_id"] in by_id]
    if not kept:
        return []
    s = reward([by_id[e["prompt_id"]] for e in kept], [e["response"] for e in kept])
    return [{**e, "reward": g, "helpfulness": h, "safety": sa, "used_safety": bool(u), "rescored": True}
            for e, g, h, sa, u in zip(kept, s.gated.tolist(), s.helpfulness.tolist(), s.safety.tolist(),
                                      s.used_safety.tolist())]


def check_config(cfg: RejectionSamplingConfig) -> None:
    """Everything that can be checked before minutes of sampling: paths, ranges, the SFT step."""
    if not cfg.policy:
        raise ConfigError("policy: the checkpoint to improve is required (e.g. policy=runs/sft/final)")
    if not Path(cfg.policy).exists():
        raise ConfigError(f"policy: checkpoint not found: {cfg.policy}")
    if not cfg.prompts:
        raise ConfigError("prompts: at least one prompt file is required (e.g. prompts=[world/prompts/train.jsonl])")
    for key, paths in (("prompts", cfg.prompts), ("pool_from", cfg.pool_from), ("replay", cfg.replay)):
        for p in paths:
            if not Path(p).is_file():
                raise ConfigError(f"{key}: file not found: {p}")
    for key in ("helpfulness_rm", "safety_rm"):
        spec = getattr(cfg, key)
        if spec not in ("", "grader") and not Path(spec).exists():
            raise ConfigError(f"{key}: reward model not found: {spec} (a checkpoint path, or `grader`)")
    if not cfg.helpfulness_rm:
        raise ConfigError("helpfulness_rm: required (a reward-model checkpoint, or `grader`)")
    for key in ("iterations", "k", "max_new_tokens", "chunk_prompts", "sample_batch_size", "reward_batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {getattr(cfg, key)}")
    if cfg.min_gap is not None and cfg.min_gap < 0:
        raise ConfigError(f"min_gap: must be >= 0 (a reward difference) or null, got {cfg.min_gap}")
    check_reward_axes(cfg.reward_axes)
    if cfg.replay_examples < 0 or (cfg.replay_examples and not cfg.replay):
        raise ConfigError(f"replay_examples: {cfg.replay_examples} needs >= 0 and SFT files in replay (got {cfg.replay})")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        raise ConfigError(f"temperature must be >= 0 and top_p in (0, 1], got {cfg.temperature}, {cfg.top_p}")
    if cfg.retune_temperature and (not cfg.temperatures or cfg.tune_n < cfg.k or cfg.tune_prompts < 1):
        raise ConfigError(f"retune_temperature needs temperatures, tune_prompts >= 1 and tune_n >= k "
                          f"(got {cfg.temperatures}, {cfg.tune_prompts}, {cfg.tune_n} < k={cfg.k}?)")
    for key in ("model", "train_data", "out_dir"):
        if getattr(cfg.sft, key):
            raise ConfigError(f"sft.{key}: set by the recipe for each iteration; remove it from the config")
    if cfg.sft.batch_size % cfg.sft.micro_batch_size:
        raise ConfigError(f"sft.batch_size={cfg.sft.batch_size} is not a multiple of sft.micro_batch_size="
                          f"{cfg.sft.micro_batch_size}")


def say(text: str) -> None:
    print(f"[rs] {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the recipe

SWEEP = 2**31  # the "chunk" part of the temperature sweep's seed: no sampling chunk has that index

# What a resumed run may not change: it decides what was sampled and selected. (iterations may
# grow: a finished run continues with more rounds.)
RESUME_KEYS = ["policy", "prompts", "split", "max_prompts", "helpfulness_rm", "safety_rm", "safety_threshold", "k",
               "temperature", "top_p", "max_new_tokens", "pool", "pool_from", "min_reward", "min_gap", "drop_truncated",
               "reward_axes", "replay", "replay_examples", "replay_tasks", "init_from", "retune_temperature", "chunk_prompts", "sft.chat_format", "seed"]


@dataclass
class Selection:
    """What one iteration keeps (steps 3-4): every prompt's best answer, those clearing min_gap, the
    fine-tuning set, and the replayed SFT dialogs that join it."""

    candidates: list[dict]
    best: list[dict]
    selected: list[dict]
    replayed: list[dict]


def tune_temperature(cfg: RejectionSamplingConfig, sampler: DialogSampler, reward, policy: str, it_dir: Path,
                     it: int) -> tuple[float, float]:
    """Step 1: this iteration's temperature (Figure 8) and the seconds its best-of-N sweep took;
    a sweep already written is read back."""
    tune_dir = it_dir / "best_of_n"
    if (tune_dir / "best_of_n.json").is_file():
        tuned = json.loads((tune_dir / "best_of_n.json").read_text())
    else:
        t0 = time.perf_counter()
        # the sweep's prompts are a subset of the training prompts, seeded per iteration
        sweep_seed = derive_seed(cfg.seed, it, SWEEP)
        sweep = load_prompt_records(cfg.prompts, cfg.split, cfg.tune_prompts, sweep_seed, "prompts",
                                    cfg.reward_axes)
        tuned = best_of_n(sampler, reward, sweep, cfg.tune_n, cfg.temperatures, top_p=cfg.top_p,
                          max_new_tokens=cfg.max_new_tokens, seed=sweep_seed, k=cfg.k, log=say)
        tuned["policy"] = policy
        tuned["seconds_total"] = time.perf_counter() - t0
        write_result(tuned, tune_dir)
        plot_best_of_n(tuned, tune_dir)
    say(f"iteration {it}: best-of-{cfg.tune_n} sweep chose T={tuned['chosen']:g} for K={cfg.k}")
    return tuned["chosen"], tuned.get("seconds_total", 0.0)


def sample_chunks(cfg: RejectionSamplingConfig, sampler: DialogSampler, reward, chunks: list[list[dict]],
                  temperature: float, sample_dir: Path, it: int, meta: dict) -> None:
    """Step 2: K answers per prompt, scored with Rc, one atomically written chunk at a time; the
    chunks a killed run wrote are kept (and must have been drawn with the same `meta`)."""
    if (sample_dir / "meta.json").is_file():
        was = json.loads((sample_dir / "meta.json").read_text())
        if was != meta:
            raise ConfigError(f"{sample_dir / 'meta.json'}: samples were drawn with {was}, now {meta}; "
                              f"remove {sample_dir} to resample")
    else:
        write_atomic(sample_dir / "meta.json", json.dumps(meta) + "\n")
    done = [c for c in range(len(chunks)) if (sample_dir / f"chunk-{c:05d}.json").is_file()]
    if len(done) == len(chunks):
        say(f"iteration {it}: all {len(chunks)} chunks already sampled")
    elif done:
        say(f"iteration {it}: {len(done)} of {len(chunks)} chunks already sampled; sampling the rest")
    bar = tqdm(total=len(chunks), initial=len(done), desc=f"[rs] iter {it} sampling", unit="chunk",
               file=sys.stderr, disable=not progress_bars())
    for c, chunk in enumerate(chunks):
        path = sample_dir / f"chunk-{c:05d}.json"
        if path.is_file():
            continue
        t0 = time.perf_counter()
        # one seed per (run seed, iteration, chunk): a resumed chunk draws what it would have drawn
        outs = sampler.sample([r["messages"] for r in chunk], cfg.k, temperature, cfg.top_p, cfg.max_new_tokens,
                              seed=derive_seed(cfg.seed, it, c))
        t1 = time.perf_counter()
        rows = score_samples(reward, chunk, [[o.text for o in per_prompt] for per_prompt in outs])
        for row, per_prompt in zip(rows, outs):
            for s, o in zip(row["samples"], per_prompt):
                s["tokens"], s["finish"] = len(o.tokens), o.finish_reason
        t2 = time.perf_counter()
        write_atomic(path, json.dumps({"chunk": c, "seconds": {"sampling": t1 - t0, "scoring": t2 - t1},
                                       "rows": rows}, ensure_ascii=False) + "\n")
        bar.update(1)
        kill_hook(c + 1, "LLAMA2_KILL_AT_SAMPLE_CHUNK")
    bar.close()


def select_answers(cfg: RejectionSamplingConfig, records: list[dict], rows: list[dict], earlier: list[list[dict]],
                   out: Path, it: int, forbidden, policy: str) -> Selection:
    """Steps 3-4: every prompt's best (complete) answer joins the pool (RUN/pool/iter-k.jsonl), then
    the fine-tuning set is the best of all iterations (`all`) or of this one (`last`)."""
    candidates = best_per_prompt(records, rows, it, forbidden, cfg.drop_truncated)
    best = clear_preferences(candidates, cfg.min_gap)
    write_jsonl_atomic(out / "pool" / f"iter-{it}.jsonl", best)
    pools = earlier + [read_jsonl(out / "pool" / f"iter-{j}.jsonl") for j in range(1, it + 1)]
    selected = select_pool(pools, cfg.pool)
    if cfg.min_reward is not None:
        selected = [e for e in selected if e["reward"] >= cfg.min_reward]
    filtered = cfg.min_reward is not None or cfg.min_gap is not None
    if not selected and not (filtered and candidates and Path(policy).is_dir()):
        cut = sum(s["finish"] == "length" for row in rows for s in row["samples"])
        raise ValueError(f"iteration {it}: no answer to fine-tune on (all empty, cut off at max_new_tokens="
                         f"{cfg.max_new_tokens} ({cut} of {sum(len(row['samples']) for row in rows)} samples; "
                         f"drop_truncated={cfg.drop_truncated}), below min_reward={cfg.min_reward} or within "
                         f"min_gap={cfg.min_gap} of their prompt's median); see {out / f'iter-{it}' / 'samples'}")
    replayed = replay_dialogs(cfg.replay, cfg.replay_examples, cfg.replay_tasks, derive_seed(cfg.seed, it))
    return Selection(candidates, best, selected, replayed)


def fine_tune(cfg: RejectionSamplingConfig, chosen: Selection, start: str, policy: str, it_dir: Path, tokenizer,
              max_seq_len: int, it: int) -> Path:
    """Step 5: fine-tune `start` like SFT (assistant-only loss) on RUN/iter-k/selected.jsonl,
    resuming a killed fine-tuning; returns RUN/iter-k/sft/final."""
    final = it_dir / "sft" / "final"
    write_jsonl_atomic(it_dir / "selected.jsonl", [sft_record(e) for e in chosen.selected] + chosen.replayed)
    if not chosen.selected and not final.is_dir():
        # Nothing cleared min_gap / min_reward: no clear preference to learn, the policy stays.
        say(f"iteration {it}: no answer cleared min_gap={cfg.min_gap} / min_reward={cfg.min_reward}; "
            f"nothing to fine-tune on, {policy} is kept")
        final.parent.mkdir(parents=True, exist_ok=True)
        final.symlink_to(Path(policy).resolve(), target_is_directory=True)
    if not final.is_dir():  # written atomically at the very end of the SFT recipe
        sft_cfg = fitting_batch(replace(cfg.sft, model=start, train_data=[str(it_dir / "selected.jsonl")],
                                        out_dir=str(it_dir / "sft")), tokenizer, max_seq_len, it)
        sft_resume = any((it_dir / "sft" / "checkpoints").glob("step-*/train_state.json"))
        say(f"iteration {it}: fine-tuning {start} on {len(chosen.selected)} answers"
            + (f" and {len(chosen.replayed)} replayed SFT dialogs" if chosen.replayed else "")
            + (" (resuming)" if sft_resume else ""))
        sft_main(sft_cfg, resume=sft_resume)
    detect_format(final)  # the fine-tuned model is a loadable checkpoint
    return final


def iteration_stats(cfg: RejectionSamplingConfig, it: int, policy: str, start: str, final: Path, temperature: float,
                    n_prompts: int, rows: list[dict], chosen: Selection, forbidden, seconds: dict) -> dict:
    """What the samples scored, what was kept, where the time went (RUN/iter-k/stats.json)."""
    samples = [s for row in rows for s in row["samples"]]
    rewards = [s["reward"] for s in samples]
    tokens = sum(s["tokens"] for s in samples)
    candidates, selected = chosen.candidates, chosen.selected
    return {
        "iteration": it, "policy": policy, "fine_tuned_from": start, "checkpoint": str(final),
        "temperature": temperature, "k": cfg.k, "prompts": n_prompts, "pool_mode": cfg.pool,
        "samples": {**summary(rewards), "used_safety": statistics.fmean(s["used_safety"] for s in samples),
                    "mean_tokens": tokens / len(samples),
                    "truncated": statistics.fmean(s["finish"] == "length" for s in samples),
                    "unusable": statistics.fmean(not usable(s["text"], forbidden) for s in samples)},
        "best_of_k": {**summary([e["reward"] for e in candidates]),
                      "used_safety": statistics.fmean(e["used_safety"] for e in candidates) if candidates else 0.0,
                      "cleared_min_gap": len(chosen.best)},
        "selected": {**summary([e["reward"] for e in selected]),
                     "used_safety": statistics.fmean(e["used_safety"] for e in selected) if selected else 0.0,
                     "from_this_iteration": statistics.fmean(
                         e["iteration"] == it and not e.get("rescored") for e in selected) if selected else 0.0},
        "replayed": len(chosen.replayed),
        "sft_final_loss": _last_loss(final.parent / "metrics.jsonl"),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "sampling_tokens_per_s": tokens / seconds["sampling"] if seconds["sampling"] else None,
    }


def main(cfg: RejectionSamplingConfig, resume: bool = False) -> int:
    check_config(cfg)
    out = Path(cfg.out_dir)
    open_run(out, cfg, resume, RESUME_KEYS, "rejection-sampling")

    records = load_prompt_records(cfg.prompts, cfg.split, cfg.max_prompts, cfg.seed, "prompts", cfg.reward_axes)
    reward = load_gated_reward(cfg.helpfulness_rm, cfg.safety_rm, cfg.safety_threshold, cfg.reward_batch_size,
                               where="helpfulness_rm/safety_rm")
    earlier = [rescore(reward, read_jsonl(Path(p)), records) for p in cfg.pool_from]  # this run's prompts only
    chunks = [records[i:i + cfg.chunk_prompts] for i in range(0, len(records), cfg.chunk_prompts)]
    say(f"{len(records)} prompts ({sum(r['is_safety'] for r in records)} safety) in {len(chunks)} chunks; "
        f"K={cfg.k}, pool={cfg.pool}, {cfg.iterations} iteration(s) -> {out}")

    policy = cfg.policy
    for it in range(1, cfg.iterations + 1):
        it_dir = out / f"iter-{it}"
        if (it_dir / "stats.json").is_file() and (it_dir / "sft" / "final").is_dir():
            say(f"iteration {it}: already done ({it_dir / 'sft' / 'final'})")
            policy = str(it_dir / "sft" / "final")
            continue
        seconds = {"tuning": 0.0, "sampling": 0.0, "scoring": 0.0, "fine_tuning": 0.0}
        model, tok = load_for_inference(policy, cfg.device)
        sampler = DialogSampler(model, tok, cfg.sft.chat_format, cfg.sample_batch_size)

        # ---- 1. temperature for this iteration: fixed, or re-tuned by best-of-N (Figure 8)
        temperature = cfg.temperature
        if cfg.retune_temperature:
            temperature, seconds["tuning"] = tune_temperature(cfg, sampler, reward, policy, it_dir, it)

        # ---- 2. sample K answers per prompt and score them
        sample_dir = it_dir / "samples"
        sample_chunks(cfg, sampler, reward, chunks, temperature, sample_dir, it,
                      {"temperature": temperature, "k": cfg.k, "prompts": len(records), "chunks": len(chunks),
                       "policy": policy})
        forbidden, max_seq_len = sampler.format.forbidden, model.args.max_seq_len
        del sampler, model  # free the sampling copy before fine-tuning
        parts = [json.loads((sample_dir / f"chunk-{c:05d}.json").read_text()) for c in range(len(chunks))]
        rows = [row for part in parts for row in part["rows"]]
        for part in parts:
            seconds["sampling"] += part["seconds"]["sampling"]
            seconds["scoring"] += part["seconds"]["scoring"]

        # ---- 3-4. the best answer per prompt joins the pool; the fine-tuning set is chosen from the pools
        chosen = select_answers(cfg, records, rows, earlier, out, it, forbidden, policy)

        # ---- 5. fine-tune like SFT
        t0 = time.perf_counter()
        start = cfg.policy if cfg.init_from == "initial" else policy
        final = fine_tune(cfg, chosen, start, policy, it_dir, tok, max_seq_len, it)
        seconds["fine_tuning"] = time.perf_counter() - t0

        stats = iteration_stats(cfg, it, policy, start, final, temperature, len(records), rows, chosen, forbidden,
                                seconds)
        write_atomic(it_dir / "stats.json", json.dumps(stats, indent=1) + "\n")
        say(f"iteration {it}: samples mean Rc {stats['samples']['mean']:.3f}, best-of-{cfg.k} mean "
            f"{stats['best_of_k']['mean']:.3f}, selected {len(chosen.selected)} "
            f"(mean {stats['selected'].get('mean', 0):.3f}) ({stats['selected']['used_safety']:.0%} gated by safety); "
            + ", ".join(f"{k} {v:.0f}s" for k, v in stats["seconds"].items()))
        policy = str(final)

    # ---- all iterations: one stats file, and RUN/final -> the last checkpoint
    history = [json.loads((out / f"iter-{j}" / "stats.json").read_text()) for j in range(1, cfg.iterations + 1)]
    write_atomic(out / "stats.json", json.dumps(history, indent=1) + "\n")
    link = link_final(out, Path(policy))
    print(f"[rs] done: {link} -> {policy}  (chat with it: llama2 chat --model {link})", flush=True)
    return 0


def _last_loss(metrics: Path) -> float | None:
    if not metrics.is_file():
        return None
    rows = read_jsonl(metrics)
    return rows[-1].get("loss") if rows else None


def cli(argv: list[str]) -> int:
    return recipe_cli(argv, RejectionSamplingConfig, main, "llama2 rlhf rejection-sampling", __doc__.split("\n\n")[0])
