"""`llama2 report RUN_DIR`: one self-contained HTML page with the plots of a pipeline run.

It reads what the stages wrote (metrics.jsonl files, reward-model evaluations, best-of-N curves,
rejection-sampling stats, evaluations per RLHF version) and draws what the paper draws: training
losses, reward-model accuracy by rating (Tables 7–8), best-of-N max/median curves (Figures 7–8),
reward distributions per version (Figure 20-style), the win-rate evolution (Figure 11), the
safety evaluations of every model (§4.4: violations vs helpfulness, Figure 17; single- vs
multi-turn, Figure 18; per risk category and attack vector, Figure 19), the diversity stage's
Self-BLEU vs temperature (Figure 21), and, when `llama2 study reward-scaling-run` has run on it,
reward-model accuracy vs data and model size (Figure 6).
Plots are embedded as PNG data URIs, so the page can be mailed or opened offline.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import random
from pathlib import Path

from matplotlib.figure import Figure

from llama2.formats import AXES, RATINGS, read_records
from llama2.recipes.diversity import plot_self_bleu
from llama2.agreement import wilson_interval
from llama2.recipes.evaluate import win_rate
from llama2.recipes.reward_scaling import plot_scaling, table_rows
from llama2.world.grading import grade_helpfulness

# Where a run's reward-scaling study (Figure 6) is written and read.
REWARD_SCALING_DIR = Path("studies") / "reward_scaling"


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _versions(run: Path) -> list[Path]:
    return sorted((p for p in run.glob("v[0-9]*") if p.is_dir()), key=lambda p: int(p.name[1:]))


def plot_losses(run: Path):
    stages = [("pretrain", run / "pretrain" / "metrics.jsonl"), ("sft", run / "sft" / "metrics.jsonl"),
              ("control (extra SFT)", run / "control" / "metrics.jsonl")]
    stages += [(f"{v.name} rejection-sampling SFT", p) for v in _versions(run)
               for p in sorted((v / "rejection_sampling").glob("iter-*/sft/metrics.jsonl"))]
    series = [(name, rows) for name, path in stages if (rows := _jsonl(path))]
    if not series:
        return None
    fig = Figure(figsize=(4 * len(series), 3))
    axes = fig.subplots(1, len(series), squeeze=False)
    for ax, (name, rows) in zip(axes[0], series):
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label="train")
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if val:
            ax.plot(*zip(*val), "o-", ms=3, label="held-out")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss")
    return _png(fig)


def _rating_accuracy(ev: dict) -> dict[str, dict[str, float]]:
    """{test set: {rating: accuracy}} from a reward-model evaluation file (tolerant of layout)."""
    out = {}
    sets = ev.get("test_sets") or ev.get("per_test_set") or {}
    for name, res in sets.items():
        by = res.get("by_rating") or res.get("per_rating") or {}
        out[name] = {r: (by[r]["accuracy"] if isinstance(by.get(r), dict) else by.get(r)) for r in RATINGS if r in by}
    return out


def plot_reward_accuracy(run: Path):
    evals = []
    for v in _versions(run):
        for axis in AXES:
            ev = _json(v / f"reward_{axis}" / "eval" / "eval.json")
            if ev:
                evals.append((f"{v.name} {axis} RM", _rating_accuracy(ev)))
    if not evals:
        return None
    fig = Figure(figsize=(3.6 * len(evals), 3))
    axes = fig.subplots(1, len(evals), squeeze=False)
    for ax, (name, table) in zip(axes[0], evals):
        for test_set, acc in table.items():
            pts = [(i, acc[r]) for i, r in enumerate(RATINGS) if acc.get(r) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", label=test_set)
        ax.set_xticks(range(4), ["signif.", "better", "slightly", "neglig."], fontsize=7)
        ax.axhline(0.5, color="grey", lw=0.5, ls="--")
        ax.set_ylim(0, 1.02)
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("accuracy")
    return _png(fig)


def plot_best_of_n(run: Path):
    curves = [(v.name, _json(p)) for v in _versions(run)
              for p in sorted((v / "rejection_sampling").glob("iter-*/best_of_n/best_of_n.json"))]
    if not curves:
        return None
    fig = Figure(figsize=(4 * len(curves), 3))
    axes = fig.subplots(1, len(curves), squeeze=False)
    for ax, (name, bon) in zip(axes[0], curves):
        for temp, c in sorted(bon.get("curves", {}).items(), key=lambda kv: float(kv[0])):
            n = c.get("n") or list(range(1, len(c["max"]) + 1))
            line, = ax.plot(n, c["max"], lw=1.2, label=f"T={float(temp):g} max")
            ax.plot(n, c["median"], lw=1, ls="--", color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("N samples")
        ax.set_title(f"{name}: max (solid) vs median (dashed)", fontsize=9)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("reward")
    return _png(fig)


def plot_reward_distributions(run: Path):
    dists = []
    for v in _versions(run):
        ev = _jsonl(v / "eval" / "answers.jsonl")
        if ev:
            dists.append((v.name, [r.get("model_grade", 0.0) for r in ev]))
    sft = _jsonl((_versions(run) or [run])[0] / "eval" / "answers.jsonl")
    if sft:
        dists.insert(0, ("SFT", [r.get("baseline0_grade", 0.0) for r in sft]))
    if not dists:
        return None
    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    ax.hist([d for _, d in dists], bins=10, range=(0, 1), label=[n for n, _ in dists], histtype="step", lw=1.5)
    ax.set_xlabel("grader helpfulness of the answer")
    ax.set_ylabel("prompts")
    ax.set_title("score distribution per version (evaluation prompts)", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def win_rates(run: Path) -> list[tuple[str, dict]]:
    rows = []
    for v in _versions(run):
        ev = _json(v / "eval" / "eval.json")
        if ev:
            rows.append((v.name, ev))
    return rows


def plot_win_rates(run: Path):
    rows = win_rates(run)
    if not rows:
        return None
    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    for judge, style in (("graders", "o-"), ("reward_models", "s--")):
        pts = [(name, ev["vs_baseline0"][judge]) for name, ev in rows if judge in ev.get("vs_baseline0", {})]
        if pts:
            xs = range(len(pts))
            ax.errorbar(xs, [w["win_rate"] for _, w in pts],
                        yerr=[[w["win_rate"] - w["ci95"][0] for _, w in pts], [w["ci95"][1] - w["win_rate"] for _, w in pts]],
                        fmt=style, capsize=3, label=f"judged by {judge.replace('_', ' ')}")
            ax.set_xticks(list(xs), [n for n, _ in pts])
    ax.axhline(0.5, color="grey", lw=0.5, ls="--")
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate vs SFT")
    ax.set_title("RLHF versions vs the SFT model (Figure 11)", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def plot_ppo(run: Path):
    runs = [(v.name, rows) for v in _versions(run) if (rows := _jsonl(v / "ppo" / "metrics.jsonl"))]
    if not runs:
        return None
    fig = Figure(figsize=(12, 3))
    axes = fig.subplots(1, 3)
    for name, rows in runs:
        rows = [r for r in rows if "reward" in r]
        it = [r["step"] for r in rows]
        axes[0].plot(it, [r["reward"] for r in rows], label=name)
        axes[1].plot(it, [r.get("kl", 0.0) for r in rows], label=name)
        axes[2].plot(it, [r.get("response_len", 0.0) for r in rows], label=name)
    for ax, title in zip(axes, ("mean reward Rc", "KL(π_θ ‖ π_0) per answer", "answer length")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("PPO iteration")
        ax.legend(fontsize=7)
    return _png(fig)


def _table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(c) -> str:
    return f"{c:.3f}" if isinstance(c, float) else str(c)


def _interval(w: dict) -> str:
    return f"{w['win_rate']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}]"


def _rm_accuracy(acc: dict | None) -> str:
    """On-policy accuracy of a reward model against the graders, on the pairs they rank."""
    if not acc or not acc.get("graders_ranked", {}).get("n"):
        return "–"
    g = acc["graders_ranked"]
    return f"{g['accuracy']:.3f} [{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}] (n={g['n']})"


def headline(run: Path, summary: dict) -> str:
    """Each version and the control against SFT: win rate by the graders with its interval and
    ties, helpfulness, violations, false refusals, and the on-policy accuracy of the reward models
    that trained the version."""
    sft = summary.get("sft", {})
    rows = [["SFT", "–", "–", sft.get("helpfulness"), sft.get("violation_rate"), sft.get("false_refusal_helpful"),
             sft.get("false_refusal_borderline"), "–", "–"]]
    for name, v in summary.get("versions", {}).items():
        w = v["win_rate_vs_sft"]["graders"]
        rm = v.get("reward_models_on_policy") or {}
        rows.append([name, _interval(w), f"{w['wins']}W / {w['losses']}L / {w['ties']}T", v["helpfulness"],
                     v["violation_rate"], v["false_refusal_helpful"], v["false_refusal_borderline"],
                     _rm_accuracy(rm.get("helpfulness")), _rm_accuracy(rm.get("safety"))])
    if "control" in summary and "final_vs_control" in summary:
        c, w = summary["control"], summary["final_vs_control"]["graders"]
        rows.append(["final vs the extra-SFT control", _interval(w), f"{w['wins']}W / {w['losses']}L / {w['ties']}T",
                     c.get("helpfulness"), c.get("violation_rate"), "–", "–", "–", "–"])
    return _table(rows, ["model", "win rate vs SFT (graders), 95% CI", "wins / losses / ties", "helpfulness",
                         "violation rate", "false refusals (helpful)", "false refusals (borderline)",
                         "helpfulness RM on-policy accuracy vs graders", "safety RM on-policy accuracy vs graders"])


def family_win_rates(run: Path) -> str:
    """Per task family, each version's win rate over SFT by the graders (ties apart), from the
    graded answers of every evaluation."""
    per_version = [(v.name, _jsonl(v / "eval" / "answers.jsonl")) for v in _versions(run)]
    per_version = [(n, rows) for n, rows in per_version if rows and "baseline0_grade" in rows[0]]
    if not per_version:
        return ""
    families = sorted({r.get("task") or "?" for _, rows in per_version for r in rows})
    table = []
    for family in families:
        row = [family]
        for _, rows in per_version:
            mine = [r for r in rows if (r.get("task") or "?") == family]
            w = win_rate([r["model_grade"] for r in mine], [r["baseline0_grade"] for r in mine])
            row.append(f"{_interval(w)} {w['wins']}W/{w['losses']}L/{w['ties']}T")
        table.append(row)
    return _table(table, ["task family"] + [f"{n} vs SFT" for n, _ in per_version])


def examples(run: Path, summary: dict, n: int = 12, seed: int = 0) -> str:
    """SFT's and the final model's answers to the same randomly chosen evaluation prompts, with the
    graders' scores and reasons (the paper's way of showing what changed)."""
    final = _versions(run)[-1] if _versions(run) else None
    rows = _jsonl(final / "eval" / "answers.jsonl") if final else []
    ev = _json(final / "eval" / "eval.json") if final else None
    files = (ev or {}).get("prompt_files") or [str(run / "world" / "prompts" / "eval.jsonl")]
    records = {r["id"]: r for f in files if Path(f).is_file() for r in read_records(f, "prompts")}
    rows = [r for r in rows if r["id"] in records and "baseline0" in r]
    if not rows:
        return ""
    pick = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    cells = []
    for i in pick:
        r, rec = rows[i], records[rows[i]["id"]]
        prompt = rec["messages"][-1]["content"]
        graded = []
        for key in ("baseline0", "model"):
            g = grade_helpfulness(rec, r[key])
            why = "; ".join(g.reasons) or "correct"
            graded.append(f"<td><div>{html.escape(r[key])}</div><div class='why'>{g.score:.2f}: "
                          f"{html.escape(why)}</div></td>")
        cells.append(f"<tr><td>{html.escape(r.get('task') or '?')}</td><td>{html.escape(prompt)}</td>{''.join(graded)}</tr>")
    return ("<table class='examples'><tr><th>family</th><th>prompt</th><th>SFT</th><th>final "
            f"({html.escape(final.name)})</th></tr>{''.join(cells)}</table>")


def reward_scaling(run: Path) -> str:
    """The run's reward-scaling study (Figure 6), if any: its plot and, per number of training
    pairs and model, the accuracy against the graders on the ranked held-out pairs."""
    result = _json(run / REWARD_SCALING_DIR / "reward_scaling.json")
    if not result or not result.get("points"):
        return ""
    header, rows = table_rows(result)
    return (f"<h2>Reward-model accuracy vs data and model size (Figure 6)</h2><img src='{_png(plot_scaling(result))}'>"
            f"<p>{html.escape(result['objective'])} reward models, accuracy against the graders on the "
            f"{result['ranked_test_pairs']} held-out pairs they rank, 95% CI, n pairs:</p>" + _table(rows, header))


def multi_turn_section(run: Path) -> str:
    """Ghost Attention's multi-turn evaluation (Appendix A.3.5, Figure 10), if the run has one: per
    turn, the share of answers that keep the system instruction, with and without GAtt; the
    adherence plot, and the attention plot when it was drawn."""
    found = sorted(run.glob("v*/multi_turn/multi_turn.json"))
    if not found:
        return ""
    d = found[-1].parent
    result = json.loads(found[-1].read_text())
    names = [n for n in ("model", "baseline") if n in result]
    turns = max(len(result[n]["overall"]) for n in names)
    rows = []
    for t in range(turns):
        row = [t + 1]
        for n in names:
            r = result[n]["overall"][t] if t < len(result[n]["overall"]) else None
            row.append(f"{r['share']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] (n={r['n']})" if r else "—")
        rows.append(row)
    labels = {"model": "with GAtt", "baseline": "without GAtt"}
    parts = [f"<h2>Ghost Attention: instructions kept turn by turn</h2><p>{result['dialogs']} dialogs, the system "
             f"instruction given once; share of answers that still keep it (by its checker), 95% CI. Groups: "
             f"{html.escape(json.dumps(result.get('groups', {})))}.</p>",
             _table(rows, ["turn"] + [f"{labels[n]} ({html.escape(Path(result['paths'][n]).parent.parent.name)})"
                                      for n in names])]
    for name in ("adherence.png", "attention.png"):
        parts.append(_img_file(d / name))
    return "".join(parts)


def _img_file(path: Path) -> str:
    return f"<img src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'>" if path.is_file() else ""


def safety_sections(run: Path) -> str:
    """Context distillation (§4.2.4, Figure 16) and the red-teaming rounds (§4.3), where the run has them."""
    parts = []
    for stats_file in sorted(run.glob("v*/context_distill/stats.json")):
        st = json.loads(stats_file.read_text())
        rows = [[c, v.get("kept"), v.get("dropped_by_gate"), v.get("unusable")]
                for c, v in sorted(st.get("by_risk_category", {}).items())]
        mean = st.get("mean_score", {})
        parts.append(f"<h2>Safety context distillation ({html.escape(stats_file.parent.parent.name)}, Figure 16)</h2>"
                     f"<p>kept {st.get('kept')} of {st.get('prompts')} distilled answers ({st.get('dropped_by_gate')} "
                     f"dropped by the safety-RM gate, {st.get('unusable')} unusable); mean safety RM score: "
                     + ", ".join(f"{html.escape(k)} {v:.3f}" for k, v in mean.items()) + "</p>"
                     + _table(rows, ["risk category", "kept", "dropped by the gate", "unusable"])
                     + _img_file(stats_file.parent / "figure16.png"))
    rounds = [_json(p) for p in sorted(run.glob("redteam/round*/redteam.json"))]
    if rounds:
        rows = []
        for r in rounds:
            prev = r.get("previous_violations")
            rows.append([r["round"], Path(r["model"]).parent.name + "/" + Path(r["model"]).name, r["attempts"],
                         r["violating"], f"{r['gamma']:.1f}",
                         f"{prev['mitigated']}/{prev['prompts']} = {prev['share']:.2f} "
                         f"[{prev['ci95'][0]:.2f}, {prev['ci95'][1]:.2f}]" if prev else "—"])
        by_cat = sorted({k for r in rounds for k in r.get("by_risk_category", {})})
        cat_rows = [[c] + [f"{r['by_risk_category'][c]['gamma']:.1f}" if c in r.get("by_risk_category", {}) else "—"
                           for r in rounds] for c in by_cat]
        parts.append("<h2>Red-teaming rounds (§4.3)</h2><p>γ: violating prompts found per 1,000 attempts (the paper: "
                     "per person-hour); the later round also asks the earlier round's violating prompts.</p>"
                     + _table(rows, ["round", "model", "attempts", "violating", "γ", "earlier violations mitigated"])
                     + _table(cat_rows, ["risk category"] + [f"γ, round {r['round']}" for r in rounds]))
    return "".join(parts)


def safety_scaling_section(run: Path) -> str:
    """The safety-data scaling study (§4.2.3, Figures 15 and 33), where the run has it."""
    study = _json(run / "safety_scaling" / "safety_scaling.json")
    if not study:
        return ""

    def num(x, fmt=".3f"):
        return "—" if x is None else format(x, fmt)

    rows = []
    for r in study["results"]:
        s, h, g, fr = r.get("safety_rm", {}), r.get("helpfulness_rm", {}), r["graders"], r["false_refusal"]
        rows.append([f"{r['share'] * 100:g}%", r["safety_examples"], num(s.get("mean")), num(s.get("low_tail")),
                     num(h.get("mean")), num(g.get("violation_rate")), num(g.get("helpfulness")),
                     f"{fr['helpful']['rate']:.3f} [{fr['helpful']['ci95'][0]:.3f}, {fr['helpful']['ci95'][1]:.3f}]",
                     f"{fr['borderline']['rate']:.3f} [{fr['borderline']['ci95'][0]:.3f}, "
                     f"{fr['borderline']['ci95'][1]:.3f}]"])
    n = study.get("eval_prompts", {})
    return ("<h2>Safety-data scaling (§4.2.3, Figures 15 and 33)</h2>"
            f"<p>Tuning: {html.escape(study['tuning'])} on {study['helpfulness_examples']} helpfulness examples (fixed) "
            f"and a share of {study['safety_examples']} safety examples; measured on {n.get('helpful', '?')} helpful, "
            f"{n.get('safety', '?')} adversarial and {n.get('borderline', '?')} borderline held-out prompts. The paper: "
            "the safety RM score rises and its low tail vanishes with more safety data, helpfulness stays flat, "
            "false refusals rise (most on borderline prompts).</p>"
            + _table(rows, ["safety data", "safety examples", "safety RM mean", "safety RM p10", "helpfulness RM mean",
                            "violation rate (raters)", "helpfulness (graders)", "false refusal, helpful [95% CI]",
                            "false refusal, borderline [95% CI]"])
            + _img_file(run / "safety_scaling" / "figure15.png") + _img_file(run / "safety_scaling" / "figure33.png"))


# ----------------------------------------------------------------------------- §4.4 and §5.1 from the evaluations


def _model_label(run: Path, path: str) -> str:
    """SFT, vK or control: the run directory a model path lies in (its first part below the run's root,
    else the first such part of the path)."""
    names = {"sft": "SFT", "control": "control"}
    try:
        parts = Path(path).resolve().relative_to(run.resolve()).parts[:1]
    except ValueError:
        parts = Path(path).parts
    for part in parts:
        if part in names or (part[:1] == "v" and part[1:].isdigit()):
            return names.get(part, part)
    return Path(path).name or str(path)


def safety_models(run: Path) -> list[tuple[str, dict]]:
    """(label, evaluation block) per model with a safety evaluation: SFT (the `baseline0` of the
    versions' evaluations), each version vK (the `model` of RUN/vK/eval/eval.json) and the
    compute-matched control (the `baseline0` of RUN/control/eval/eval.json)."""
    versions = win_rates(run)
    out = []
    sft = next((ev["baseline0"] for _, ev in reversed(versions) if ev.get("baseline0", {}).get("safety")), None)
    if sft:
        out.append(("SFT", sft))
    out += [(name, ev["model"]) for name, ev in versions if ev.get("model", {}).get("safety")]
    ctrl = _json(run / "control" / "eval" / "eval.json")
    if ctrl and ctrl.get("baseline0", {}).get("safety"):
        out.append(("control", ctrl["baseline0"]))
    return out


def _rate(d: dict) -> tuple[float, float, float, int, int]:
    """(rate, CI low, CI high, n, violations) of a violation count: the 95% Wilson interval from n and
    violations where `ci95` is missing (violations from the rate where they are)."""
    n = int(d.get("n", 0))
    rate = d.get("violation_rate")
    v = d.get("violations")
    if v is None:
        v = round((rate or 0.0) * n)
    if rate is None:
        rate = v / n if n else 0.0
    lo, hi = d.get("ci95") or wilson_interval(int(v), n)
    return float(rate), float(lo), float(hi), n, int(v)


def _rate_cell(d: dict | None) -> str:
    if not d:
        return "—"
    r, lo, hi, n, v = _rate(d)
    return f"{100 * r:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({v}/{n})"


def _bars(ax, groups: list[str], series: list[tuple[str, dict]], title: str) -> None:
    """Grouped bars of violation rate (%) with their 95% intervals: one group per key, one bar per
    (label, {key: counts}) series; a missing key leaves a gap."""
    width = 0.8 / max(len(series), 1)
    for i, (label, by) in enumerate(series):
        pts = [(g, _rate(by[k])) for g, k in enumerate(groups) if k in by]
        if not pts:
            continue
        xs = [g - 0.4 + width * (i + 0.5) for g, _ in pts]
        ys = [100 * r[0] for _, r in pts]
        err = [[100 * (r[0] - r[1]) for _, r in pts], [100 * (r[2] - r[0]) for _, r in pts]]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=label)
    ax.set_xticks(range(len(groups)), [g.replace("_", " ") for g in groups], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("violation rate (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def plot_safety_vs_helpfulness(models: list[tuple[str, dict]]) -> str:
    """Figure 17's analogue: overall violation rate against mean helpfulness (graders), per model."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for label, m in models:
        r, lo, hi, _, _ = _rate(m["safety"])
        ax.errorbar([m.get("helpfulness", 0.0)], [100 * r], yerr=[[100 * (r - lo)], [100 * (hi - r)]], fmt="o",
                    capsize=3, label=label)
    ax.set_xlabel("mean helpfulness (graders)")
    ax.set_ylabel("violation rate (%), 95% CI")
    ax.set_title("Violation rate vs helpfulness per model (Figure 17)", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def _safety_table(models: list[tuple[str, dict]]) -> str:
    rows = []
    for label, m in models:
        s = m["safety"]
        _, _, _, n, v = _rate(s)
        rows.append([label, n, v, _rate_cell(s), s.get("mean_rating", "—"), s.get("percent_agreement", "—"),
                     s.get("ac1", "—"), s.get("ac2_ordinal", "—")])
    return _table(rows, ["model", "adversarial prompts", "violations", "violation rate, 95% CI",
                         "mean Likert rating", "percent agreement", "Gwet AC1", "Gwet AC2 (ordinal)"])


def _per_turn(mt: dict) -> list[tuple[str, dict]]:
    """The multi-turn evaluation's per-turn counts, as (turn, counts), whether a list or a mapping."""
    per = mt.get("per_turn") or []
    if isinstance(per, list):  # an evaluation from before per-turn counts: rates of every dialog's turn k
        per = [{"n": mt.get("n", 0), "violation_rate": d} if isinstance(d, (int, float)) else d for d in per]
    items = per.items() if isinstance(per, dict) else ((str(d.get("turn", i + 1)) if isinstance(d, dict) else str(i + 1), d)
                                                      for i, d in enumerate(per))
    return [(str(k), d) for k, d in items if isinstance(d, dict) and "n" in d]


def multi_turn_safety(models: list[tuple[str, dict]]) -> str:
    """Figure 18's analogue, where the evaluation has `safety_multi_turn`: single-turn against
    multi-turn violation rates per model, and per turn of the adversarial dialogs."""
    models = [(label, m) for label, m in models if m.get("safety_multi_turn")]
    if not models:
        return ""
    fig = Figure(figsize=(max(4.0, 1.2 * len(models) + 2), 3.2))
    ax = fig.subplots()
    labels = [label for label, _ in models]
    _bars(ax, labels, [("single-turn", {label: m["safety"] for label, m in models}),
                       ("multi-turn", {label: m["safety_multi_turn"] for label, m in models})],
          "Single-turn vs multi-turn violation rate (Figure 18)")
    rows = [[label, _rate_cell(m["safety"]), _rate_cell(m["safety_multi_turn"])] for label, m in models]
    parts = [f"<h3>Single-turn and multi-turn adversarial prompts (Figure 18)</h3><img src='{_png(fig)}'>",
             _table(rows, ["model", "single-turn violation rate, 95% CI (violations/n)",
                           "multi-turn violation rate, 95% CI (violations/n)"])]
    turns = sorted({t for _, m in models for t, _ in _per_turn(m["safety_multi_turn"])}, key=lambda t: (len(t), t))
    if turns:
        per = {label: dict(_per_turn(m["safety_multi_turn"])) for label, m in models}
        parts.append(_table([[t] + [_rate_cell(per[label].get(t)) for label in labels] for t in turns],
                            ["turn"] + [f"{label}: violation rate, 95% CI" for label in labels]))
    return "".join(parts)


def risk_breakdown(models: list[tuple[str, dict]]) -> str:
    """Figure 19's analogue: violation rate per risk category and per attack vector, per model."""
    models = [(label, m) for label, m in models if m.get("safety_breakdown")]
    panels = [(key, title) for key, title in (("by_risk_category", "per risk category"),
                                              ("by_attack_vector", "per attack vector"))
              if any(m["safety_breakdown"].get(key) for _, m in models)]
    if not panels:
        return ""
    fig = Figure(figsize=(6 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    tables = []
    for ax, (key, title) in zip(axes, panels):
        groups = sorted({g for _, m in models for g in m["safety_breakdown"].get(key, {})})
        series = [(label, m["safety_breakdown"].get(key, {})) for label, m in models]
        _bars(ax, groups, series, f"violation rate {title} (Figure 19)")
        tables.append(_table([[g] + [_rate_cell(by.get(g)) for _, by in series] for g in groups],
                             [key.removeprefix("by_").replace("_", " ")]
                             + [f"{label}: violation rate, 95% CI (violations/n)" for label, _ in series]))
    return ("<h3>Violations per risk category and attack vector (Figure 19)</h3>"
            f"<img src='{_png(fig)}'>" + "".join(tables))


def _refusal_detector(run: Path) -> dict | None:
    """The false-refusal detector's measured accuracy, where an evaluation recorded it."""
    for _, ev in reversed(win_rates(run)):
        for d in (ev.get("refusal_detector"), ev.get("model", {}).get("refusal_detector")):
            if isinstance(d, dict) and "accuracy" in d:
                return d
    return None


def false_refusal_line(run: Path, models: list[tuple[str, dict]]) -> str:
    rates = [f"{html.escape(label)} {m['false_refusal_helpful']:.3f} / {m['false_refusal_borderline']:.3f}"
             for label, m in models if "false_refusal_helpful" in m and "false_refusal_borderline" in m]
    if not rates:
        return ""
    line = "False refusals (helpful / borderline prompts): " + "; ".join(rates) + "."
    d = _refusal_detector(run)
    if d:
        ci = d.get("ci95")
        line += (f" The refusal detector, measured on {d.get('n', '?')} labelled answers: accuracy "
                 f"{d['accuracy']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
                 + "".join(f", {k} {d[k]:.3f}" for k in ("precision", "recall") if isinstance(d.get(k), (int, float)))
                 + ".")
    return f"<p class='refusals'>{line}</p>"


def safety_evaluations(run: Path) -> str:
    """§4.4 from the run's evaluations: violation rate against helpfulness per model (Figure 17),
    single- vs multi-turn (Figure 18, where evaluated), per risk category and attack vector
    (Figure 19), the raters' reliability and the false-refusal rates. Empty without a safety evaluation."""
    models = safety_models(run)
    if not models:
        return ""
    n = max(_rate(m["safety"])[3] for _, m in models)
    return ("<h2>Safety evaluations (§4.4)</h2>"
            f"<p>Adversarial evaluation prompts (up to {n} per model), each answer rated by three simulated raters "
            "on a 5-point Likert scale; a violation is a majority rating of 1 or 2; 95% Wilson intervals.</p>"
            f"<img src='{plot_safety_vs_helpfulness(models)}'>" + _safety_table(models)
            + false_refusal_line(run, models) + multi_turn_safety(models) + risk_breakdown(models))


def diversity_section(run: Path) -> str:
    """The `diversity` stage's Self-BLEU per model, prompt type and temperature (§5.1, Figure 21)."""
    result = _json(run / "diversity" / "diversity.json")
    if not result or not result.get("models"):
        return ""
    labels = result.get("labels") or {}
    labelled = {**result, "models": {labels.get(p) or _model_label(run, p): by for p, by in result["models"].items()}}
    buf = io.BytesIO()
    plot_self_bleu(labelled, buf)
    img = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    rows = [[label, kind] + [f"{r['self_bleu']:.1f}" for r in rows_]
            for label, by in labelled["models"].items() for kind, rows_ in by.items()]
    temps = [f"T={float(t):g}" for t in result.get("temperatures", [])]
    return ("<h2>Diversity vs temperature (§5.1, Figure 21)</h2>"
            f"<p>Self-BLEU (0–100, lower is more diverse) of {result.get('samples')} answers per prompt at each "
            f"temperature, averaged over {', '.join(f'{len(v)} {k}' for k, v in result.get('prompts', {}).items())} "
            "prompts.</p>" f"<img src='{img}'>" + _table(rows, ["model", "prompts"] + temps))


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """The page leads with the answer (the headline table, per family), then the plots, then
    example answers side by side; the raw summary comes last."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run directory")
    out = Path(out) if out else run / "report.html"
    parts = [f"<h1>Llama 2 recipe run: {html.escape(str(run))}</h1>"]
    summary = _json(run / "summary.json") or {}
    if summary.get("versions"):
        parts.append("<h2>Each version against SFT</h2>" + headline(run, summary))
        if summary.get("final_model"):
            parts.append(f"<p>final model: <code>{html.escape(summary['final_model'])}</code></p>")
    by_family = family_win_rates(run)
    if by_family:
        parts.append("<h2>Win rate by task family (graders)</h2>" + by_family)
    rows = []
    for name, ev in win_rates(run):
        m = ev["model"]
        g = ev.get("vs_baseline0", {}).get("graders", {})
        rows.append([name, m["helpfulness"], m.get("safety", {}).get("violation_rate", float("nan")),
                     m["false_refusal_helpful"], m["false_refusal_borderline"], g.get("win_rate", float("nan")),
                     f"[{g.get('ci95', [0, 0])[0]:.3f}, {g.get('ci95', [0, 0])[1]:.3f}]", g.get("tie_rate", float("nan"))])
    if rows and not summary.get("versions"):  # a run still going: what its evaluations say so far
        parts.append("<h2>Evaluation per version</h2>" + _table(
            rows, ["version", "helpfulness", "violation rate", "false refusal (helpful)", "false refusal (borderline)",
                   "win rate vs SFT (graders)", "95% CI", "ties"]))
    for title, fn in [("Win rate per version (Figure 11)", plot_win_rates), ("Training losses", plot_losses),
                      ("Reward-model accuracy by rating (Tables 7–8)", plot_reward_accuracy),
                      ("Best-of-N (Figures 7–8)", plot_best_of_n), ("PPO", plot_ppo),
                      ("Reward distributions per version", plot_reward_distributions)]:
        img = fn(run)
        if img:
            parts.append(f"<h2>{title}</h2><img src='{img}'>")
        if fn is plot_reward_accuracy:
            parts.append(reward_scaling(run))
    parts.append(multi_turn_section(run))
    parts.append(safety_evaluations(run))
    parts.append(safety_sections(run))
    parts.append(safety_scaling_section(run))
    parts.append(diversity_section(run))
    side_by_side = examples(run, summary)
    if side_by_side:
        parts.append("<h2>Example answers: SFT and the final model on the same evaluation prompts</h2>" + side_by_side)
    if summary:
        parts.append("<h2>Raw summary</h2><pre>" + html.escape(json.dumps(summary, indent=2)) + "</pre>")
    style = ("<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}"
             "table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #ccc;padding:4px 8px;"
             "font-size:13px;vertical-align:top}.why{color:#666;font-size:12px;margin-top:4px}"
             "img{max-width:100%}</style>")
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>llama2 report</title>{style}</head>"
                   f"<body>{''.join(parts)}</body></html>\n")
    return out


def report_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llama2 report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--out", help="HTML file (default RUN_DIR/report.html)")
    a = p.parse_args(argv)
    path = write_report(a.run_dir, a.out)
    print(f"[report] {path}")
    return 0
