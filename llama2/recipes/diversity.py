"""Diversity of answers vs temperature (Llama 2 §5.1, Figure 21): Self-BLEU on factual and creative prompts.

    llama2 evaluate diversity --model RUN/v2/ppo/final [--model RUN/sft/final ...] --samples 25 \\
        --temperatures 0.1 0.3 0.5 0.7 0.9 1.1 1.3 1.5 --prompts WORLD/prompts/eval.jsonl [--out DIR] [key=value ...]

The paper samples 25 answers per prompt at each temperature and measures their diversity with
Self-BLEU: each answer is scored by BLEU against the other answers to the same prompt as references
(sacrebleu's sentence BLEU), the scores averaged over answers and prompts; 0 to 100, lower is more
diverse. It found RLHF models keep factual answers near-identical at any temperature (the fact does
not change) while creative answers still diversify as the temperature rises. Here: the world's
factual prompts (`factual_tasks`: fact questions) against its creative ones (`creative_tasks`:
sentences and lists to invent), for every model given. Writes DIR/diversity.json and
DIR/self_bleu.png (Self-BLEU vs temperature per model and prompt type).
"""
from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from matplotlib.figure import Figure  # no pyplot: no global backend state in a library
from sacrebleu.metrics import BLEU

from llama2.config import ConfigError, load_config, save_config, to_dict
from llama2.formats import read_records
from llama2.inference import load_for_inference
from llama2.recipes.common import split_overrides, write_atomic
from llama2.sampling import DialogSampler
from llama2.train import derive_seed

PROMPT_TYPES = ("factual", "creative")
# sample_fn(dialogs, n, temperature, seed) -> n answers per dialog
SampleFn = Callable[[list[list[dict]], int, float, int], list[list[str]]]
# Sentence-level BLEU as sacrebleu's `sentence_bleu` computes it (exponential smoothing, effective order).
_BLEU = BLEU(effective_order=True)


@dataclass
class DiversityConfig:
    out_dir: str = "runs/diversity"
    models: list[str] = field(default_factory=list)  # models compared; required
    prompts: list[str] = field(default_factory=list)  # prompt files (the world's eval split); required
    factual_tasks: list[str] = field(default_factory=lambda: ["fact"])  # prompts of these tasks are "factual"
    creative_tasks: list[str] = field(default_factory=lambda: ["creative"])  # and of these "creative"
    prompts_per_type: int = 20  # a seeded subset of each type
    samples: int = 25  # §5.1: 25 answers per prompt and temperature
    # §5.1 / Figure 21: temperatures from 0.1 to 1.5
    temperatures: list[float] = field(default_factory=lambda: [round(0.1 * k, 1) for k in range(1, 16)])
    top_p: float = 1.0  # the temperature alone shapes the distribution
    max_new_tokens: int = 48
    chat_format: str = "auto"
    sample_batch_size: int = 64
    seed: int = 0
    device: str = "auto"


def self_bleu(samples: Sequence[str]) -> float:
    """Self-BLEU of one prompt's answers: the mean over answers of the sentence BLEU of each against
    all the others as references (0-100; identical answers score 100, lower is more diverse)."""
    if len(samples) < 2:
        raise ValueError(f"Self-BLEU needs at least two samples, got {len(samples)}")
    scores = [_BLEU.sentence_score(s, list(samples[:i]) + list(samples[i + 1:])).score for i, s in enumerate(samples)]
    return sum(scores) / len(scores)


def select_prompts(records: Sequence[dict], cfg: DiversityConfig) -> dict[str, list[dict]]:
    """A seeded subset of `prompts_per_type` single-turn prompts of each type."""
    rng = random.Random(derive_seed(cfg.seed, 1))
    out = {}
    for kind, tasks in (("factual", cfg.factual_tasks), ("creative", cfg.creative_tasks)):
        pool = [r for r in records if r.get("task") in tasks and len(r["messages"]) == 1]
        if not pool:
            raise ConfigError(f"{kind}_tasks: no single-turn prompt of task(s) {tasks} in {cfg.prompts}")
        out[kind] = rng.sample(pool, min(cfg.prompts_per_type, len(pool)))
    return out


def diversity(prompt_sets: dict[str, list[dict]], sample_fn: SampleFn, temperatures: Sequence[float], samples: int,
              seed: int = 0) -> dict[str, list[dict]]:
    """Per prompt type, per temperature: Self-BLEU averaged over prompts (and its spread)."""
    out: dict[str, list[dict]] = {}
    for k, (kind, records) in enumerate(prompt_sets.items()):
        rows = []
        for j, t in enumerate(temperatures):
            answers = sample_fn([r["messages"] for r in records], samples, float(t), derive_seed(seed, k, j))
            if len(answers) != len(records) or any(len(a) != samples for a in answers):
                raise ValueError(f"sample_fn must return {samples} answers for each of {len(records)} prompts")
            per_prompt = [self_bleu([a.strip() for a in group]) for group in answers]
            mean = sum(per_prompt) / len(per_prompt)
            sd = (sum((x - mean) ** 2 for x in per_prompt) / max(len(per_prompt) - 1, 1)) ** 0.5
            rows.append({"temperature": float(t), "self_bleu": mean, "sd": sd, "prompts": len(records),
                         "distinct_share": sum(len(set(g)) for g in answers) / (len(records) * samples)})
        out[kind] = rows
    return out


def plot_self_bleu(result: dict, path: Path) -> None:
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    for (name, by_type), colour in zip(result["models"].items(), colours * 4):
        for kind, style in zip(PROMPT_TYPES, ("-", "--")):
            rows = by_type.get(kind, [])
            ax.plot([r["temperature"] for r in rows], [r["self_bleu"] for r in rows], style, marker="o", markersize=3,
                    color=colour, label=f"{name} ({kind})")
    ax.set_xlabel("temperature")
    ax.set_ylabel("Self-BLEU (lower = more diverse)")
    ax.set_title("Diversity vs temperature (Llama 2 §5.1, Figure 21)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def model_sample_fn(path: str, cfg: DiversityConfig) -> SampleFn:
    model, tok = load_for_inference(path, cfg.device)
    sampler = DialogSampler(model, tok, cfg.chat_format, cfg.sample_batch_size)

    def sample(dialogs: list[list[dict]], n: int, temperature: float, seed: int) -> list[list[str]]:
        outs = sampler.sample(dialogs, n, temperature, cfg.top_p, cfg.max_new_tokens, seed)
        return [[c.text for c in group] for group in outs]
    return sample


def check_config(cfg: DiversityConfig) -> None:
    if not cfg.models:
        raise ConfigError("models: at least one model is required (--model)")
    if not cfg.prompts:
        raise ConfigError("prompts: prompt files are required (e.g. --prompts WORLD/prompts/eval.jsonl)")
    if cfg.samples < 2:
        raise ConfigError(f"samples={cfg.samples}: Self-BLEU needs at least two samples per prompt")
    if not cfg.temperatures or any(t <= 0 for t in cfg.temperatures):
        raise ConfigError(f"temperatures: positive temperatures are required, got {cfg.temperatures}")
    if cfg.prompts_per_type < 1:
        raise ConfigError("prompts_per_type must be >= 1")


def main(cfg: DiversityConfig, sample_fns: dict[str, SampleFn] | None = None,
         labels: dict[str, str] | None = None) -> dict:
    """Self-BLEU per model, prompt type and temperature; `sample_fns` (model -> SampleFn) replaces
    loading the models (tests); `labels` (model path -> name, e.g. a pipeline stage's) names the
    models in the figure and is kept in diversity.json."""
    check_config(cfg)
    out = Path(cfg.out_dir)
    records = [r for p in cfg.prompts for r in read_records(p, "prompts")]
    sets = select_prompts(records, cfg)
    result: dict = {"samples": cfg.samples, "temperatures": list(cfg.temperatures), "top_p": cfg.top_p,
                    "prompts": {k: [r["id"] for r in v] for k, v in sets.items()}, "models": {}}
    for name in cfg.models:
        fn = (sample_fns or {}).get(name) or model_sample_fn(name, cfg)
        with torch.no_grad():
            result["models"][name] = diversity(sets, fn, cfg.temperatures, cfg.samples, cfg.seed)
        for kind, rows in result["models"][name].items():
            print(f"[diversity] {name} {kind}: Self-BLEU " + ", ".join(
                f"T={r['temperature']:g} {r['self_bleu']:.1f}" for r in rows), flush=True)
    if labels:
        result["labels"] = dict(labels)
    out.mkdir(parents=True, exist_ok=True)
    plot_self_bleu({**result, "models": {(labels or {}).get(p, p): by for p, by in result["models"].items()}},
                   out / "self_bleu.png")
    write_atomic(out / "diversity.json", json.dumps(result, indent=1) + "\n")
    save_config(cfg, out / "config.yaml")
    print(f"[diversity] wrote {out / 'diversity.json'}, {out / 'self_bleu.png'}", flush=True)
    return result


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llama2 evaluate diversity", description=__doc__.split("\n\n")[0],
                                epilog="Other options as key=value (see --print-config), e.g. prompts_per_type=10 "
                                       "creative_tasks=[creative] max_new_tokens=32.")
    p.add_argument("--config", help="YAML file; defaults come from DiversityConfig")
    p.add_argument("--model", action="append", help="a model compared (repeat for several)")
    p.add_argument("--samples", type=int, help="answers per prompt and temperature (§5.1: 25)")
    p.add_argument("--temperatures", type=float, nargs="+", help="temperatures (§5.1: 0.1 to 1.5)")
    p.add_argument("--prompts", nargs="+", help="prompt files (factual and creative prompts are taken from them)")
    p.add_argument("--out", help="output directory (out_dir)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    a.prompts, more = split_overrides(a.prompts)
    flags = {"models": f"[{','.join(a.model)}]" if a.model else None, "samples": a.samples, "out_dir": a.out,
             "temperatures": f"[{','.join(map(str, a.temperatures))}]" if a.temperatures else None,
             "prompts": f"[{','.join(a.prompts)}]" if a.prompts else None}
    overrides = list(a.overrides) + more + [f"{k}={v}" for k, v in flags.items() if v is not None]
    cfg = load_config(DiversityConfig, a.config, overrides)
    if a.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    main(cfg)
    return 0
