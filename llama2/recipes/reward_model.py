"""Reward models (Llama 2 §3.2.2): train, evaluate and use the helpfulness and safety RMs.

    llama2 reward train --config configs/reward/tiny.yaml [objective=safety] [key=value ...] [--resume]
    llama2 reward eval  --model RM --data FILE... [--out DIR]
    llama2 reward score --model RM --data FILE [--out FILE]

Training starts from a chat checkpoint whose next-token head is replaced by a scalar head, and
minimises the binary ranking loss with a margin by rating, -log σ(r_c − r_r − m(r)) (Table 27),
scoring chosen and rejected in one forward pass. One recipe trains either model (`objective`):
the helpfulness RM on all helpfulness pairs plus an equal amount of the others, the safety RM on
all safety pairs mixed 90/10 with helpfulness pairs. Records with split "test" are held out and
reported per test set and rating level (Tables 7 and 8) as JSON and a plot.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: no global backend state in a library

from llama2.chat_format import ChatFormat, ChatFormatError
from llama2.checkpoint import build_model, read_checkpoint, save_native
from llama2.config import ConfigError, save_config
from llama2.distributed import Dist, all_reduce_mean, all_reduce_sum, full_state_dict, setup, teardown
from llama2.formats import AXES, RATINGS, DataError, iter_rows, read_records
from llama2.losses import MARGINS, ranking_loss
from llama2.preference_data import PairData, PairLoader, accuracy_report, mix_pairs, read_pairs, tokenize_pairs
from llama2.recipes.common import config_dict, kill_hook, place_model, recipe_cli, resume_latest
from llama2.agreement import wilson_interval
from llama2.reward_scoring import RewardScorer, pair_scores, reward_state
from llama2.train import (Checkpointer, LossScaler, MetricsLogger, OptimConfig, Throughput, autocast, build_optimizer,
                          clip_grad_norm, lr_at, peak_flops, resolve_dtype, seed_everything, set_lr)


def rm_optim() -> OptimConfig:
    # §3.2.2: max lr 1e-5 (5e-6 for 70B), cosine down to 10%, warmup 3% of the steps with at least
    # 5; otherwise the pretraining optimizer (AdamW 0.9/0.95, eps 1e-5, decay 0.1, clip 1.0).
    return OptimConfig(lr=1e-5, warmup_steps=5, warmup_ratio=0.03)


@dataclass
class MixConfig:
    # Share of the mix sampled from the other pairs; null = the paper's: 0.5 for helpfulness ("an
    # equal amount" of safety and open-source pairs), 0.1 for safety (90/10 with helpfulness).
    other_share: float | None = None
    # Sources whose pairs count as main data whatever their axis, e.g. harmless open-source pairs
    # for the safety RM (§3.2.2: "all Meta Safety and Anthropic Harmless data").
    main_sources: list[str] = field(default_factory=list)
    # Sources of open-source preference data (not your own annotation): their helpfulness pairs
    # join the helpfulness RM's "other" part with the safety pairs, not its main data (§3.2.2).
    open_source: list[str] = field(default_factory=list)


@dataclass
class RewardConfig:
    out_dir: str = "runs/reward"
    model: str = ""  # §3.2.2: initialised from the chat model's checkpoint (any format); required
    objective: Literal["helpfulness", "safety"] = "helpfulness"  # helpfulness | safety: which of the two reward models
    train_data: list[str] = field(default_factory=list)  # preference files; their "test" records are held out
    eval_data: list[str] = field(default_factory=list)  # further test files (every record is a test pair)
    mix: MixConfig = field(default_factory=MixConfig)
    margin: Literal["none", "small", "large"] = "small"  # none | small | large: m(rating) of Table 27 (Table 28 ablates them)
    chat_format: str = "auto"  # auto (the tokenizer's template if any) | llama2 | template
    max_seq_len: int = 0  # longest pair sequence; 0 = the model's context. Longer pairs are skipped, counted
    batch_size: int = 512  # pairs per optimizer step, all ranks together (§3.2.2: 512 pairs = 1024 rows)
    micro_batch_size: int = 8  # pairs per rank per forward/backward (2x rows: chosen and rejected)
    epochs: float = 1.0  # §3.2.2: one epoch; training longer overfitted...
    max_steps: int = 0  # ...or a number of optimizer steps (wins when > 0)
    head_init_std: float | None = None  # scalar head init N(0, std²); null = 1/(dim+1), scores start near 0
    optim: OptimConfig = field(default_factory=rm_optim)
    dtype: str = "auto"
    activation_checkpointing: bool = False
    eval_batch_size: int = 32  # pairs per evaluation forward
    log_every: int = 10
    eval_every: int = 100  # steps between held-out accuracy evaluations (and at the end)
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0  # data order, the mix's sample of other pairs and the head's init
    device: str = "auto"


# ----------------------------------------------------------------------------- helpers


def score_pairs(model, data: PairData, batch_size: int, d: Dist,
                dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """r_c, r_r (float64, on CPU) of every pair. Batches of similar length; under FSDP each rank
    scores every world-th batch (all ranks run the same number of forwards) and the scores are summed."""
    n = len(data)
    order = np.argsort(-data.lengths, kind="stable")
    batches = [order[i: i + batch_size] for i in range(0, n, batch_size)]
    rounds = math.ceil(len(batches) / d.world_size) * d.world_size
    r_c, r_r = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for k in range(d.rank, rounds, d.world_size):
            idx = batches[min(k, len(batches) - 1)]  # a rank past the end repeats the last batch
            with autocast(d.device, dtype):
                c, r = pair_scores(model, [data.chosen[i] for i in idx], [data.rejected[i] for i in idx], d.device)
            if k < len(batches):
                r_c[idx], r_r[idx] = c.double().cpu(), r.double().cpu()
    model.train(was_training)
    if d.enabled:
        both = all_reduce_sum(torch.stack([r_c, r_r]).to(d.device), d).cpu()
        r_c, r_r = both[0], both[1]
    return r_c, r_r


def accuracy_table(report: dict) -> str:
    """Table 8's layout: one row per test set, accuracy per rating level and the average."""
    short = {"significantly better": "signif.", "better": "better", "slightly better": "slightly",
             "negligibly better/unsure": "negl./unsure"}
    width = max(len(n) for n in report["test_sets"]) + 2
    lines = [f"{'test set':<{width}}" + "".join(f"{short[r]:>14}" for r in RATINGS) + f"{'avg':>8}{'pairs':>8}"]
    for name, ts in report["test_sets"].items():
        cells = "".join(f"{ts['by_rating'][r]['accuracy'] * 100:>14.1f}" if r in ts["by_rating"] else f"{'-':>14}"
                        for r in RATINGS)
        lines.append(f"{name:<{width}}{cells}{ts['accuracy'] * 100:>8.1f}{ts['pairs']:>8}")
    return "\n".join(lines)


def plot_report(report: dict, path: Path, title: str) -> None:
    """Grouped bars of accuracy: per rating level (Table 8) and per task family, one bar per test set."""
    sets = list(report["test_sets"].items())
    tasks = sorted({t for _, ts in sets for t in ts["by_task"]})
    panels = [("rating level", [*RATINGS, "average"], "by_rating"), ("task family", tasks, "by_task")]
    fig = Figure(figsize=(14, 4.5))
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [5, max(len(tasks), 3)]})
    width = 0.8 / max(len(sets), 1)
    for ax, (what, keys, field_) in zip(axes, panels):
        for j, (name, ts) in enumerate(sets):
            vals = [ts["accuracy"] if k == "average" else ts[field_].get(k, {}).get("accuracy") for k in keys]
            xs = [i + (j - (len(sets) - 1) / 2) * width for i in range(len(keys))]
            ax.bar(xs, [np.nan if v is None else v * 100 for v in vals], width, label=name)
        ax.axhline(50, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(keys)), [k.replace(" better", "\nbetter").replace("/", "/\n") for k in keys],
                      fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"by {what}")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(report: dict, out: Path, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_report(report, out / "eval.png", title)


def _mix_line(summary: dict) -> str:
    def names(counts: dict) -> str:
        return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "none"

    n_main, n_other = sum(summary["main"].values()), sum(summary["other"].values())
    short = (f"; only {summary['other_available']} of {summary['other_wanted']} wanted were available"
             if n_other < summary["other_wanted"] else "")
    return (f"[reward] {summary['objective']} RM mix: {n_main} main pairs ({names(summary['main'])}) + {n_other} "
            f"other pairs at share {summary['other_share']:g} ({names(summary['other'])}){short}")


# ----------------------------------------------------------------------------- training


def main(cfg: RewardConfig, resume: bool = False) -> int:
    if not cfg.model:
        raise ConfigError("model: the chat checkpoint to start from is required (e.g. model=runs/sft/final)")
    if not cfg.train_data:
        raise ConfigError("train_data: at least one preference file is required")
    if cfg.objective not in AXES:
        raise ConfigError(f"objective: expected one of {', '.join(AXES)}, got {cfg.objective!r}")
    if cfg.margin not in MARGINS:
        raise ConfigError(f"margin: expected one of {', '.join(MARGINS)}, got {cfg.margin!r}")
    d = setup(cfg.device)
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    dtype = resolve_dtype(cfg.dtype, d.device)

    # ---- model, tokenizer, data
    ck = read_checkpoint(cfg.model)
    tokenizer = ck.tokenizer()
    if tokenizer is None:
        raise ConfigError(f"model: {cfg.model} has no tokenizer")
    args, state = reward_state(ck.args, ck.state, cfg.head_init_std, cfg.seed)
    fmt = ChatFormat(tokenizer, cfg.chat_format)
    T = min(cfg.max_seq_len or args.max_seq_len, args.max_seq_len)
    rows = read_pairs(cfg.train_data)
    mixed, summary = mix_pairs([r for r in rows if r.record["split"] == "train"], cfg.objective,
                               cfg.mix.other_share, cfg.mix.main_sources, cfg.seed, cfg.mix.open_source)
    train = tokenize_pairs(mixed, fmt, T)
    test = tokenize_pairs([r for r in rows if r.record["split"] == "test"] + read_pairs(cfg.eval_data), fmt, T)
    loader = PairLoader(train.lengths, cfg.batch_size, cfg.micro_batch_size, d.rank, d.world_size, cfg.seed)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * loader.steps_per_epoch))
    margins = torch.tensor([MARGINS[cfg.margin][r] for r in train.rating], dtype=torch.float32)

    model = place_model(build_model(args, state, ck.source).train(), d, dtype, cfg.activation_checkpointing)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = LossScaler(dtype, cfg.optim.loss_scale)  # float16 only: dynamic loss scaling
    ckpt = Checkpointer(out, d, keep=cfg.keep_checkpoints)
    start = 0
    if resume:
        saved = resume_latest(ckpt, model, optimizer, cfg, ["model", "objective", "train_data", "mix", "margin",
                                                            "batch_size", "max_seq_len", "seed"])
        loader.load_state_dict(saved["loader"])
        scaler.load_state_dict(saved.get("scaler"))
        start = saved["step"]
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    log = MetricsLogger(out, d, total_steps, f"reward:{cfg.objective}", initial=start)
    if start == 0:
        log.write(_mix_line(summary))
        for what, data in (("training", train), ("test", test)):
            for reason, n in data.skipped.items():
                log.write(f"[reward] skipped {n} {what} pairs: {reason}")
        log.write(f"[reward] {len(train)} training pairs, {len(test)} test pairs; {total_steps} steps of "
                  f"{cfg.batch_size} pairs ({loader.accum} x {cfg.micro_batch_size} x {d.world_size}); "
                  f"margin {cfg.margin}; out: {out}")
    speed = Throughput(args.flops_per_token(int(train.lengths.mean())), peak_flops(d.device, dtype), d.world_size)
    pair_speed = Throughput(0.0, 0.0, d.world_size)  # the same window, counted in pairs
    report = None  # the latest held-out evaluation
    model.train()
    for step in range(start, total_steps):
        lr = lr_at(step, cfg.optim, total_steps)
        set_lr(optimizer, lr)
        loss_sum, acc_sum, gap_sum, tokens = 0.0, 0.0, 0.0, 0
        for idx in loader.next_step():
            chosen, rejected = [train.chosen[i] for i in idx], [train.rejected[i] for i in idx]
            with autocast(d.device, dtype):
                r_c, r_r = pair_scores(model, chosen, rejected, d.device)  # (B,), (B,)
            loss = ranking_loss(r_c, r_r, margins[idx].to(d.device)) / loader.accum
            scaler.scaled(loss).backward()
            loss_sum += loss.item()
            acc_sum += (r_c > r_r).float().mean().item() / loader.accum
            gap_sum += (r_c - r_r).mean().item() / loader.accum
            tokens += sum(len(s) for s in chosen) + sum(len(s) for s in rejected)
        scaler.unscale_(model)
        grad_norm = clip_grad_norm(model, cfg.optim.grad_clip)
        loss_avg = all_reduce_mean(loss_sum, d)
        if not math.isfinite(loss_avg) or not (math.isfinite(grad_norm) or scaler.enabled):
            log.close()
            raise FloatingPointError(f"step {step}: loss {loss_avg} / grad norm {grad_norm} is not finite; stopping. "
                                     f"Last good checkpoint: {ckpt.latest() or 'none'} (resume with --resume)")
        stepped = scaler.step(grad_norm, optimizer)  # fp16: an overflowed step is skipped
        optimizer.zero_grad(set_to_none=True)
        speed.add(tokens * d.world_size)
        pair_speed.add(cfg.batch_size)
        metrics = {"loss": loss_avg, "accuracy": all_reduce_mean(acc_sum, d), "gap": all_reduce_mean(gap_sum, d),
                   "lr": lr, "grad_norm": grad_norm if stepped else 0.0, "epoch": loader.epoch}
        metrics.update(scaler.metrics(int(not stepped)))
        if (step + 1) % cfg.log_every == 0 or step == start:
            tps, mfu = speed.read()
            metrics.update(tokens_per_s=tps, pairs_per_s=pair_speed.read()[0], mfu=mfu)
        if len(test) and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == total_steps):
            report = accuracy_report(*score_pairs(model, test, cfg.eval_batch_size, d, dtype), test)
            metrics["test_accuracy"] = report["overall"]["accuracy"]
            metrics.update({f"test_accuracy/{k}": v["accuracy"] for k, v in report["test_sets"].items()})
        log.log(step + 1, metrics, show=("loss", "accuracy", "test_accuracy", "lr", "pairs_per_s"))
        if cfg.ckpt_every and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == total_steps):
            ckpt.save(step + 1, model, optimizer, {"loader": loader.state_dict(), "scaler": scaler.state_dict(),
                                                   "config": config_dict(cfg)})
        kill_hook(step + 1)
    log.close()

    # ---- export, then the held-out report (Tables 7 and 8)
    state = full_state_dict(model, d)
    if report is None and len(test):  # the loop evaluates at its last step when eval_every > 0
        report = accuracy_report(*score_pairs(model, test, cfg.eval_batch_size, d, dtype), test)
    if d.is_main:
        final = save_native(out / "final", state, args, tokenizer,
                            meta={"stage": "reward", "objective": cfg.objective, "margin": cfg.margin,
                                  "steps": total_steps, "mix": summary, "config": config_dict(cfg)})
        if report is not None:
            write_report(report, out / "eval", f"{cfg.objective} reward model, margin {cfg.margin}: held-out accuracy")
            print(accuracy_table(report), flush=True)
        print(f"[reward] done: {final}  (evaluate: llama2 reward eval --model {final} --data FILE)", flush=True)
    teardown()
    return 0


# ----------------------------------------------------------------------------- on-policy accuracy


def held_out_pairs(pairs_files: str | list[str], objective: str) -> list[dict]:
    """The held-out pairs of one reward axis in preference files: records with split "test" and
    axis `objective`, in file order."""
    files = [pairs_files] if isinstance(pairs_files, (str, Path)) else pairs_files
    return [p for f in files for p in read_records(f, "preferences") if p["split"] == "test" and p["axis"] == objective]


def on_policy_accuracy(rm_path: str, pairs_files: str | list[str], objective: str, device: str = "cpu") -> dict:
    """A reward model on held-out pairs of two answers of the policy being improved (a batch's
    test pairs): accuracy against the annotators' labels on every pair, and on the pairs the world's
    noiseless graders rank (`meta.grader_gap` != 0) against the labels and against the graders,
    each with its 95% Wilson interval. Pairs whose answers the graders score the same (mostly both
    wrong) are a coin flip for any judge, so an honest test of a reward model leaves them out."""
    pairs = held_out_pairs(pairs_files, objective)
    if not pairs:
        return {}
    scorer = RewardScorer(rm_path, device=device)
    dialogs = [p["messages"] for p in pairs]
    scores = scorer.score(dialogs + dialogs, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
    diff = (scores[: len(pairs)] - scores[len(pairs):]).tolist()  # both sides in one batched pass
    return accuracy_against_truth(diff, [grader_gap(p) for p in pairs], [p.get("task") for p in pairs])


def grader_gap(pair: dict) -> float | None:
    """The graders' score(chosen) - score(rejected) of a pair (`meta.grader_gap`): 0 a tie, None unknown."""
    return (pair.get("meta") or {}).get("grader_gap")


def accuracy_against_truth(diff: list[float], gaps: list[float | None], tasks: list[str | None] | None = None) -> dict:
    """`on_policy_accuracy` from the reward model's score differences r(chosen) - r(rejected) and the
    graders' score gaps score(chosen) - score(rejected) (0: a tie; None: unknown, not ranked); with
    the pairs' `tasks`, also the accuracy against the graders per task family (`graders_by_task`)."""
    agree = [1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diff]  # a tie counts half
    ranked = [i for i, g in enumerate(gaps) if g]
    vs_graders = [1.0 if diff[i] * gaps[i] > 0 else 0.5 if diff[i] == 0 else 0.0 for i in ranked]

    def accuracy(correct: list[float]) -> dict:
        n, k = len(correct), sum(correct)
        return {"n": n, "accuracy": k / n if n else None, "ci95": list(wilson_interval(round(k), n))}

    out = {"pairs": len(diff), "grader_ties": sum(g == 0 for g in gaps), "labels_all": accuracy(agree),
           "labels_ranked": accuracy([agree[i] for i in ranked]), "graders_ranked": accuracy(vs_graders)}
    if tasks is not None:
        by_task: dict[str, list[float]] = {}
        for i, correct in zip(ranked, vs_graders):
            by_task.setdefault(str(tasks[i]), []).append(correct)
        out["graders_by_task"] = {t: accuracy(c) for t, c in sorted(by_task.items())}
    return out


# ----------------------------------------------------------------------------- eval and score


def eval_cli(argv: list[str]) -> int:
    """`llama2 reward eval --model RM --data FILE... [--split test] [--out DIR]`."""

    p = argparse.ArgumentParser(prog="llama2 reward eval",
                                description="Accuracy of a reward model on preference pairs, per test set (file and "
                                            "axis), rating level and task family (Llama 2 Tables 7 and 8).")
    p.add_argument("--model", required=True, help="a reward model checkpoint (from `llama2 reward train`)")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="preference files (JSONL or Parquet)")
    p.add_argument("--split", choices=["test", "train", "all"], default="all",
                   help="which records of the files to evaluate (default: all)")
    p.add_argument("--out", help="write eval.json and eval.png here")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per forward pass")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    scorer = RewardScorer(a.model, batch_size=a.batch_size, device=a.device)
    rows = [r for r in read_pairs(a.data) if a.split == "all" or r.record["split"] == a.split]
    if not rows:
        raise ValueError(f"no {a.split} records in {', '.join(a.data)}")
    data = tokenize_pairs(rows, scorer.fmt, scorer.model.args.max_seq_len)
    if not len(data):
        raise ValueError(f"every pair was skipped: {dict(data.skipped)}")
    d = Dist(device=torch.device(a.device))
    report = accuracy_report(*score_pairs(scorer.model, data, a.batch_size, d, torch.float32), data)
    for reason, n in data.skipped.items():
        print(f"skipped {n} pairs: {reason}", file=sys.stderr)
    print(accuracy_table(report))
    if a.out:
        write_report(report, Path(a.out), f"{a.model}: reward model accuracy")
        print(f"wrote {Path(a.out) / 'eval.json'} and {Path(a.out) / 'eval.png'}")
    return 0


def score_records(path: str) -> list[tuple[list, str, str, int]]:
    """(dialog ending with a user turn, response, id, line) of each record of a file: either
    {"messages", "response"} or {"messages"} ending with the assistant answer to score."""
    out = []
    for line, obj in iter_rows(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
            raise DataError(path, line, "messages", "must be a non-empty list of {role, content} messages")
        msgs = obj["messages"]
        if "response" in obj:
            if not isinstance(obj["response"], str):
                raise DataError(path, line, "response", "must be a string")
            dialog, response = msgs, obj["response"]
        elif isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            dialog, response = msgs[:-1], msgs[-1].get("content")
        else:
            raise DataError(path, line, "response", "missing: give the response to score as 'response', or end "
                                                    "'messages' with the assistant answer")
        if not dialog or not isinstance(dialog[-1], dict) or dialog[-1].get("role") != "user":
            raise DataError(path, line, "messages", "the dialog must end with the user turn the response answers")
        out.append((dialog, response, obj.get("id", f"line {line}"), line))
    if not out:
        raise DataError(path, None, None, "no records")
    return out


def score_cli(argv: list[str]) -> int:
    """`llama2 reward score --model RM --data FILE [--out FILE.jsonl]`."""
    p = argparse.ArgumentParser(prog="llama2 reward score",
                                description="Score responses with a reward model: r(x, y) and sigmoid(r). Each record "
                                            "is {messages, response} or {messages} ending with the assistant answer.")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, metavar="FILE")
    p.add_argument("--out", help="write JSONL {id, score, prob} here instead of printing")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    scorer = RewardScorer(a.model, batch_size=a.batch_size, device=a.device)
    records = score_records(a.data)
    seqs = []
    for dialog, response, _, line in records:
        try:
            seqs += scorer.ids([dialog], [response])
        except ChatFormatError as e:
            raise DataError(a.data, line, "messages", str(e).removeprefix("dialog 0: ")) from None
        except ValueError as e:  # longer than the reward model's context
            raise DataError(a.data, line, "response", str(e).removeprefix("dialog 0: ")) from None
    scores = scorer.score_ids(seqs)
    rows = [{"id": rid, "score": round(s, 6), "prob": round(1 / (1 + math.exp(-s)), 6)}
            for (_, _, rid, _), s in zip(records, scores.tolist())]
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} scores to {a.out}")
    else:
        for r in rows:
            print(f"{r['id']}\t{r['score']:.4f}\t{r['prob']:.4f}")
    return 0


def cli(argv: list[str]) -> int:
    """`llama2 reward train|eval|score ...`."""
    commands = {"train": lambda rest: recipe_cli(rest, RewardConfig, main, "llama2 reward train",
                                                 __doc__.split("\n\n")[0]),
                "eval": eval_cli, "score": score_cli}
    if not argv or argv[0] not in commands:
        print("usage: llama2 reward {train,eval,score} [options]  (see --help of each)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])
