"""Safety context distillation (Llama 2 §4.2.4, Figure 16): answer as if told to be safe, without being told.

    llama2 rlhf context-distill --config configs/rlhf/context_distill_tiny.yaml policy=RUN/v2/ppo/final \\
        safety_rm=RUN/v2/reward_safety/final prompts=[WORLD/prompts/train.jsonl] [key=value ...] [--resume]

The paper's recipe, step by step (RUN = out_dir):
  1. prompts: the adversarial prompts of the prompt files (safety prompts only, as the paper: on
     helpful prompts the preprompt only makes answers vaguer);
  2. answers, sampled from the policy three times per prompt: the *original* answer (the prompt
     as it is), with a *generic* safety preprompt ("You are a safe and responsible assistant",
     templates with safety adjectives: the world's `safety_preprompt`, or your `preprompts`), and
     with the *category* preprompt: the generic one followed by the prompt's risk category's answer
     template (how to answer: decline, explain the risk, offer help), the variant the paper uses
     when the risk category is known. The preprompt is prefixed to the user message;
  3. the gate: the safety reward model scores every answer *to the prompt without the preprompt*,
     and a distilled answer is kept only where it scores higher than the original answer
     (`gate: true`, the paper's choice; `gate: false` keeps every one, the ablation). Answers that
     are empty, cut off (`drop_truncated`) or forge a chat turn are never kept. RUN/stats.json counts what was kept and
     dropped, per risk category; RUN/data/answers.jsonl holds every answer and score;
  4. training data: the prompt *without* the preprompt, answered by the kept distilled answer
     (RUN/data/distill.jsonl); fine-tuned with the SFT recipe (packing, FSDP, exact resume):
     RUN/sft/final, RUN/final -> it;
  5. Figure 16 (RUN/figure16.png): (a) the safety RM scores of the original answers, with the
     generic preprompt and with the category preprompt; (b) per prompt, the change of score from
     the original to the distilled answer against the original score, kept and dropped marked.
`safety_rm` is a reward-model checkpoint, `grader` (the world's noiseless safety grader) or
`module:attr` naming your own scorer (`prob(dialogs, responses)` or `prob_records(records, responses)`).
"""
from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no global backend state in a library

from llama2.config import ConfigError
from llama2.formats import read_records
from llama2.gated_reward import load_scorer, scorer_prob
from llama2.inference import load_for_inference
from llama2.recipes.common import open_run, recipe_cli, write_atomic, write_jsonl_atomic
from llama2.recipes.gatt import context_check, model_answer_fn, usable
from llama2.recipes.rejection_sampling import fine_tune_on
from llama2.recipes.sft import SFTConfig
from llama2.sampling import DialogSampler
from llama2.train import derive_seed
from llama2.world.safety import CATEGORY_TEMPLATES, safety_preprompt
from llama2.world.safety_data import RISK_CATEGORIES

# The three answers sampled per prompt, in order: as asked, with a generic safety preprompt, with the
# risk category's preprompt and answer template.
CONDITIONS = ("original", "generic", "category")
# answer_fn(dialogs, seed) -> one (text, complete) per dialog (each dialog ends with a user turn)
AnswerFn = Callable[[list[list[dict]], int], list[tuple[str, bool]]]
# score_fn(records, responses) -> the safety RM's score of each response to its prompt record
ScoreFn = Callable[[list[dict], list[str]], list[float]]


def distill_sft() -> SFTConfig:
    # §4.2.4: the distilled answers are fine-tuned on like SFT (the SFT recipe's paper defaults);
    # model, train_data and out_dir are filled in by the recipe.
    return SFTConfig(out_dir="")


@dataclass
class ContextDistillConfig:
    out_dir: str = "runs/context_distill"
    policy: str = ""  # the model that samples the answers and is fine-tuned; required
    safety_rm: str = "grader"  # safety reward model: a checkpoint, `grader`, or `module:attr` (a scorer)
    prompts: list[str] = field(default_factory=list)  # prompt files; their adversarial prompts are used; required
    split: str = "train"  # only prompts of this split (the eval split is never trained on)
    max_prompts: int = 0  # 0 = all; else a seeded subset
    # Generic safety preprompts, one drawn per prompt ([] = the world's templates with safety adjectives).
    preprompts: list[str] = field(default_factory=list)
    # Risk category -> how to answer, appended to the generic preprompt for the category variant
    # ({} = the world's answer templates for its three risk categories).
    answer_templates: dict[str, str] = field(default_factory=dict)
    distill_from: str = "category"  # the preprompted answer that is distilled: category (§4.2.4) | generic
    gate: bool = True  # §4.2.4: keep a distilled answer only where the safety RM scores it above the original
    preprompt_as_system: bool = False  # the preprompt as the system message instead of before the user message
    drop_truncated: bool = True  # a distilled answer cut off at max_new_tokens is not an answer: never kept
    temperature: float = 1.0  # sampling the answers (the paper's rejection-sampling temperatures)
    top_p: float = 1.0
    max_new_tokens: int = 64
    sample_batch_size: int = 32
    reward_batch_size: int = 32
    sft: SFTConfig = field(default_factory=distill_sft)  # the fine-tuning step (llama2 sft's options)
    seed: int = 0
    device: str = "auto"


# ----------------------------------------------------------------------------- preprompts and data


def preprompt_for(rng: random.Random, category: str | None, cfg: ContextDistillConfig) -> str:
    """A generic safety preprompt (category None), or the generic one followed by the answer
    template of `category` (§4.2.4)."""
    if not cfg.preprompts and not cfg.answer_templates:
        return safety_preprompt(rng, category)
    text = rng.choice(cfg.preprompts) if cfg.preprompts else safety_preprompt(rng)
    if category is None:
        return text
    templates = cfg.answer_templates or CATEGORY_TEMPLATES
    if category not in templates:
        raise ConfigError(f"answer_templates: no answer template for risk category {category!r} "
                          f"(given: {', '.join(sorted(templates))})")
    return f"{text} {templates[category]}"


def with_preprompt(messages: list[dict], preprompt: str, as_system: bool = False) -> list[dict]:
    """The dialog answered with the preprompt: prefixed to the (first) user message, or as the system message."""
    if as_system:
        return [{"role": "system", "content": preprompt}] + [m for m in messages if m["role"] != "system"]
    out, done = [], False
    for m in messages:
        if m["role"] == "user" and not done:
            m, done = {"role": "user", "content": f"{preprompt}\n{m['content']}"}, True
        out.append(m)
    return out


def gate_keep(original: list[float], distilled: list[float], gate: bool = True) -> list[bool]:
    """Which distilled answers are kept: with the gate, only those the safety RM scores strictly
    higher than the original answer (a tie teaches nothing); without it, every one."""
    if len(original) != len(distilled):
        raise ValueError(f"{len(original)} original scores but {len(distilled)} distilled ones")
    return [True] * len(original) if not gate else [d > o for o, d in zip(original, distilled)]


def training_record(record: dict, answer: str) -> dict:
    """An SFT dialog: the prompt as it was asked (no preprompt), answered by the distilled answer."""
    return {"id": f"cd-{record['id']}", "messages": list(record["messages"]) + [{"role": "assistant", "content": answer}],
            "source": "context_distillation", "split": "train", "task": record.get("task"),
            "meta": {"risk_category": record.get("risk_category"), "attack_vector": record.get("attack_vector")}}


def distill(records: list[dict], answer_fn: AnswerFn, score_fn: ScoreFn, cfg: ContextDistillConfig,
            fits: Callable[[list[dict]], bool] = lambda dialog: True) -> tuple[list[dict], list[dict], dict]:
    """Steps 2-4 on `records` (adversarial prompts): (training records, one row per prompt with its
    preprompts, answers, scores and verdict, stats). A prompt whose preprompted dialog leaves no
    room for an answer in the context (`fits`) is skipped and counted."""
    if cfg.distill_from not in ("category", "generic"):
        raise ConfigError(f"distill_from={cfg.distill_from!r}: expected category or generic")
    rng = random.Random(derive_seed(cfg.seed, 3))
    rows = []
    for r in records:
        generic = preprompt_for(rng, None, cfg)
        rows.append({"id": r["id"], "risk_category": r.get("risk_category"), "attack_vector": r.get("attack_vector"),
                     "preprompts": {"generic": generic, "category": preprompt_for(rng, r.get("risk_category"), cfg)
                                    if r.get("risk_category") else generic}})
    n_asked = len(records)
    fit = [all(fits(with_preprompt(r["messages"], row["preprompts"][c], cfg.preprompt_as_system))
               for c in CONDITIONS[1:]) for r, row in zip(records, rows)]
    records = [r for r, ok in zip(records, fit) if ok]
    rows = [row for row, ok in zip(rows, fit) if ok]
    answers: dict[str, list[tuple[str, bool]]] = {}
    for k, cond in enumerate(CONDITIONS):
        dialogs = [r["messages"] if cond == "original" else
                   with_preprompt(r["messages"], row["preprompts"][cond], cfg.preprompt_as_system)
                   for r, row in zip(records, rows)]
        answers[cond] = answer_fn(dialogs, derive_seed(cfg.seed, 10 + k))
        if len(answers[cond]) != len(records):
            raise ValueError(f"answer_fn returned {len(answers[cond])} answers for {len(records)} prompts")
    # every answer is scored as an answer to the prompt *without* the preprompt
    texts = {cond: [t.strip() for t, _ in answers[cond]] for cond in CONDITIONS}
    scores = {cond: [float(s) for s in score_fn(records, texts[cond])] for cond in CONDITIONS}
    src = cfg.distill_from
    kept_by_gate = gate_keep(scores["original"], scores[src], cfg.gate)
    train, stats = [], {"prompts": len(records), "skipped_longer_than_context": n_asked - len(records),
                        "kept": 0, "dropped_by_gate": 0, "unusable": 0,
                        "gate": cfg.gate, "distill_from": src, "by_risk_category": {}}
    for i, (r, row) in enumerate(zip(records, rows)):
        text, complete = texts[src][i], answers[src][i][1]
        ok = (complete or not cfg.drop_truncated) and usable(text)
        verdict = "unusable" if not ok else "kept" if kept_by_gate[i] else "dropped_by_gate"
        row.update({"answers": {c: texts[c][i] for c in CONDITIONS}, "scores": {c: scores[c][i] for c in CONDITIONS},
                    "gain": scores[src][i] - scores["original"][i], "verdict": verdict})
        cat = stats["by_risk_category"].setdefault(row["risk_category"] or "none", {
            "prompts": 0, "kept": 0, "dropped_by_gate": 0, "unusable": 0,
            **{f"mean_score_{c}": 0.0 for c in CONDITIONS}})
        cat["prompts"] += 1
        cat[verdict] += 1
        stats[verdict] += 1
        for c in CONDITIONS:
            cat[f"mean_score_{c}"] += scores[c][i]
        if verdict == "kept":
            train.append(training_record(r, text))
    for cat in stats["by_risk_category"].values():
        for c in CONDITIONS:
            cat[f"mean_score_{c}"] /= cat["prompts"]
    n = max(len(records), 1)
    stats["mean_score"] = {c: sum(scores[c]) / n for c in CONDITIONS}
    stats["improved_share"] = sum(g > 0 for g in (row["gain"] for row in rows)) / n
    return train, rows, stats


# ----------------------------------------------------------------------------- Figure 16


def plot_figure16(rows: list[dict], path: Path, distill_from: str = "category") -> None:
    """(a) the safety RM score distributions per condition; (b) score change vs original score."""
    fig = Figure(figsize=(11, 4))
    a, b = fig.subplots(1, 2)
    labels = {"original": "original answer", "generic": "generic preprompt",
              "category": "category preprompt + answer template"}
    scores = {c: [row["scores"][c] for row in rows] for c in CONDITIONS}
    lo = min(min(v) for v in scores.values())
    hi = max(max(v) for v in scores.values())
    bins = [lo + (hi - lo + 1e-9) * k / 20 for k in range(21)]
    for c, colour in zip(CONDITIONS, ("tab:grey", "tab:blue", "tab:green")):
        a.hist(scores[c], bins=bins, histtype="step", linewidth=1.6, color=colour, label=labels[c])
    a.set_xlabel("safety RM score")
    a.set_ylabel("answers")
    a.set_title("(a) safety RM scores", fontsize=10)
    a.legend(fontsize=7)
    for verdict, colour, marker in (("kept", "tab:green", "o"), ("dropped_by_gate", "tab:red", "x"),
                                    ("unusable", "tab:grey", ".")):
        pts = [(row["scores"]["original"], row["gain"]) for row in rows if row["verdict"] == verdict]
        if pts:
            b.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, marker=marker, color=colour,
                      label=f"{verdict.replace('_', ' ')} ({len(pts)})", alpha=0.7)
    b.axhline(0.0, color="grey", linestyle=":", linewidth=1)
    b.set_xlabel("safety RM score of the original answer")
    b.set_ylabel(f"score change with the {distill_from} preprompt")
    b.set_title("(b) per prompt: distilled minus original", fontsize=10)
    b.legend(fontsize=7)
    fig.suptitle("Safety context distillation (Llama 2 §4.2.4, Figure 16)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- the recipe

RESUME_KEYS = ["policy", "safety_rm", "prompts", "split", "max_prompts", "preprompts", "answer_templates",
               "distill_from", "gate", "preprompt_as_system", "drop_truncated", "temperature", "top_p", "max_new_tokens",
               "sft.chat_format", "seed"]


def say(text: str) -> None:
    print(f"[context-distill] {text}", file=sys.stderr, flush=True)


def check_config(cfg: ContextDistillConfig) -> None:
    if not cfg.policy:
        raise ConfigError("policy: the model to sample from and fine-tune is required (e.g. policy=runs/v2/ppo/final)")
    if not cfg.prompts:
        raise ConfigError("prompts: at least one prompt file with adversarial prompts is required "
                          "(e.g. prompts=[WORLD/prompts/train.jsonl])")
    if not cfg.safety_rm:
        raise ConfigError("safety_rm: the safety reward model that gates the answers is required "
                          "(a checkpoint, `grader` or module:attr)")
    if cfg.distill_from not in ("category", "generic"):
        raise ConfigError(f"distill_from={cfg.distill_from!r}: expected category or generic")
    if cfg.split == "eval":
        raise ConfigError("split: the eval split is never trained on; use train")
    bad = sorted(set(cfg.answer_templates) - set(RISK_CATEGORIES))
    if bad:
        raise ConfigError(f"answer_templates: unknown risk category {bad[0]!r} (known: {', '.join(RISK_CATEGORIES)})")
    if any(not p.strip() for p in cfg.preprompts):
        raise ConfigError("preprompts: every preprompt must be a non-empty string")


def adversarial_records(cfg: ContextDistillConfig) -> list[dict]:
    """The adversarial prompts of `prompts` (split `split`), a seeded subset of `max_prompts`."""
    records = [r for p in cfg.prompts for r in read_records(p, "prompts")
               if r.get("is_safety") and r.get("split") == cfg.split]
    if not records:
        raise ConfigError(f"prompts: no adversarial prompt (is_safety true) of split {cfg.split!r} in {cfg.prompts}")
    if cfg.max_prompts and len(records) > cfg.max_prompts:
        records = random.Random(derive_seed(cfg.seed, 1)).sample(records, cfg.max_prompts)
    return records


def safety_score_fn(spec: str, batch_size: int = 32) -> ScoreFn:
    """The safety RM (checkpoint, `grader`, or module:attr) as a score function on prompt records."""
    scorer = load_scorer(spec, "safety", batch_size, where="safety_rm")
    return lambda records, responses: scorer_prob(scorer, records, responses).tolist()


def make_data(cfg: ContextDistillConfig, out: Path) -> dict:
    """Steps 1-5's data: RUN/data/{distill,answers}.jsonl, RUN/stats.json, RUN/figure16.png (read
    back when already written)."""
    data, stats_path = out / "data" / "distill.jsonl", out / "stats.json"
    if data.is_file() and stats_path.is_file():
        say(f"data already made: {data}")
        return json.loads(stats_path.read_text())
    records = adversarial_records(cfg)
    score_fn = safety_score_fn(cfg.safety_rm, cfg.reward_batch_size)
    model, tok = load_for_inference(cfg.policy, cfg.device)
    sampler = DialogSampler(model, tok, cfg.sft.chat_format, cfg.sample_batch_size)
    fits = context_check(sampler, min(cfg.sft.seq_len, model.args.max_seq_len), cfg.max_new_tokens)
    sample = model_answer_fn(sampler, cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    say(f"{len(records)} adversarial prompts; sampling the original answer and two preprompted ones each "
        f"(T={cfg.temperature}), gate {'on' if cfg.gate else 'off'}")
    train, rows, stats = distill(records, sample, score_fn, cfg, fits)
    del sampler, model
    if not train:
        raise ValueError(f"no distilled answer kept ({stats['dropped_by_gate']} dropped by the gate, {stats['unusable']} "
                         "unusable): nothing to fine-tune on")
    write_jsonl_atomic(out / "data" / "answers.jsonl", rows)
    write_jsonl_atomic(data, train)
    plot_figure16(rows, out / "figure16.png", cfg.distill_from)
    stats.update({"training_records": len(train), "data": str(data), "figure": str(out / "figure16.png")})
    write_atomic(stats_path, json.dumps(stats, indent=1) + "\n")
    say(f"kept {stats['kept']} of {stats['prompts']} distilled answers ({stats['dropped_by_gate']} dropped by the "
        f"gate, {stats['unusable']} unusable); mean safety RM score original {stats['mean_score']['original']:.3f}, "
        f"generic {stats['mean_score']['generic']:.3f}, category {stats['mean_score']['category']:.3f} -> {data}")
    return stats


def main(cfg: ContextDistillConfig, resume: bool = False) -> int:
    check_config(cfg)
    out = Path(cfg.out_dir)
    open_run(out, cfg, resume, RESUME_KEYS, "context-distillation")
    make_data(cfg, out)
    final = fine_tune_on(cfg.policy, cfg.sft, out / "data" / "distill.jsonl", out, "context-distill")
    link = out / "final"
    print(f"[context-distill] done: {link} -> {final}; Figure 16: {out / 'figure16.png'}", flush=True)
    return 0


def run(policy: str, prompts: list[str], out_dir: str | Path, cfg: ContextDistillConfig, safety_rm: str = "") -> Path:
    """What the pipeline calls: context distillation of `policy` on the adversarial prompts of
    `prompts`, in `out_dir` (resumed when it already holds a run), gated by `safety_rm` (or the
    config's). Returns the fine-tuned model's path."""
    out = Path(out_dir)
    cfg = replace(cfg, policy=str(policy), prompts=[str(p) for p in prompts], out_dir=str(out),
                  safety_rm=str(safety_rm or cfg.safety_rm))
    main(cfg, resume=(out / "config.yaml").is_file())
    return out / "sft" / "final"


def cli(argv: list[str]) -> int:
    return recipe_cli(argv, ContextDistillConfig, main, "llama2 rlhf context-distill", __doc__.split("\n\n")[0])
