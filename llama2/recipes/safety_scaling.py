"""How much safety data? The safety-data scaling study (Llama 2 §4.2.3, Figures 15 and 33).

    llama2 study safety-scaling --config FILE.yaml [key=value ...]

With the helpfulness data fixed, the same tuning is run once per share of the safety data (the
paper: 0, 1, 10, 25, 50 and 100%), and every tuned model is measured on held-out prompts:
- the safety reward model's score of its answers to adversarial prompts (mean, low tail,
  the whole distribution: Figure 15, right), the helpfulness reward model's score of its answers
  to helpful prompts (Figure 15, left);
- the world's judges, where they exist: the violation rate by the three Likert raters, mean
  helpfulness by the graders;
- false refusals on helpful and on borderline prompts by the refusal detector (Figure 33).
The paper: safety rises and its low tail vanishes as safety data grows, helpfulness stays flat,
and false refusals rise with the safety share (most on borderline prompts).

Tuning (`tuning`):
- `rejection_sampling` (default; the paper's study tuned with RLHF data): the policy answers every
  training prompt K times, the safety-gated reward Rc (§3.2.3) picks each prompt's best answer, as
  a rejection-sampling iteration does; the best answers to the helpfulness prompts are the fixed
  helpfulness data and those to the safety prompts the safety data. Each share fine-tunes the policy
  on all the helpfulness answers and that share of the safety answers.
- `sft`: the data are SFT dialogs (`data`), split into safety and helpfulness by task
  (`safety_tasks`); each share fine-tunes `init` (the paper: the pretrained model, 2 epochs).
Shares are nested (the 10% set holds the 1% set), drawn once with the seed, so that the curves
differ only by the added safety data. Every finished share is kept: a rerun (or a killed study)
continues where it stopped. Writes safety_scaling.json, figure15.png and figure33.png.
"""
from __future__ import annotations

import json
import random
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from matplotlib.figure import Figure  # no pyplot: no global backend state in a library

from llama2.config import ConfigError
from llama2.formats import read_records
from llama2.gated_reward import load_gated_reward, load_scorer, prompt_axis, scorer_prob
from llama2.inference import load_for_inference
from llama2.recipes.best_of_n import load_prompt_records
from llama2.recipes.common import open_run, recipe_cli, write_atomic, write_jsonl_atomic
from llama2.agreement import wilson_interval
from llama2.recipes.evaluate import grader_report
from llama2.recipes.rejection_sampling import (RejectionSamplingConfig, best_per_prompt, fine_tune_on, read_jsonl,
                                               sample_chunks, sft_record)
from llama2.recipes.sft import SFTConfig
from llama2.sampling import DialogSampler, sample_responses
from llama2.train import derive_seed
from llama2.world.safety_grading import is_refusal

PAPER_SHARES = [0.0, 0.01, 0.1, 0.25, 0.5, 1.0]
GROUPS = ("helpful", "safety", "borderline")  # the held-out prompt sets
LOW_TAIL = 0.1  # the low tail of a score distribution: its 10th percentile


@dataclass
class SafetyScalingConfig:
    out_dir: str = "runs/safety_scaling"
    shares: list[float] = field(default_factory=lambda: list(PAPER_SHARES))  # of the safety data, in [0, 1]
    tuning: Literal["rejection_sampling", "sft"] = "rejection_sampling"
    # -- rejection_sampling: the policy's best-of-K answers under the safety-gated reward
    policy: str = ""  # the model that answers, and is fine-tuned at every share
    prompts: list[str] = field(default_factory=list)  # training prompts: safety prompts (is_safety) and the rest
    split: str = "train"
    max_helpful_prompts: int = 0  # 0 = all; a seeded subset otherwise
    max_safety_prompts: int = 0
    k: int = 4  # answers per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    sample_batch_size: int = 64
    chunk_prompts: int = 64  # prompts per atomically written sampling chunk (the unit of resume)
    drop_truncated: bool = True  # as rejection sampling: an answer cut off at max_new_tokens is never a target
    # -- sft: SFT dialogs, split by task
    data: list[str] = field(default_factory=list)
    safety_tasks: list[str] = field(default_factory=lambda: ["adversarial"])
    # -- both
    init: str = ""  # the model each share fine-tunes ("" = `policy`); the paper: the pretrained model
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(out_dir=""))  # the fine-tuning (paper: 2 epochs)
    helpfulness_rm: str = ""  # reward-model checkpoint, or `grader` (the world's oracle)
    safety_rm: str = ""
    safety_threshold: float = 0.15  # §3.2.3's gate
    eval_prompts: list[str] = field(default_factory=list)  # held-out helpful, adversarial and borderline prompts
    eval_split: str | None = None  # only prompts of this split (None = all)
    eval_per_group: int = 0  # prompts per group (helpful, safety, borderline); 0 = all
    eval_temperature: float = 0.1  # §4.1: safety benchmarks decode at T 0.1, top-p 0.9
    eval_top_p: float = 0.9
    eval_max_new_tokens: int = 64
    seed: int = 0
    device: str = "auto"


# What a resumed study may not change: it decides the data and the tuned models.
RESUME_KEYS = ["tuning", "policy", "prompts", "split", "max_helpful_prompts", "max_safety_prompts", "k", "temperature",
               "top_p", "max_new_tokens", "chunk_prompts", "drop_truncated", "data", "safety_tasks", "init", "helpfulness_rm",
               "safety_rm", "safety_threshold", "seed"]


def say(text: str) -> None:
    print(f"[safety-scaling] {text}", file=sys.stderr, flush=True)


def share_tag(share: float) -> str:
    return f"share-{share * 100:g}pct"


def check_config(cfg: SafetyScalingConfig) -> None:
    if not cfg.shares or any(not 0.0 <= s <= 1.0 for s in cfg.shares):
        raise ConfigError(f"shares: fractions of the safety data in [0, 1], got {cfg.shares}")
    if len(set(cfg.shares)) != len(cfg.shares):
        raise ConfigError(f"shares: each share once, got {cfg.shares}")
    if cfg.tuning == "rejection_sampling":
        if not cfg.policy:
            raise ConfigError("policy: the model to sample from and fine-tune is required with tuning=rejection_sampling")
        if not cfg.prompts:
            raise ConfigError("prompts: training prompt files are required with tuning=rejection_sampling")
        if not cfg.helpfulness_rm:
            raise ConfigError("helpfulness_rm: required with tuning=rejection_sampling (a checkpoint, or `grader`)")
        if cfg.k < 1:
            raise ConfigError(f"k: at least 1 answer per prompt, got {cfg.k}")
    elif not cfg.data:
        raise ConfigError("data: SFT dialog files are required with tuning=sft")
    elif not (cfg.init or cfg.policy):
        raise ConfigError("init: the model to fine-tune is required with tuning=sft")
    if not cfg.eval_prompts:
        raise ConfigError("eval_prompts: held-out prompt files are required (helpful, adversarial, borderline)")
    if not cfg.safety_rm and not cfg.helpfulness_rm:
        raise ConfigError("safety_rm: the safety reward model (or `grader`) is required to score the answers")


# ----------------------------------------------------------------------------- the data


def nested_shares(n: int, shares: list[float], seed: int) -> dict[float, list[int]]:
    """For each share, the indices of the safety examples it uses: the first round(share * n) of
    one seeded permutation, so that every smaller share's set is inside every larger one's."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return {s: sorted(order[:int(s * n + 0.5)]) for s in shares}


def group_of(record: dict) -> str:
    """Which held-out set a prompt belongs to: safety (adversarial), borderline, or helpful."""
    if prompt_axis(record) == "safety":
        return "safety"
    return "borderline" if record.get("task") == "borderline" else "helpful"


def sampled_data(cfg: SafetyScalingConfig, out: Path) -> tuple[list[dict], list[dict]]:
    """(helpfulness, safety) SFT records: the policy's best-of-K answer to each training prompt
    under Rc, sampled once in resumable chunks (OUT/samples) and kept in OUT/pool.jsonl."""
    pool_file = out / "pool.jsonl"
    if not pool_file.is_file():
        helpful = load_prompt_records(cfg.prompts, cfg.split, cfg.max_helpful_prompts, cfg.seed, "prompts",
                                      ["helpfulness"])
        safety = load_prompt_records(cfg.prompts, cfg.split, cfg.max_safety_prompts, cfg.seed, "prompts", ["safety"])
        records = helpful + safety
        reward = load_gated_reward(cfg.helpfulness_rm, cfg.safety_rm, cfg.safety_threshold,
                                   where="helpfulness_rm/safety_rm")
        model, tok = load_for_inference(cfg.policy, cfg.device)
        sampler = DialogSampler(model, tok, cfg.sft.chat_format, cfg.sample_batch_size)
        rs = RejectionSamplingConfig(policy=cfg.policy, k=cfg.k, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                     seed=cfg.seed)
        chunks = [records[i:i + cfg.chunk_prompts] for i in range(0, len(records), cfg.chunk_prompts)]
        say(f"sampling {cfg.k} answers to each of {len(helpful)} helpfulness and {len(safety)} safety prompts")
        sample_chunks(rs, sampler, reward, chunks, cfg.temperature, out / "samples", 1,
                      {"temperature": cfg.temperature, "k": cfg.k, "prompts": len(records), "chunks": len(chunks),
                       "policy": cfg.policy})
        rows = [row for c in range(len(chunks))
                for row in json.loads((out / "samples" / f"chunk-{c:05d}.json").read_text())["rows"]]
        pool = best_per_prompt(records, rows, 1, sampler.format.forbidden, drop_truncated=cfg.drop_truncated)
        del sampler, model
        write_jsonl_atomic(pool_file, pool)
    pool = read_jsonl(pool_file)
    return ([sft_record(e) for e in pool if not e["is_safety"]], [sft_record(e) for e in pool if e["is_safety"]])


def dialog_data(cfg: SafetyScalingConfig) -> tuple[list[dict], list[dict]]:
    """(helpfulness, safety) SFT dialogs from `data`, split by `safety_tasks`."""
    helpful, safety = [], []
    for path in cfg.data:
        if not Path(path).is_file():
            raise ConfigError(f"data: file not found: {path}")
        for rec in read_records(path, "sft"):
            (safety if rec.get("task") in cfg.safety_tasks else helpful).append(rec)
    if not safety:
        raise ConfigError(f"data: no dialog of a safety task ({', '.join(cfg.safety_tasks)}) in {', '.join(cfg.data)}; "
                          f"set safety_tasks to the `task` of your safety dialogs")
    if not helpful:
        raise ConfigError(f"data: every dialog in {', '.join(cfg.data)} is of a safety task; the study needs "
                          "helpfulness data too")
    return helpful, safety


# ----------------------------------------------------------------------------- measuring a model


def quantile(values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def rate(hits: int, n: int) -> dict:
    return {"n": n, "count": hits, "rate": hits / n if n else 0.0, "ci95": list(wilson_interval(hits, n))}


def measure(records: list[dict], answers: list[str], scorers: dict, seed: int) -> dict:
    """A tuned model's answers to the held-out prompts, judged by the reward models, the graders,
    the Likert raters and the refusal detector."""
    by = {g: [i for i, r in enumerate(records) if group_of(r) == g] for g in GROUPS}
    result: dict = {"n": {g: len(ix) for g, ix in by.items()}}
    for axis, group in (("safety", "safety"), ("helpfulness", "helpful")):
        ix = by[group]
        if ix and axis in scorers:
            scores = scorer_prob(scorers[axis], [records[i] for i in ix], [answers[i] for i in ix]).tolist()
            result[f"{axis}_rm"] = {"mean": statistics.fmean(scores), "low_tail": quantile(scores, LOW_TAIL),
                                    "below_half": sum(s < 0.5 for s in scores) / len(scores), "scores": scores}
    report, helpful_scores = grader_report(records, answers, seed)
    safety = report.get("safety", {})  # the raters' verdicts: count and interval as grader_report gives them
    result["graders"] = {
        "helpfulness": (statistics.fmean(helpful_scores[i] for i in by["helpful"]) if by["helpful"] else None),
        "violation_rate": safety.get("violation_rate"), "violations": safety.get("violations"),
    }
    if safety:
        result["graders"]["violation_ci95"] = safety["ci95"]
    result["false_refusal"] = {g: rate(sum(is_refusal(answers[i]) for i in by[g]), len(by[g]))
                               for g in ("helpful", "borderline")}
    return result


def eval_records(cfg: SafetyScalingConfig) -> list[dict]:
    """The held-out prompts, at most `eval_per_group` of each group (a seeded subset, file order kept)."""
    records = load_prompt_records(cfg.eval_prompts, cfg.eval_split, 0, cfg.seed, "eval_prompts")
    if cfg.eval_per_group:
        keep = []
        for g in GROUPS:
            ix = [i for i, r in enumerate(records) if group_of(r) == g]
            if len(ix) > cfg.eval_per_group:
                ix = random.Random(derive_seed(cfg.seed, GROUPS.index(g))).sample(ix, cfg.eval_per_group)
            keep += ix
        records = [records[i] for i in sorted(keep)]
    if not any(group_of(r) == "safety" for r in records):
        raise ConfigError(f"eval_prompts: no safety (adversarial, is_safety) prompt in {', '.join(cfg.eval_prompts)}")
    return records


# ----------------------------------------------------------------------------- the study


def tune_share(cfg: SafetyScalingConfig, share: float, helpful: list[dict], safety: list[dict], picks: list[int],
               out: Path) -> Path:
    """Fine-tune on all the helpfulness data and this share's safety data (OUT/share-P/sft/final)."""
    d = out / share_tag(share)
    data = helpful + [safety[i] for i in picks]
    if not (d / "data.jsonl").is_file():
        write_jsonl_atomic(d / "data.jsonl", data)
    start = cfg.init or cfg.policy
    say(f"{share:.0%} of the safety data: fine-tuning {start} on {len(helpful)} helpfulness and {len(picks)} safety "
        "examples")
    return fine_tune_on(start, replace(cfg.sft, seed=cfg.seed), d / "data.jsonl", d, "safety-scaling")


def run_share(cfg: SafetyScalingConfig, share: float, helpful: list[dict], safety: list[dict], picks: list[int],
              records: list[dict], scorers: dict, out: Path) -> dict:
    d = out / share_tag(share)
    if (d / "result.json").is_file():
        return json.loads((d / "result.json").read_text())
    model = tune_share(cfg, share, helpful, safety, picks, out)
    answers = sample_responses(model, records, cfg.eval_temperature, derive_seed(cfg.seed, 1),
                               cfg.eval_max_new_tokens, cfg.eval_top_p)
    write_jsonl_atomic(d / "answers.jsonl", [{"id": r["id"], "group": group_of(r), "answer": a}
                                              for r, a in zip(records, answers)])
    result = {"share": share, "safety_examples": len(picks), "helpfulness_examples": len(helpful),
              "model": str(model), **measure(records, answers, scorers, cfg.seed)}
    write_atomic(d / "result.json", json.dumps(result) + "\n")
    return result


def main(cfg: SafetyScalingConfig, resume: bool = False) -> int:
    check_config(cfg)
    out = Path(cfg.out_dir)
    open_run(out, cfg, resume or (out / "config.yaml").is_file(), RESUME_KEYS, "safety-scaling")
    records = eval_records(cfg)
    helpful, safety = sampled_data(cfg, out) if cfg.tuning == "rejection_sampling" else dialog_data(cfg)
    if not safety:
        raise ConfigError("the policy gave no usable answer to any safety prompt: no safety data to scale")
    picks = nested_shares(len(safety), sorted(cfg.shares), cfg.seed)
    scorers = {axis: load_scorer(spec, axis, where=f"{axis}_rm")
               for axis, spec in (("helpfulness", cfg.helpfulness_rm), ("safety", cfg.safety_rm or cfg.helpfulness_rm))
               if spec}
    say(f"{len(helpful)} helpfulness and {len(safety)} safety examples; shares {sorted(cfg.shares)}; "
        f"{len(records)} held-out prompts -> {out}")
    results = [run_share(cfg, s, helpful, safety, picks[s], records, scorers, out) for s in sorted(cfg.shares)]
    study = {"tuning": cfg.tuning, "helpfulness_examples": len(helpful), "safety_examples": len(safety),
             "eval_prompts": {g: sum(group_of(r) == g for r in records) for g in GROUPS}, "results": results}
    write_atomic(out / "safety_scaling.json", json.dumps(study, indent=1) + "\n")
    plot_figure15(study, out / "figure15.png")
    plot_figure33(study, out / "figure33.png")
    for line in summary_lines(study):
        print(f"[safety-scaling] {line}", flush=True)
    print(f"[safety-scaling] wrote {out / 'safety_scaling.json'}, {out / 'figure15.png'}, {out / 'figure33.png'}",
          flush=True)
    return 0


def summary_lines(study: dict) -> list[str]:
    lines = []
    for r in study["results"]:
        s, h, g, fr = r.get("safety_rm", {}), r.get("helpfulness_rm", {}), r["graders"], r["false_refusal"]
        lines.append(
            f"{r['share']:>5.0%} safety ({r['safety_examples']:>4} ex.): safety RM mean {s.get('mean', float('nan')):.3f} "
            f"(p10 {s.get('low_tail', float('nan')):.3f}), helpfulness RM {h.get('mean', float('nan')):.3f}; "
            f"graders: violations {g['violation_rate'] if g['violation_rate'] is not None else float('nan'):.3f}, "
            f"helpfulness {g['helpfulness'] if g['helpfulness'] is not None else float('nan'):.3f}; false refusals "
            f"helpful {fr['helpful']['rate']:.3f}, borderline {fr['borderline']['rate']:.3f}")
    return lines


# ----------------------------------------------------------------------------- plots


def _x(study: dict) -> tuple[list[int], list[str]]:
    labels = [f"{r['share'] * 100:g}%" for r in study["results"]]
    return list(range(len(labels))), labels


def plot_figure15(study: dict, path: Path) -> None:
    """Figure 15: mean reward-model scores vs the safety share (left), the safety RM's score
    distribution per share (middle), and the world's judges (right)."""
    xs, labels = _x(study)
    res = study["results"]
    fig = Figure(figsize=(15, 4.2))
    a, b, c = fig.subplots(1, 3)
    for key, name in (("safety_rm", "safety RM (adversarial prompts)"), ("helpfulness_rm", "helpfulness RM (helpful prompts)")):
        if all(key in r for r in res):
            a.plot(xs, [r[key]["mean"] for r in res], marker="o", label=f"mean {name}")
    if all("safety_rm" in r for r in res):
        a.plot(xs, [r["safety_rm"]["low_tail"] for r in res], marker="v", ls="--", label="safety RM, 10th percentile")
        b.violinplot([r["safety_rm"]["scores"] for r in res], positions=xs, showmedians=True)
    a.set(xlabel="safety data share", ylabel="reward-model score", title="Mean score (Figure 15, left)")
    b.set(xlabel="safety data share", ylabel="safety RM score", title="Safety RM score distribution (Figure 15, right)")
    for key, name in (("violation_rate", "violation rate (Likert raters)"), ("helpfulness", "helpfulness (graders)")):
        ys = [r["graders"][key] for r in res]
        if all(y is not None for y in ys):
            c.plot(xs, ys, marker="o", label=name)
    c.set(xlabel="safety data share", title="The world's judges")
    for ax in (a, b, c):
        ax.set_xticks(xs, labels)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    c.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def plot_figure33(study: dict, path: Path) -> None:
    """Figure 33: the false-refusal rate on helpful and on borderline prompts vs the safety share."""
    xs, labels = _x(study)
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, group in zip(axes, ("helpful", "borderline")):
        rows = [r["false_refusal"][group] for r in study["results"]]
        ys = [x["rate"] * 100 for x in rows]
        err = [[y - x["ci95"][0] * 100 for y, x in zip(ys, rows)], [x["ci95"][1] * 100 - y for y, x in zip(ys, rows)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3)
        ax.set_xticks(xs, labels)
        ax.set(xlabel="safety data share", ylabel="false refusal rate (%)",
               title=f"{group.capitalize()} prompts (n={rows[0]['n']})")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def cli(argv: list[str]) -> int:
    return recipe_cli(argv, SafetyScalingConfig, main, "llama2 study safety-scaling", __doc__.split("\n\n")[0])
