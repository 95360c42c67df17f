"""Multi-turn consistency of a system instruction (Llama 2 §3.3, Figures 9 and 10).

    llama2 evaluate multi-turn --model RUN/gatt/final [--baseline RUN/v2/ppo/final] --turns 20 \\
        [--attention-plot] [--config FILE.yaml] [key=value ...]

Each dialog states an instruction once (the system message), then asks N held-out prompts on
unrelated topics (the world's eval split), one per turn. The model answers greedily turn by turn,
its own earlier answers in the context, until N turns or until the context is full (the turn
count reached is reported). Every answer is checked with the instruction's checker; per turn,
the share of answers that still keep the instruction, with a 95% Wilson interval, for the model
and the baseline — overall and by group: instructions of constraint kinds seen in GAtt training,
of held-out values, and of kinds never seen (`train_kinds` names the kinds GAtt trained on).
Writes RUN/multi_turn.json, RUN/adherence.png and, with --attention-plot, RUN/attention.png
(Figure 10: per layer, the largest attention weight any head pays to the system message's
tokens at every later position of one long dialog, for both models).
"""
from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from matplotlib.figure import Figure  # no pyplot: no global backend state in a library

from llama2.chat_format import ChatFormat
from llama2.config import ConfigError, load_config, save_config, to_dict
from llama2.formats import read_records
from llama2.inference import load_for_inference
from llama2.model import Transformer, attention_probs
from llama2.agreement import wilson_interval
from llama2.recipes.gatt import (Instruction, check_kinds, instructed_dialog, model_answer_fn, read_instructions,
                                 world_instruction)
from llama2.sampling import DialogSampler
from llama2.world.gatt import KINDS

# answer_fn(dialogs) -> one answer per dialog (each dialog ends with a user turn)
Answerer = Callable[[list[list[dict]]], list[str]]


@dataclass
class MultiTurnConfig:
    out_dir: str = "runs/multi_turn"
    model: str = ""  # the model evaluated (e.g. the GAtt model); required
    baseline: str = ""  # the model it is compared with (e.g. the policy before GAtt); "" = none
    prompts: list[str] = field(default_factory=list)  # held-out prompt files (the world's eval split); required
    tasks: list[str] = field(default_factory=list)  # only prompts of these tasks ([] = every non-safety one)
    instructions: str = "world"  # "world" or a JSONL file of instructions (see llama2 rlhf gatt)
    dialogs: int = 24  # dialogs (instructions) per model
    turns: int = 20  # user turns per dialog at most; a dialog also stops when the context is full
    kinds: list[str] = field(default_factory=lambda: list(KINDS))  # world constraint kinds evaluated, in turn
    train_kinds: list[str] = field(default_factory=lambda: list(KINDS))  # kinds GAtt trained on; others are "unseen"
    hold_out: list[str] = field(default_factory=list)  # values held out of GAtt training (reported apart)
    max_constraints: int = 2  # world instructions combine 1..this many kinds
    short_share: float = 0.5
    system_message: bool = True  # the instruction as the system message (false: before the first user message)
    max_new_tokens: int = 48
    chat_format: str = "auto"
    attention_plot: bool = False  # also Figure 10's attention plot (RUN/attention.png)
    sample_batch_size: int = 32
    seed: int = 1234  # instructions and prompts drawn; another seed than training's, so instructions are new
    device: str = "auto"


@dataclass
class EvalDialog:
    instruction: Instruction
    group: str  # "seen" | "held_out_value" | "unseen_kind" | "custom"
    users: list[str]


def build_eval_dialogs(cfg: MultiTurnConfig) -> list[EvalDialog]:
    """`dialogs` instructions (world kinds in turn, so each kind is evaluated) with `turns`
    distinct held-out prompts each."""
    records = [r for p in cfg.prompts for r in read_records(p, "prompts")]
    pool = [r["messages"][-1]["content"] for r in records
            if len(r["messages"]) == 1 and not r.get("is_safety") and r.get("task") != "borderline"
            and (not cfg.tasks or r.get("task") in cfg.tasks)]
    if len(pool) < cfg.turns:
        raise ConfigError(f"prompts: {len(pool)} single-turn non-safety prompts in {cfg.prompts}, fewer than "
                          f"turns={cfg.turns}")
    rng = random.Random(cfg.seed)
    if cfg.instructions == "world":
        check_kinds(cfg.kinds, "kinds")
        check_kinds(cfg.train_kinds, "train_kinds")
        instructions = [world_instruction(rng, cfg.kinds, (), cfg.max_constraints, cfg.short_share,
                                          must=cfg.kinds[i % len(cfg.kinds)]) for i in range(cfg.dialogs)]
    else:
        file = [i for i in read_instructions(cfg.instructions) if i.checker is not None]
        if not file:
            raise ConfigError(f"instructions: no instruction in {cfg.instructions} names a checker: nothing to evaluate")
        instructions = [file[i % len(file)] for i in range(cfg.dialogs)]
    out = []
    for ins in instructions:
        kinds = ins.kind.split("+")
        if cfg.instructions != "world":
            group = "custom"
        elif any(k not in cfg.train_kinds for k in kinds):
            group = "unseen_kind"
        elif any(v.split(":")[1] in cfg.hold_out for v in ins.id.split("+")):
            group = "held_out_value"
        else:
            group = "seen"
        out.append(EvalDialog(ins, group, rng.sample(pool, cfg.turns)))
    return out


def converse(dialogs: list[EvalDialog], answer: Answerer, fits: Callable[[list[dict]], bool],
             system_message: bool = True) -> list[list[str]]:
    """Every dialog's answers, turn by turn with its own earlier answers in the context, until its
    user turns run out or its next prompt does not fit the context."""
    answers: list[list[str]] = [[] for _ in dialogs]
    for turn in range(max((len(d.users) for d in dialogs), default=0)):
        todo = [i for i, d in enumerate(dialogs) if len(answers[i]) == turn and turn < len(d.users)]
        msgs = {i: instructed_dialog(dialogs[i].instruction.text, dialogs[i].users[:turn + 1], answers[i],
                                     system_message) for i in todo}
        todo = [i for i in todo if fits(msgs[i])]
        if not todo:
            break
        for i, text in zip(todo, answer([msgs[i] for i in todo])):
            answers[i].append(text.strip())
    return answers


def per_turn(dialogs: list[EvalDialog], answers: list[list[str]], groups: list[str] | None = None) -> list[dict]:
    """Per turn: answers checked, how many keep the instruction, the share and its 95% Wilson interval."""
    rows = []
    for turn in range(max((len(a) for a in answers), default=0)):
        n = held = 0
        for d, a in zip(dialogs, answers):
            if turn < len(a) and (groups is None or d.group in groups):
                n += 1
                held += bool(d.instruction.checker(d.instruction.text, a[turn]))
        if n:
            lo, hi = wilson_interval(held, n)
            rows.append({"turn": turn + 1, "n": n, "held": held, "share": held / n, "ci95": [lo, hi]})
    return rows


def first_below_half(rows: list[dict]) -> int | None:
    """The first turn whose share keeping the instruction is below one half (None: never)."""
    return next((r["turn"] for r in rows if r["share"] < 0.5), None)


def score(dialogs: list[EvalDialog], answers: list[list[str]]) -> dict:
    """Adherence per turn, overall and by group, and the turns reached."""
    reached = [len(a) for a in answers]
    out = {"overall": per_turn(dialogs, answers), "turns_reached": {"max": max(reached, default=0),
                                                                    "min": min(reached, default=0),
                                                                    "mean": sum(reached) / max(len(reached), 1)}}
    out["by_group"] = {g: per_turn(dialogs, answers, [g]) for g in sorted({d.group for d in dialogs})}
    out["first_turn_below_half"] = first_below_half(out["overall"])
    held = sum(r["held"] for r in out["overall"])
    total = sum(r["n"] for r in out["overall"])
    out["all_turns"] = {"held": held, "n": total, "share": held / total if total else 0.0,
                        "ci95": list(wilson_interval(held, total))}
    return out


# ----------------------------------------------------------------------------- plots


def plot_adherence(result: dict, path: Path) -> None:
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for name, colour in (("model", "tab:blue"), ("baseline", "tab:orange")):
        if name not in result:
            continue
        rows = result[name]["overall"]
        turns = [r["turn"] for r in rows]
        ax.plot(turns, [r["share"] for r in rows], marker="o", color=colour, label=f"{name}: {result['paths'][name]}")
        ax.fill_between(turns, [r["ci95"][0] for r in rows], [r["ci95"][1] for r in rows], color=colour, alpha=0.15)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("dialog turn")
    ax.set_ylabel("answers keeping the system instruction")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Multi-turn consistency (Llama 2 §3.3)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def system_span(fmt: ChatFormat, messages: list[dict]) -> tuple[int, int]:
    """[start, end) of the first message's (the instruction's) tokens in the dialog's ids: where
    the ids differ from those of the same dialog with another first message."""
    other = [dict(messages[0], content="#")] + messages[1:]
    a, b = fmt.training_ids(messages)[0], fmt.training_ids(other)[0]
    start = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    tail = next((i for i, (x, y) in enumerate(zip(reversed(a), reversed(b))) if x != y), 0)
    return start, len(a) - tail


def system_attention(model: Transformer, ids: list[int], span: tuple[int, int], device) -> list[list[float]]:
    """Per layer, at every position after the system message: the largest attention weight any
    head pays to any of its tokens (Figure 10)."""
    probs = attention_probs(model, torch.tensor([ids], device=device))
    start, end = span
    return [p[0, :, end:, start:end].amax(dim=(0, 2)).float().cpu().tolist() for p in probs]


def plot_attention(maps: dict[str, list[list[float]]], turn_starts: list[int], path: Path) -> None:
    fig = Figure(figsize=(9, 1.6 + 1.6 * len(maps)))
    axes = fig.subplots(len(maps), 1, squeeze=False)[:, 0]
    for ax, (name, grid) in zip(axes, maps.items()):
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        for t in turn_starts:
            ax.axvline(t - 0.5, color="white", linewidth=0.6)
        ax.set_ylabel("layer")
        ax.set_title(f"{name}: max attention to the system message", fontsize=9)
        fig.colorbar(im, ax=ax)
    axes[-1].set_xlabel("position after the system message (white lines: user turns)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- the recipe


def evaluate_model(path: str, dialogs: list[EvalDialog], cfg: MultiTurnConfig):
    model, tok = load_for_inference(path, cfg.device)
    sampler = DialogSampler(model, tok, cfg.chat_format, cfg.sample_batch_size)
    greedy = model_answer_fn(sampler, 0.0, 1.0, cfg.max_new_tokens)
    limit = model.args.max_seq_len

    def fits(d: list[dict]) -> bool:
        return len(sampler.format.prompt_ids(d)) + cfg.max_new_tokens <= limit

    with torch.no_grad():
        answers = converse(dialogs, lambda ds: [t for t, _ in greedy(ds, 0)], fits, cfg.system_message)
    return answers, model, sampler.format


def main(cfg: MultiTurnConfig, resume: bool = False) -> int:
    if not cfg.model:
        raise ConfigError("model: the checkpoint to evaluate is required (--model)")
    if not cfg.prompts:
        raise ConfigError("prompts: held-out prompt files are required (e.g. prompts=[WORLD/prompts/eval.jsonl])")
    if cfg.turns < 1 or cfg.dialogs < 1:
        raise ConfigError("turns and dialogs must be >= 1")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dialogs = build_eval_dialogs(cfg)
    paths = {"model": cfg.model, **({"baseline": cfg.baseline} if cfg.baseline else {})}
    result: dict = {"paths": paths, "dialogs": len(dialogs), "turns_asked": cfg.turns,
                    "groups": {g: sum(d.group == g for d in dialogs) for g in sorted({d.group for d in dialogs})},
                    "train_kinds": cfg.train_kinds, "hold_out": cfg.hold_out}
    transcripts, loaded = {}, {}
    for name, path in paths.items():
        answers, model, fmt = evaluate_model(path, dialogs, cfg)
        result[name] = score(dialogs, answers)
        transcripts[name] = answers
        if cfg.attention_plot:
            loaded[name] = (model, fmt)
        else:
            del model
        r = result[name]
        print(f"[multi-turn] {name} ({path}): {r['all_turns']['share']:.3f} of answers keep the instruction; "
              f"turn 1 {r['overall'][0]['share']:.2f}, last turn {r['overall'][-1]['turn']} "
              f"{r['overall'][-1]['share']:.2f}; turns reached {r['turns_reached']['min']}-{r['turns_reached']['max']}",
              flush=True)
    if "baseline" in result:
        below = result["baseline"]["first_turn_below_half"]
        result["baseline_first_turn_below_half"] = below
        print(f"[multi-turn] the baseline falls below half at turn {below}" if below is not None
              else "[multi-turn] the baseline never falls below half", flush=True)
    with open(out / "dialogs.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(dialogs):
            row = {"instruction": d.instruction.text, "kind": d.instruction.kind, "group": d.group}
            for name, answers in transcripts.items():
                row[name] = [{"user": u, "answer": a, "kept": bool(d.instruction.checker(d.instruction.text, a))}
                             for u, a in zip(d.users, answers[i])]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    plot_adherence(result, out / "adherence.png")
    if cfg.attention_plot:
        result["attention"] = attention_figure(dialogs, transcripts["model"], loaded, cfg, out / "attention.png")
    (out / "multi_turn.json").write_text(json.dumps(result, indent=1) + "\n")
    save_config(cfg, out / "config.yaml")
    print(f"[multi-turn] wrote {out / 'multi_turn.json'}, {out / 'adherence.png'}"
          + (f", {out / 'attention.png'}" if cfg.attention_plot else ""), flush=True)
    return 0


def attention_figure(dialogs: list[EvalDialog], answers: list[list[str]], loaded: dict, cfg: MultiTurnConfig,
                     path: Path) -> dict:
    """Figure 10 on the model's longest dialog (of an instruction kind GAtt trained on, if any),
    the same tokens fed to every model."""
    i = max(range(len(dialogs)), key=lambda j: (dialogs[j].group in ("seen", "custom"), len(answers[j])))
    d, a = dialogs[i], answers[i]
    messages = instructed_dialog(d.instruction.text, d.users[:len(a)], a, cfg.system_message)
    model, fmt = loaded["model"]
    ids = fmt.training_ids(messages)[0][: model.args.max_seq_len]
    span = system_span(fmt, messages)
    # where each later user turn starts, relative to the end of the system message
    turn_starts = []
    for k in range(2, len(a) + 1):
        prefix = instructed_dialog(d.instruction.text, d.users[:k - 1], a[:k - 1], cfg.system_message)
        turn_starts.append(len(fmt.training_ids(prefix)[0]) - span[1])
    maps = {}
    for name, (m, _) in loaded.items():
        with torch.no_grad():
            maps[name] = system_attention(m, ids, span, next(m.parameters()).device)
    plot_attention(maps, turn_starts, path)
    return {"dialog": i, "instruction": d.instruction.text, "tokens": len(ids), "system_span": list(span),
            "turns": len(a), "turn_starts": turn_starts,
            "mean_max_weight": {n: [sum(r) / max(len(r), 1) for r in g] for n, g in maps.items()}}


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llama2 evaluate multi-turn", description=__doc__.split("\n\n")[0],
                                epilog="Other options as key=value (see --print-config), e.g. dialogs=48 "
                                       "train_kinds=[language,figure] prompts=[data/world/prompts/eval.jsonl].")
    p.add_argument("--config", help="YAML file; defaults come from MultiTurnConfig")
    p.add_argument("--model", help="the model evaluated")
    p.add_argument("--baseline", help="the model compared with (e.g. before GAtt)")
    p.add_argument("--turns", type=int, help="user turns per dialog at most (also stops when the context is full)")
    p.add_argument("--attention-plot", action="store_true", help="also write Figure 10's attention.png")
    p.add_argument("--out", help="output directory (out_dir)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    flags = {"model": a.model, "baseline": a.baseline, "turns": a.turns, "out_dir": a.out,
             "attention_plot": "true" if a.attention_plot else None}
    overrides = list(a.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    cfg = load_config(MultiTurnConfig, a.config, overrides)
    if a.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    return main(cfg)
