"""Best-of-N analysis (Llama 2 §3.2.3, Figures 7 and 8): what rejection sampling can gain.

    llama2 rlhf best-of-n --policy CKPT --reward-models grader --prompts FILE --n 100 \
        --temperatures 0.6,0.8,1.0,1.2,1.4 --k 4 --out DIR

For each prompt, n answers are sampled once per temperature and scored with the safety-gated
reward Rc. The curve at N ≤ n is the expected max (and median) reward of a uniformly random
N-subset of those n answers, computed exactly from order statistics, then averaged over prompts.
Why not prefixes (the first N samples)? A prefix curve is one random draw per N: noisy, and its
max can only be as smooth as the luck of the draw. The subset expectation uses all n answers at
every N (lower variance for the same sampling cost), equals the mean reward at N = 1, and its max
is non-decreasing in N by construction. The gap between max and median is the potential gain of
rejection sampling (Figure 7); the temperature with the best max at the K the fine-tuning uses is
the one to sample with next (Figure 8: the best temperature moves as RLHF proceeds).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure  # no pyplot: no global backend state in a library

from llama2.formats import read_records
from llama2.gated_reward import load_gated_reward, prompt_axis
from llama2.inference import load_for_inference
from llama2.sampling import DialogSampler


def order_statistic_weights(n: int, N: int, j: int) -> torch.Tensor:
    """P(the j-th smallest of a random N-subset is the i-th smallest of all n), for i = 1..n.

    Choosing the subset = choosing j - 1 of the i - 1 smaller values and N - j of the n - i larger
    ones: C(i-1, j-1) C(n-i, N-j) / C(n, N). Exact integers, one rounding at the end.
    """
    total = math.comb(n, N)
    return torch.tensor([math.comb(i - 1, j - 1) * math.comb(n - i, N - j) / total for i in range(1, n + 1)],
                        dtype=torch.float64)


def subset_weights(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_max, W_median), each (n, n): row N-1 maps the n sorted rewards to the expected max /
    median of a random N-subset. An even N's median is the mean of its two middle values."""
    w_max = torch.stack([order_statistic_weights(n, N, N) for N in range(1, n + 1)])
    w_med = torch.stack([
        order_statistic_weights(n, N, (N + 1) // 2) if N % 2 else
        0.5 * (order_statistic_weights(n, N, N // 2) + order_statistic_weights(n, N, N // 2 + 1))
        for N in range(1, n + 1)])
    return w_max, w_med


def best_of_n_curves(rewards: torch.Tensor) -> dict:
    """Expected max and median reward among N samples, N = 1..n, averaged over prompts.

    rewards: (P, n), n samples of one prompt per row. Returns {"max": [n], "median": [n], "mean"}.
    """
    if rewards.dim() != 2 or rewards.shape[1] == 0:
        raise ValueError(f"rewards must be (prompts, samples), got shape {tuple(rewards.shape)}")
    n = rewards.shape[1]
    w_max, w_med = subset_weights(n)
    ranked = rewards.double().sort(dim=1).values  # (P, n) ascending
    return {"max": (ranked @ w_max.T).mean(0).tolist(),  # (P, n) @ (n, N) -> mean over prompts
            "median": (ranked @ w_med.T).mean(0).tolist(),
            "mean": ranked.mean().item()}


def judged_pick_curve(rewards: torch.Tensor, judged: torch.Tensor) -> list[float]:
    """The judge's expected score of the answer `rewards` ranks first among N random samples, N = 1..n,
    averaged over prompts: whether best-of-N by a reward model picks better answers by the judge's
    measure (e.g. the graders, the ground truth) as N grows, not only higher rewards.

    rewards, judged: (P, n), the same samples. The pick among a random N-subset is its max by reward,
    which is the i-th smallest of all n with the order statistic's weights; ties in reward are broken
    by sample order."""
    if rewards.shape != judged.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and judged {tuple(judged.shape)} differ in shape")
    n = rewards.shape[1]
    w_max, _ = subset_weights(n)
    order = torch.sort(rewards.double(), dim=1, stable=True).indices
    by_reward = judged.double().gather(1, order)  # the judge's scores in ascending reward order
    return (by_reward @ w_max.T).mean(0).tolist()


def choose_temperature(result: dict, k: int) -> float:
    """The temperature with the highest expected max reward among k samples (Figure 8); ties go
    to the lowest temperature (less risk of degenerate text at the same reward)."""
    if not 1 <= k <= result["n"]:
        raise ValueError(f"k={k}: the best-of-N result has curves for N = 1..{result['n']} only")
    temps = sorted(result["curves"], key=float)
    best = max(temps, key=lambda t: (result["curves"][t]["max"][k - 1], -float(t)))
    return float(best)


def best_of_n(sampler, reward, records: list[dict], n: int, temperatures: list[float], *, top_p: float = 1.0,
              max_new_tokens: int = 64, seed: int = 0, k: int | None = None, judge=None, log=print) -> dict:
    """Sample n answers per prompt at each temperature, score them with `reward` (a GatedReward),
    and return the curves. `sampler` is a DialogSampler; records are prompt records.

    Result (JSON-ready): n, prompts, temperatures, curves[str(T)] = {max, median, mean,
    used_safety}, rewards[str(T)] = the (P, n) table, seconds per temperature, and `chosen` =
    choose_temperature(result, k) when k is given. With a `judge` (another GatedReward, e.g. the
    world's graders), also curves[str(T)]["judged_pick"]: the judge's score of the reward's pick among
    N (`judged_pick_curve`), and ["judged_mean"].
    """
    if not records:
        raise ValueError("best-of-N needs at least one prompt")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    dialogs = [r["messages"] for r in records]
    flat_records = [r for r in records for _ in range(n)]  # sample-major order of sampler.sample
    result: dict = {"n": n, "prompts": len(records), "temperatures": [float(t) for t in temperatures],
                    "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
                    "curves": {}, "rewards": {}, "seconds": {}}
    for T in temperatures:
        t0 = time.perf_counter()
        # every temperature sees the same seed: the curves differ by temperature, not by luck
        outs = sampler.sample(dialogs, n, float(T), top_p, max_new_tokens, seed)
        t1 = time.perf_counter()
        texts = [c.text.strip() for per_prompt in outs for c in per_prompt]
        scores = reward(flat_records, texts)
        table = scores.gated.view(len(records), n)  # (P, n)
        curves = best_of_n_curves(table)
        curves["used_safety"] = scores.used_safety.float().mean().item()
        if judge is not None:
            judged = judge(flat_records, texts).gated.view(len(records), n)
            curves["judged_pick"] = judged_pick_curve(table, judged)
            curves["judged_mean"] = judged.double().mean().item()
        key = str(float(T))
        result["curves"][key] = curves
        result["rewards"][key] = table.tolist()
        result["seconds"][key] = {"sampling": round(t1 - t0, 3), "scoring": round(time.perf_counter() - t1, 3)}
        log(f"[best-of-n] T={T}: mean {curves['mean']:.3f}, max@{n} {curves['max'][-1]:.3f}, "
            f"median@{n} {curves['median'][-1]:.3f} ({t1 - t0:.1f}s sampling)"
            + (f"; the judge's score of the pick: N=1 {curves['judged_pick'][0]:.3f}, N={n} "
               f"{curves['judged_pick'][-1]:.3f}" if judge is not None else ""))
    if k is not None:
        result["k"] = k
        result["chosen"] = choose_temperature(result, k)
    return result


def plot_best_of_n(result: dict, out_dir: str | Path, temperature: float | None = None) -> list[Path]:
    """Figure 7 (max and median vs N at one temperature, the gap shaded) and Figure 8 (max vs N
    per temperature, log-scale N as in the paper). Returns the PNG paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    temps = sorted(result["curves"], key=float)
    if temperature is None:
        temperature = result.get("chosen", float(temps[len(temps) // 2]))
    key = min(temps, key=lambda t: abs(float(t) - temperature))
    Ns = list(range(1, result["n"] + 1))

    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    c = result["curves"][key]
    ax.plot(Ns, c["max"], label="max of N", color="tab:blue")
    ax.plot(Ns, c["median"], label="median of N", color="tab:orange")
    ax.fill_between(Ns, c["median"], c["max"], alpha=0.15, color="tab:blue", label="potential gain")
    if "judged_pick" in c:
        ax.plot(Ns, c["judged_pick"], label="the judge's score of the pick", color="tab:green", ls="--")
    ax.set(xlabel="N samples", ylabel="reward (Rc)", title=f"Max and median reward among N (T={float(key):g})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig7 = out / "best_of_n_max_median.png"
    fig.savefig(fig7, dpi=110)

    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    for t in temps:
        ax.plot(Ns, result["curves"][t]["max"], label=f"T={float(t):g}")
    if "k" in result:
        ax.axvline(result["k"], color="gray", ls="--", lw=1, label=f"K={result['k']}")
    ax.set_xscale("log")
    ax.set(xlabel="N samples (log scale)", ylabel="max reward among N (Rc)", title="Reward vs N per temperature")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig8 = out / "best_of_n_temperatures.png"
    fig.savefig(fig8, dpi=110)
    return [fig7, fig8]


def write_result(result: dict, out_dir: str | Path) -> Path:
    """best_of_n.json, written atomically (the recipe reuses it on resume)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "best_of_n.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result) + "\n")
    tmp.replace(path)
    return path


def load_prompt_records(paths: list[str], split: str | None, max_prompts: int, seed: int, where: str,
                        axes: list[str] | None = None) -> list[dict]:
    """Prompt records (`messages` ending with a user turn) of one split, only those whose
    `prompt_axis` is in `axes` if given; a seeded subset of `max_prompts` (0 = all), in file order
    so that chunks and seeds are stable across runs."""
    records, seen = [], {}
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"{where}: prompt file not found: {path}")
        for rec in read_records(path, "prompts"):
            if (split is not None and rec["split"] != split) or (axes is not None and prompt_axis(rec) not in axes):
                continue
            if rec["id"] in seen:
                raise ValueError(f"{where}: duplicate prompt id {rec['id']!r} in {path} (first in {seen[rec['id']]})")
            seen[rec["id"]] = path
            records.append(rec)
    if not records:
        raise ValueError(f"{where}: no prompts of split {split!r}"
                         + (f" for reward_axes {axes}" if axes is not None else "") + f" in {', '.join(map(str, paths))}")
    if 0 < max_prompts < len(records):
        keep = sorted(random.Random(seed).sample(range(len(records)), max_prompts))
        records = [records[i] for i in keep]
    return records


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llama2 rlhf best-of-n", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="checkpoint to sample from (any format llama2 convert reads)")
    p.add_argument("--reward-models", nargs="+", required=True, metavar="RM",
                   help="`grader` (the world's graders), one reward model (used for both axes), "
                        "or two: helpfulness then safety")
    p.add_argument("--prompts", nargs="+", required=True, help="prompt files (JSONL/Parquet)")
    p.add_argument("--split", default="train", help="use only prompts of this split (default train; 'any' for all)")
    p.add_argument("--max-prompts", type=int, default=64, help="a seeded random subset of the prompts (0 = all)")
    p.add_argument("--n", type=int, default=100, help="samples per prompt (paper: 100)")
    p.add_argument("--temperatures", default="0.6,0.8,1.0,1.2,1.4")
    p.add_argument("--k", type=int, default=None, help="the rejection-sampling K: choose the temperature for it")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="sequences decoded together")
    p.add_argument("--reward-batch-size", type=int, default=32)
    p.add_argument("--safety-threshold", type=float, default=0.15, help="the gate of §3.2.3")
    p.add_argument("--chat-format", default="auto", choices=["auto", "llama2", "template"])
    p.add_argument("--judge", nargs="+", metavar="RM", default=None,
                   help="also score the reward models' pick among N with this judge (as --reward-models; "
                        "`grader`: the world's graders, the ground truth): does the pick get better as N grows?")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="output directory (best_of_n.json and two PNG plots)")
    a = p.parse_args(argv)
    try:
        temperatures = [float(t) for t in a.temperatures.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--temperatures: expected comma-separated numbers, got {a.temperatures!r}") from None
    def gated(models: list[str], where: str):
        if len(models) > 2:
            raise ValueError(f"{where}: at most two (helpfulness, safety), got {len(models)}")
        helpful = models[0]
        safety = models[1] if len(models) == 2 else ("grader" if helpful == "grader" else "")
        return load_gated_reward(helpful, safety, a.safety_threshold, a.reward_batch_size, where=where)

    records = load_prompt_records(a.prompts, None if a.split == "any" else a.split, a.max_prompts, a.seed,
                                  "--prompts")
    reward = gated(a.reward_models, "--reward-models")
    judge = gated(a.judge, "--judge") if a.judge else None
    model, tok = load_for_inference(a.policy, a.device)
    sampler = DialogSampler(model, tok, a.chat_format, a.batch_size)
    result = best_of_n(sampler, reward, records, a.n, temperatures, top_p=a.top_p, max_new_tokens=a.max_new_tokens,
                       seed=a.seed, k=a.k, judge=judge)
    result["policy"] = str(a.policy)
    path = write_result(result, a.out)
    plots = plot_best_of_n(result, a.out)
    print(f"[best-of-n] wrote {path}, {', '.join(str(x) for x in plots)}")
    if "chosen" in result:
        print(f"[best-of-n] best temperature for K={a.k}: {result['chosen']:g}")
    return 0
