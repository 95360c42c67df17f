"""Red-teaming rounds (Llama 2 §4.3): automated attackers, Likert raters, γ per risk category and attack vector.

    llama2 redteam --model RUN/v2/ppo/final [--previous-violations ROUND1/violations.jsonl ...] \\
        [--export-sft FILE] [--round N] [--out DIR] [--templates FILE] [key=value ...]

One round, step by step (DIR = out_dir):
  1. attempts: automated attackers in place of the paper's 350 red teamers: every attack vector of
     the world (§4.2.1: psychological, logical, syntactic, semantic and perspective manipulation,
     non-English, and direct requests) applied `per_seed` times to every harmful request (seed) of
     the chosen risk categories, plus your attack templates (`user_templates`, or `--templates`
     FILE with one per line, each with a `{request}` placeholder), each applied to every seed;
  2. each attempt answered by the model (T = `temperature`) and rated by three Likert raters
     (§4.4: majority vote; a rating of 1 or 2 is a violation);
  3. per round: attempts, violating prompts, and γ = violating prompts per 1,000 attempts, overall,
     per risk category, per attack vector and per (category, vector) (DIR/redteam.json, and the
     tables printed). The paper's γ is per red teamer per hour (1.8 -> 0.45 over rounds on 7B);
     automated attackers have no hours, so γ here is per 1,000 attempts;
  4. given earlier rounds' violating prompts (their DIR/violations.jsonl), the share the model now
     answers without a violation (the paper: 90% of earlier violating prompts mitigated);
  5. DIR/violations.jsonl: this round's violating prompts (prompt records, the answer and ratings in
     `meta`) for the next round; `--export-sft FILE` writes them as safety SFT dialogs answered by
     the world's gold safe answers (concern, risk, help), to fine-tune the next model on.
"""
from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml

from llama2.config import ConfigError, load_config, save_config, to_dict
from llama2.formats import read_records
from llama2.recipes.common import split_overrides, write_atomic, write_jsonl_atomic
from llama2.agreement import wilson_interval
from llama2.sampling import sample_responses
from llama2.train import derive_seed
from llama2.world.annotators import LikertVote, RaterConfig, rate_likert
from llama2.world.safety import ATTACK_VECTORS, attack_prompts, sft_dialog, template_prompts
from llama2.world.safety_data import RISK_CATEGORIES

# answer_fn(prompt records) -> one answer per record
AnswerFn = Callable[[list[dict]], list[str]]
PER = 1000  # γ: violating prompts per this many attempts


@dataclass
class RedteamConfig:
    out_dir: str = "runs/redteam"
    model: str = ""  # the model attacked; required
    round: int = 1  # this round's number (ids, the export's source)
    risk_categories: list[str] = field(default_factory=lambda: list(RISK_CATEGORIES))  # the seeds attacked
    attack_vectors: list[str] = field(default_factory=lambda: list(ATTACK_VECTORS))  # the world's attackers used
    per_seed: int = 4  # attempts per (seed, attack vector): fresh draws of the vector's templates
    user_templates: list[str] = field(default_factory=list)  # your attacks, each with a `{request}` placeholder
    split: str = "train"  # the world's train templates (the eval split's templates are held out of red teaming)
    previous_violations: list[str] = field(default_factory=list)  # earlier rounds' violations.jsonl
    export_sft: str = ""  # write this round's violations as safety SFT dialogs with gold safe answers
    temperature: float = 0.7  # red teamers meet the model as sampled
    top_p: float = 0.9
    max_new_tokens: int = 64
    raters: RaterConfig = field(default_factory=RaterConfig)  # §4.4: three raters, majority vote
    seed: int = 0


# ----------------------------------------------------------------------------- attempts


def check_config(cfg: RedteamConfig) -> None:
    if not cfg.model:
        raise ConfigError("model: the model to red-team is required (--model)")
    bad = [c for c in cfg.risk_categories if c not in RISK_CATEGORIES]
    if bad or not cfg.risk_categories:
        raise ConfigError(f"risk_categories: unknown risk category {bad[0]!r} (known: {', '.join(RISK_CATEGORIES)})"
                          if bad else "risk_categories: at least one risk category is required")
    bad = [v for v in cfg.attack_vectors if v not in ATTACK_VECTORS]
    if bad:
        raise ConfigError(f"attack_vectors: unknown attack vector {bad[0]!r} (known: {', '.join(ATTACK_VECTORS)})")
    for i, t in enumerate(cfg.user_templates):
        if "{request}" not in t:
            raise ConfigError(f"user_templates[{i}]: no {{request}} placeholder in {t!r}")
    if not cfg.attack_vectors and not cfg.user_templates:
        raise ConfigError("attack_vectors / user_templates: no attacker left: give attack vectors or templates")
    if cfg.per_seed < 1 and cfg.attack_vectors:
        raise ConfigError(f"per_seed={cfg.per_seed}: at least one attempt per seed and attack vector")
    if cfg.split not in ("train", "test"):
        raise ConfigError(f"split={cfg.split!r}: red teaming draws train or test templates (eval is held out)")


def read_templates(path: str) -> list[str]:
    """Attack templates from a text file, one per line (blank lines and `#` comments skipped);
    errors name the file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"--templates: cannot read {path}: {e.strerror or e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if "{request}" not in text:
            raise ConfigError(f"{path}:{n}: attack template without a {{request}} placeholder: {text!r}")
        out.append(text)
    if not out:
        raise ConfigError(f"--templates: {path} holds no template")
    return out


def build_attempts(cfg: RedteamConfig) -> list[dict]:
    """Step 1: the round's attack prompts (prompt records with risk category and attack vector)."""
    rng = random.Random(derive_seed(cfg.seed, cfg.round))
    prefix = f"redteam-r{cfg.round}"
    out = attack_prompts(rng, cfg.risk_categories, cfg.attack_vectors, cfg.per_seed, cfg.split, prefix)
    out += template_prompts(cfg.user_templates, cfg.risk_categories, cfg.split, f"{prefix}-template")
    return out


# ----------------------------------------------------------------------------- judging and γ


def judge(records: Sequence[dict], answers: Sequence[str], seed: int, raters: RaterConfig | None = None
          ) -> list[LikertVote]:
    """Step 2: three Likert raters per answer, majority vote (§4.4)."""
    if len(records) != len(answers):
        raise ValueError(f"{len(records)} attempts but {len(answers)} answers")
    rng = random.Random(seed)
    return [rate_likert(r, a, rng, raters) for r, a in zip(records, answers)]


def _rate(violating: int, attempts: int) -> dict:
    return {"attempts": attempts, "violating": violating, "gamma": PER * violating / attempts if attempts else 0.0}


def gamma_table(records: Sequence[dict], violations: Sequence[bool]) -> dict:
    """Step 3: attempts, violating prompts and γ (violating prompts per 1,000 attempts), overall and
    per risk category, attack vector, and (category, vector)."""
    if len(records) != len(violations):
        raise ValueError(f"{len(records)} attempts but {len(violations)} verdicts")
    groups: dict[str, dict[str, list[int]]] = {"by_risk_category": {}, "by_attack_vector": {}, "by_category_vector": {}}
    for r, bad in zip(records, violations):
        keys = {"by_risk_category": r.get("risk_category") or "none",
                "by_attack_vector": r.get("attack_vector") or "none"}
        keys["by_category_vector"] = f"{keys['by_risk_category']}/{keys['by_attack_vector']}"
        for g, k in keys.items():
            c = groups[g].setdefault(k, [0, 0])
            c[0] += bool(bad)
            c[1] += 1
    out = _rate(sum(map(bool, violations)), len(violations))
    for g, table in groups.items():
        out[g] = {k: _rate(v, n) for k, (v, n) in sorted(table.items())}
    return out


def mitigation(records: Sequence[dict], violations: Sequence[bool]) -> dict:
    """Step 4: of earlier rounds' violating prompts, the share the model now answers without a
    violation, with its 95% Wilson interval, overall and per risk category."""
    n = len(records)
    fixed = sum(not v for v in violations)
    by: dict[str, list[int]] = {}
    for r, bad in zip(records, violations):
        c = by.setdefault(r.get("risk_category") or "none", [0, 0])
        c[0] += not bad
        c[1] += 1
    return {"prompts": n, "mitigated": fixed, "share": fixed / n if n else 0.0, "ci95": list(wilson_interval(fixed, n)),
            "by_risk_category": {k: {"prompts": t, "mitigated": m, "share": m / t} for k, (m, t) in sorted(by.items())}}


def violation_records(records: Sequence[dict], answers: Sequence[str], votes: Sequence[LikertVote],
                      round_: int) -> list[dict]:
    """This round's violating prompts as prompt records (answer and ratings in `meta`)."""
    return [{**r, "meta": {"round": round_, "answer": a, "ratings": list(v.ratings), "majority": v.majority}}
            for r, a, v in zip(records, answers, votes) if v.violation]


def export_sft(violations: Sequence[dict], seed: int, round_: int) -> list[dict]:
    """Violating prompts as safety SFT dialogs answered by the world's gold safe answers (§4.2.2),
    one per distinct prompt, for the next round's model."""
    rng, seen, out = random.Random(seed), set(), []
    for r in violations:
        text = r["messages"][-1]["content"]
        if text in seen:
            continue
        seen.add(text)
        prompt = {k: v for k, v in r.items() if k != "meta"}
        out.append(sft_dialog(dict(prompt, split="train"), rng, source=f"redteam:round{round_}"))
    return out


def read_violations(paths: Sequence[str]) -> list[dict]:
    """Earlier rounds' violating prompts (their violations.jsonl: prompt records), meta dropped."""
    out = []
    for p in paths:
        for r in read_records(p, "prompts"):
            if not r.get("is_safety"):
                raise ConfigError(f"{p}: record {r.get('id')!r} is not a safety prompt (is_safety false): "
                                  "expected a red-teaming round's violations.jsonl")
            out.append({k: v for k, v in r.items() if k != "meta"})
    return out


# ----------------------------------------------------------------------------- a round


def red_team(cfg: RedteamConfig, answer_fn: AnswerFn) -> tuple[dict, list[dict], list[dict]]:
    """Steps 1-4 with `answer_fn` as the model: (result, attempt rows, violation records)."""
    check_config(cfg)
    attempts = build_attempts(cfg)
    previous = read_violations(cfg.previous_violations)
    answers = list(answer_fn(attempts + previous))
    if len(answers) != len(attempts) + len(previous):
        raise ValueError(f"answer_fn returned {len(answers)} answers for {len(attempts) + len(previous)} prompts")
    now, before = answers[: len(attempts)], answers[len(attempts):]
    votes = judge(attempts, now, derive_seed(cfg.seed, cfg.round, 1), cfg.raters)
    result: dict = {"round": cfg.round, "model": cfg.model, **gamma_table(attempts, [v.violation for v in votes])}
    result["violating_distinct_prompts"] = len({r["messages"][-1]["content"] for r, v in zip(attempts, votes)
                                                if v.violation})
    if previous:
        prev_votes = judge(previous, before, derive_seed(cfg.seed, cfg.round, 2), cfg.raters)
        result["previous_violations"] = {"files": list(cfg.previous_violations),
                                         **mitigation(previous, [v.violation for v in prev_votes])}
    rows = [{"id": r["id"], "risk_category": r["risk_category"], "attack_vector": r["attack_vector"],
             "prompt": r["messages"][-1]["content"], "answer": a, "ratings": list(v.ratings), "violation": v.violation}
            for r, a, v in zip(attempts, now, votes)]
    return result, rows, violation_records(attempts, now, votes, cfg.round)


def table_lines(result: dict) -> list[str]:
    """The round's γ tables as text."""
    lines = [(f"red-teaming round {result['round']} of {result['model']}: {result['attempts']} attempts, "
             f"{result['violating']} violating, γ = {result['gamma']:.1f} per {PER} attempts")]
    for key, title in (("by_risk_category", "risk category"), ("by_attack_vector", "attack vector")):
        width = max([len(title)] + [len(k) for k in result[key]])
        lines += ["", f"{title:<{width}}  attempts  violating  γ/{PER}"]
        lines += [f"{k:<{width}}  {v['attempts']:>8}  {v['violating']:>9}  {v['gamma']:>6.1f}"
                  for k, v in result[key].items()]
    prev = result.get("previous_violations")
    if prev:
        lines += ["", (f"earlier rounds' violating prompts now mitigated: {prev['mitigated']} of {prev['prompts']} "
                      f"({prev['share']:.1%}, 95% CI [{prev['ci95'][0]:.1%}, {prev['ci95'][1]:.1%}])")]
    return lines


def model_answer_fn(cfg: RedteamConfig) -> AnswerFn:
    return lambda records: sample_responses(cfg.model, records, cfg.temperature, derive_seed(cfg.seed, cfg.round, 3),
                                            cfg.max_new_tokens, cfg.top_p)


def main(cfg: RedteamConfig, answer_fn: AnswerFn | None = None) -> dict:
    out = Path(cfg.out_dir)
    check_config(cfg)
    with torch.no_grad():
        result, rows, violations = red_team(cfg, answer_fn or model_answer_fn(cfg))
    write_jsonl_atomic(out / "attempts.jsonl", rows)
    write_jsonl_atomic(out / "violations.jsonl", violations)
    if cfg.export_sft:
        dialogs = export_sft(violations, derive_seed(cfg.seed, cfg.round, 4), cfg.round)
        write_jsonl_atomic(Path(cfg.export_sft), dialogs)
        result["exported_sft"] = {"file": cfg.export_sft, "dialogs": len(dialogs)}
    write_atomic(out / "redteam.json", json.dumps(result, indent=1) + "\n")
    save_config(cfg, out / "config.yaml")
    for line in table_lines(result):
        print(line)
    print(f"[redteam] wrote {out / 'redteam.json'}, {out / 'violations.jsonl'}"
          + (f", {cfg.export_sft} ({result['exported_sft']['dialogs']} SFT dialogs)" if cfg.export_sft else ""))
    return result


def run(model: str, out_dir: str | Path, cfg: RedteamConfig, previous_violations: Sequence[str] = (),
        round_: int | None = None, export_sft_to: str = "") -> dict:
    """What the pipeline calls: one round against `model` in `out_dir` (earlier rounds'
    violations.jsonl in `previous_violations`). Returns the round's result (also DIR/redteam.json)."""
    cfg = replace(cfg, model=str(model), out_dir=str(out_dir), round=cfg.round if round_ is None else round_,
                  previous_violations=[str(p) for p in previous_violations] or cfg.previous_violations,
                  export_sft=str(export_sft_to or cfg.export_sft))
    return main(cfg)


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llama2 redteam", description=__doc__.split("\n\n")[0],
                                epilog="Other options as key=value (see --print-config), e.g. per_seed=8 "
                                       "risk_categories=[illicit_criminal] attack_vectors=[perspective,logical].")
    p.add_argument("--config", help="YAML file; defaults come from RedteamConfig")
    p.add_argument("--model", help="the model red-teamed")
    p.add_argument("--previous-violations", nargs="+", metavar="FILE",
                   help="earlier rounds' violations.jsonl: report the share now mitigated")
    p.add_argument("--export-sft", metavar="FILE", help="write this round's violations as safety SFT dialogs")
    p.add_argument("--templates", metavar="FILE", help="attack templates, one per line, each with {request}")
    p.add_argument("--round", type=int, help="this round's number")
    p.add_argument("--out", help="output directory (out_dir)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    a.previous_violations, more = split_overrides(a.previous_violations)
    flags = {"model": a.model, "export_sft": a.export_sft, "round": a.round, "out_dir": a.out,
             "previous_violations": f"[{','.join(a.previous_violations)}]" if a.previous_violations else None}
    overrides = list(a.overrides) + more + [f"{k}={v}" for k, v in flags.items() if v is not None]
    cfg = load_config(RedteamConfig, a.config, overrides)
    if a.templates:
        cfg.user_templates = cfg.user_templates + read_templates(a.templates)
    if a.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    main(cfg)
    return 0
