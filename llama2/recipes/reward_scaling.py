"""Reward-model accuracy as a function of data and model size (Llama 2 §3.2.2, Figure 6).

    llama2 study reward-scaling --config FILE.yaml [key=value ...]

For each chat model (a reward model's initialisation: one curve per model size) and each number
of preference pairs (a prefix of the training pairs in batch order, so that more pairs means more
weekly batches, as in the paper), a reward model is trained with the reward recipe and measured on
held-out pairs of the policy's own answers: accuracy on the pairs the graders rank, against the
graders and against the annotators, each with its 95% Wilson interval. Writes reward_scaling.json
and reward_scaling.png; every finished point is kept, so a rerun (or a killed study) continues
where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from matplotlib.figure import Figure  # no pyplot: no global backend state in a library

from llama2.chat_format import ChatFormat
from llama2.checkpoint import read_checkpoint
from llama2.config import ConfigError, from_dict, save_config
from llama2.formats import AXES, read_records
from llama2.inference import load_for_inference, pick_device
from llama2.rollout import token_logprobs
from llama2.recipes import reward_model
from llama2.recipes.common import recipe_cli, write_atomic, write_jsonl_atomic


@dataclass
class ScalingConfig:
    out_dir: str = "runs/reward_scaling"
    models: list[str] = field(default_factory=list)  # chat checkpoints to start reward models from: one curve each
    train_data: list[str] = field(default_factory=list)  # preference files in batch order; "test" records left out
    test_data: list[str] = field(default_factory=list)  # held-out on-policy pairs: split "test", axis = objective
    objective: Literal["helpfulness", "safety"] = "helpfulness"  # which reward model
    # Training pairs per point: a value <= 1 is a fraction of the training pairs, a larger one a count.
    # Each point takes the first pairs in batch order (Figure 6: more weekly batches).
    points: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])
    # Overrides of the reward recipe's config for every run (batch_size, epochs, optim.lr, ...). The
    # recipe's default is one epoch, so more pairs are more steps; max_steps > 0 fixes the steps instead.
    reward: dict = field(default_factory=dict)
    keep_models: bool = False  # keep each point's reward model (rm/final); off: only its log and result
    # Also judge the test pairs by each chat model's own likelihood, before any reward training: the
    # answer with the higher mean log-probability per token wins. What the model already "knows"
    # about its answers, the reference a reward model started from it has to beat.
    likelihood_baseline: bool = True
    seed: int = 0  # the reward runs' seed (data order, mix, head init)
    device: str = "auto"


# The reward recipe's fields that the study sets itself, per point.
STUDY_FIELDS = ("out_dir", "model", "train_data", "objective", "seed", "device")
JUDGES = {"graders_ranked": "the graders", "labels_ranked": "the annotators"}  # panels of the plot


@dataclass
class Model:
    path: str
    tag: str  # its directory under out_dir
    params: int
    label: str  # its name in the plot and tables: the parameter count


def param_label(n: int) -> str:
    for unit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= unit:
            return f"{n / unit:.3g}{suffix}"
    return str(n)


# ----------------------------------------------------------------------------- plan and checks


def _files(paths: list[str], name: str) -> list[str]:
    if not paths:
        raise ConfigError(f"{name}: at least one file is required")
    for p in paths:
        if not Path(p).is_file():
            raise ConfigError(f"{name}: {p} does not exist")
    return list(paths)


def training_pairs(files: list[str]) -> list[dict]:
    """The "train" records of the files in batch order (pairs without a batch last), file and line
    order within a batch."""
    rows = [r for f in files for r in read_records(f, "preferences") if r["split"] == "train"]
    return sorted(rows, key=lambda r: (r.get("batch") is None, r.get("batch") or 0))


def pair_counts(points: list[float], available: int) -> list[int]:
    """The numbers of training pairs of the points, ascending, each once."""
    if not points:
        raise ConfigError("points: at least one point is required")
    counts = []
    for i, p in enumerate(points):
        if p <= 0:
            raise ConfigError(f"points[{i}]: {p:g}: must be > 0 (a fraction <= 1 or a number of pairs)")
        if p > 1 and not float(p).is_integer():
            raise ConfigError(f"points[{i}]: {p:g}: a number of pairs must be whole (a fraction is <= 1)")
        n = max(1, round(p * available)) if p <= 1 else int(p)
        if n > available:
            raise ConfigError(f"points[{i}]: {n} pairs, but train_data holds only {available} training pairs")
        counts.append(n)
    return sorted(set(counts))


def check(cfg: ScalingConfig) -> tuple[list[dict], list[int], list[dict]]:
    """Everything checked before any training: (training pairs in batch order, pair counts, test pairs)."""
    if cfg.objective not in AXES:
        raise ConfigError(f"objective: expected one of {', '.join(AXES)}, got {cfg.objective!r}")
    if not cfg.models:
        raise ConfigError("models: at least one chat checkpoint to start reward models from is required")
    for i, m in enumerate(cfg.models):
        if not Path(m).exists():
            raise ConfigError(f"models: {m} does not exist")
        if Path(m).resolve() in [Path(o).resolve() for o in cfg.models[:i]]:
            raise ConfigError(f"models[{i}]: {m} is listed twice")
    set_here = sorted(set(cfg.reward) & set(STUDY_FIELDS))
    if set_here:
        raise ConfigError(f"reward.{set_here[0]}: set by the study for each run; use the study's own "
                          f"{'models' if set_here[0] == 'model' else set_here[0]} field")
    from_dict(reward_model.RewardConfig, cfg.reward, "reward")  # its keys and types, before any work
    train = training_pairs(_files(cfg.train_data, "train_data"))
    if not train:
        raise ConfigError(f"train_data: no records with split 'train' in {', '.join(cfg.train_data)}")
    counts = pair_counts(cfg.points, len(train))
    if not any(r["axis"] == cfg.objective for r in train[: counts[0]]):
        raise ConfigError(f"points: the first {counts[0]} training pairs hold no {cfg.objective} pair; "
                          f"start with more pairs")
    tests = reward_model.held_out_pairs(_files(cfg.test_data, "test_data"), cfg.objective)
    if not any(reward_model.grader_gap(p) for p in tests):
        raise ConfigError(f"test_data: {', '.join(cfg.test_data)} hold no held-out {cfg.objective} pairs the graders "
                          f"rank (split 'test', axis '{cfg.objective}', meta.grader_gap not 0); found {len(tests)} "
                          f"test pairs of that axis")
    return train, counts, tests


def describe_models(paths: list[str]) -> list[Model]:
    models = []
    for path in paths:
        params = read_checkpoint(path).args.num_params()
        resolved = str(Path(path).resolve())
        tag = "-".join(Path(resolved).parts[-2:]) + "-" + hashlib.sha1(resolved.encode()).hexdigest()[:6]
        models.append(Model(path, tag, params, param_label(params)))
    sizes = [m.label for m in models]
    for m in models:  # two models of one size: tell them apart
        if sizes.count(m.label) > 1:
            m.label = f"{m.label} ({m.path})"
    return models


# ----------------------------------------------------------------------------- one point


def run_point(cfg: ScalingConfig, model: Model, subset: list[dict], progress: str) -> dict:
    """Train one reward model on `subset` and measure it on the test pairs; a finished point's
    result is read back instead (refused if it was made with different settings)."""
    out = Path(cfg.out_dir)
    n = len(subset)
    point = out / model.tag / f"pairs-{n}"
    key = {"model": str(Path(model.path).resolve()), "pairs": n, "objective": cfg.objective,
           "train_data": [str(Path(p).resolve()) for p in cfg.train_data],
           "test_data": [str(Path(p).resolve()) for p in cfg.test_data], "reward": cfg.reward, "seed": cfg.seed}
    result_file = point / "result.json"
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        changed = [k for k in key if result.get("key", {}).get(k) != key[k]]
        if changed:
            raise ConfigError(f"{result_file}: made with another {changed[0]}; use another out_dir or delete {point}")
        print(f"[study] {progress} {model.label}, {n} pairs: done before, {_fmt(result['accuracy'])}", flush=True)
        return result

    print(f"[study] {progress} {model.label}, {n} pairs: training a {cfg.objective} reward model", flush=True)
    t0 = time.time()
    data = out / "data" / f"train-{n}.jsonl"
    write_jsonl_atomic(data, subset)  # the same first n pairs for every model
    rm_dir = point / "rm"
    rc = from_dict(reward_model.RewardConfig, {**cfg.reward, "out_dir": str(rm_dir), "model": model.path,
                                               "objective": cfg.objective, "train_data": [str(data)],
                                               "seed": cfg.seed, "device": cfg.device}, "reward")
    resume = any((rm_dir / "checkpoints").glob("step-*/train_state.json"))  # an interrupted run of this point
    reward_model.main(rc, resume=resume)
    accuracy = reward_model.on_policy_accuracy(str(rm_dir / "final"), cfg.test_data, cfg.objective,
                                               device=str(pick_device(cfg.device)))
    meta = json.loads((rm_dir / "final" / "model.json").read_text())
    batches = sorted({r["batch"] for r in subset if r.get("batch") is not None})
    mixed = sum(meta["mix"]["main"].values()) + sum(meta["mix"]["other"].values())  # what the objective's mix took
    result = {"key": key, "model": model.path, "label": model.label, "params": model.params, "pairs": n,
              "batches": batches, "trained_pairs": mixed, "steps": meta["steps"], "seconds": round(time.time() - t0, 1),
              "accuracy": accuracy}
    write_atomic(result_file, json.dumps(result, indent=1) + "\n")
    shutil.rmtree(rm_dir / "checkpoints", ignore_errors=True)  # only for resuming this point
    if not cfg.keep_models:
        shutil.rmtree(rm_dir / "final", ignore_errors=True)
    print(f"[study] {progress} {model.label}, {n} pairs (batches {_batches(batches)}), {result['steps']} steps: "
          f"{_fmt(accuracy)}", flush=True)
    return result


def _batches(batches: list) -> str:
    return ", ".join(map(str, batches)) or "none"


def interval(a: dict) -> str:
    """An accuracy of `on_policy_accuracy` as "0.612 [0.540, 0.680]"."""
    return "n/a" if a.get("accuracy") is None else f"{a['accuracy']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"


def _fmt(acc: dict) -> str:
    ranked = acc["graders_ranked"]
    return (f"on {ranked['n']} ranked held-out pairs {interval(ranked)} vs the graders, "
            f"{interval(acc['labels_ranked'])} vs the annotators")


def likelihood_accuracy(model_path: str, tests: list[dict], device: str) -> dict:
    """`on_policy_accuracy` of the chat model's own mean log-probability per answer token as the judge."""
    model, tokenizer = load_for_inference(model_path, device)
    fmt = ChatFormat(tokenizer)
    dev = next(model.parameters()).device

    def mean_logprob(dialog: list[dict], answer: str) -> float:
        ids, mask = fmt.training_ids(list(dialog) + [{"role": "assistant", "content": answer}])
        ids = ids[: model.args.max_seq_len + 1]
        x = torch.tensor(ids, device=dev)[None]
        with torch.no_grad():
            lp = token_logprobs(model(x[:, :-1]).float(), x[:, 1:]).reshape(-1)
        answer_tokens = torch.tensor(mask[1: len(ids)], device=dev)
        return lp[answer_tokens].mean().item() if answer_tokens.any() else 0.0

    diff = [mean_logprob(p["messages"], p["chosen"]) - mean_logprob(p["messages"], p["rejected"]) for p in tests]
    return reward_model.accuracy_against_truth(diff, [reward_model.grader_gap(p) for p in tests],
                                               [p.get("task") for p in tests])


def model_likelihood(cfg: ScalingConfig, model: Model, tests: list[dict]) -> dict | None:
    """The likelihood baseline of one model, computed once (kept in out_dir/<model>/likelihood.json)."""
    if not cfg.likelihood_baseline:
        return None
    path = Path(cfg.out_dir) / model.tag / "likelihood.json"
    key = {"model": str(Path(model.path).resolve()), "test_data": [str(Path(p).resolve()) for p in cfg.test_data],
           "objective": cfg.objective}
    if path.is_file():
        got = json.loads(path.read_text())
        if got.get("key") == key:
            return got["accuracy"]
    accuracy = likelihood_accuracy(model.path, tests, str(pick_device(cfg.device)))
    write_atomic(path, json.dumps({"key": key, "accuracy": accuracy}, indent=1) + "\n")
    print(f"[study] {model.label}: its own likelihood as the judge, before reward training: {_fmt(accuracy)}",
          flush=True)
    return accuracy


# ----------------------------------------------------------------------------- plot


def plot_scaling(result: dict) -> Figure:
    """Figure 6: accuracy on held-out ranked pairs against the number of training pairs (log scale),
    one line per model with 95% intervals; against the graders (left) and the annotators (right)."""
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    counts = sorted({p["pairs"] for p in result["points"]})
    k = len(result["models"])
    for ax, (judge, name) in zip(axes, JUDGES.items()):
        for i, m in enumerate(result["models"]):
            pts = [p for p in result["points"]
                   if p["model"] == m["model"] and p["accuracy"][judge]["accuracy"] is not None]
            acc = [p["accuracy"][judge] for p in pts]
            ys = [a["accuracy"] for a in acc]
            dodge = 1.03 ** (i - (k - 1) / 2)  # models side by side, so that equal values stay visible
            line = ax.errorbar([p["pairs"] * dodge for p in pts], ys,
                               yerr=[[y - a["ci95"][0] for y, a in zip(ys, acc)], [a["ci95"][1] - y for y, a in zip(ys, acc)]],
                               fmt="o-", capsize=3, label=m["label"])
            own = (m.get("likelihood") or {}).get(judge, {}).get("accuracy")
            if own is not None:
                ax.axhline(own, color=line[0].get_color(), lw=1, ls=":",
                           label=f"{m['label']}: its own likelihood, untrained")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance")
        ax.set_xscale("log")
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.minorticks_off()
        ax.set_xlabel("training preference pairs (log scale)")
        ax.set_title(f"vs {name}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{result['objective']} RM accuracy, ranked held-out pairs")
    axes[0].legend(fontsize=8, title="model parameters", title_fontsize=8)
    fig.suptitle(f"Reward-model accuracy vs data and model size (Figure 6): {result['ranked_test_pairs']} ranked of "
                 f"{result['test_pairs']} held-out {result['objective']} pairs", fontsize=10)
    fig.tight_layout()
    return fig


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the study: one row per number of pairs, one column per model."""
    header = ["training pairs"] + [m["label"] for m in result["models"]]
    rows = []
    for n in sorted({p["pairs"] for p in result["points"]}):
        row = [str(n)]
        for m in result["models"]:
            got = [p for p in result["points"] if p["model"] == m["model"] and p["pairs"] == n]
            acc = got[0]["accuracy"]["graders_ranked"] if got else {}
            row.append(f"{interval(acc)} n={acc['n']}" if acc else "–")
        rows.append(row)
    if any(m.get("likelihood") for m in result["models"]):
        rows.append(["0 (its own likelihood as the judge)"] + [
            interval(m["likelihood"]["graders_ranked"]) if m.get("likelihood") else "–" for m in result["models"]])
    return header, rows


# ----------------------------------------------------------------------------- the study


def main(cfg: ScalingConfig, resume: bool = True) -> int:
    """Run the study. Finished points are always reused and an interrupted reward model resumes
    from its checkpoint; `resume` is accepted for the recipes' common command line."""
    train, counts, tests = check(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    models = describe_models(cfg.models)
    ranked = sum(1 for p in tests if reward_model.grader_gap(p))
    print(f"[study] {cfg.objective} reward models of {len(models)} model(s) "
          f"({', '.join(m.label for m in models)}) on {', '.join(map(str, counts))} of {len(train)} training pairs; "
          f"{ranked} ranked of {len(tests)} held-out pairs; out: {out}", flush=True)
    points = []
    total = len(models) * len(counts)
    likelihood = {m.path: model_likelihood(cfg, m, tests) for m in models}
    for i, model in enumerate(models):
        for j, n in enumerate(counts):
            result = run_point(cfg, model, train[:n], f"{i * len(counts) + j + 1}/{total}")
            points.append({k: v for k, v in result.items() if k != "key"})
    result = {"objective": cfg.objective, "train_data": cfg.train_data, "test_data": cfg.test_data,
              "train_pairs": len(train), "test_pairs": len(tests), "ranked_test_pairs": ranked,
              "models": [{"model": m.path, "params": m.params, "label": m.label, "likelihood": likelihood[m.path]}
                         for m in models], "points": points}
    write_atomic(out / "reward_scaling.json", json.dumps(result, indent=1) + "\n")
    tmp = out / ".reward_scaling.tmp.png"
    plot_scaling(result).savefig(tmp, dpi=110)
    tmp.replace(out / "reward_scaling.png")
    print(f"[study] wrote {out / 'reward_scaling.json'} and {out / 'reward_scaling.png'}", flush=True)
    return 0


def cli(argv: list[str]) -> int:
    return recipe_cli(argv, ScalingConfig, main, "llama2 study reward-scaling", __doc__.split("\n\n")[0])
