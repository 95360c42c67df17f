"""Rejection sampling (§3.2.3): the selection pool, the gated choice, best-of-N curves, the recipe
end to end with kill-and-resume of its sampling stage."""
import io
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llama2.recipes.best_of_n import (best_of_n, best_of_n_curves, choose_temperature, judged_pick_curve,
                                      plot_best_of_n)
from llama2.config import ConfigError, load_config
from llama2.generation import Completion
from llama2.recipes.rejection_sampling import (RejectionSamplingConfig, best_per_prompt, clear_preferences, main,
                                              score_samples, select_pool)
from llama2.gated_reward import GatedReward

REPO = Path(__file__).resolve().parent.parent


def entry(prompt, reward, iteration, sample=0, response=None):
    return {"prompt_id": prompt, "messages": [{"role": "user", "content": prompt}],
            "response": response or f"{prompt} answer from iteration {iteration}", "reward": reward,
            "iteration": iteration, "sample": sample}


# ----------------------------------------------------------------------------- the selection pool


def test_pool_all_keeps_the_best_answer_of_every_iteration():
    it1 = [entry("p1", 0.9, 1), entry("p2", 0.2, 1), entry("p3", 0.6, 1)]
    it2 = [entry("p1", 0.5, 2), entry("p2", 0.7, 2), entry("p4", 0.1, 2)]
    it3 = [entry("p1", 0.4, 3), entry("p3", 0.3, 3)]
    got = {e["prompt_id"]: (e["iteration"], e["reward"]) for e in select_pool([it1, it2, it3], "all")}
    # p1's best came in iteration 1 and survives two worse iterations; p3 was not sampled in 2
    assert got == {"p1": (1, 0.9), "p2": (2, 0.7), "p3": (1, 0.6), "p4": (2, 0.1)}


def test_pool_last_keeps_only_the_last_iteration():
    it1 = [entry("p1", 0.9, 1), entry("p2", 0.2, 1)]
    it2 = [entry("p1", 0.5, 2), entry("p3", 0.7, 2)]
    got = {e["prompt_id"]: (e["iteration"], e["reward"]) for e in select_pool([it1, it2], "last")}
    assert got == {"p1": (2, 0.5), "p3": (2, 0.7)}  # the better p1 of iteration 1 is forgotten
    with pytest.raises(ValueError, match="pool"):
        select_pool([it1], "best")


def test_pool_ties_are_broken_deterministically():
    it1 = [entry("p1", 0.5, 1), entry("p2", 0.8, 1, sample=3), entry("p2", 0.8, 1, sample=1)]
    it2 = [entry("p1", 0.5, 2), entry("p2", 0.3, 2)]
    expect = select_pool([it1, it2], "all")
    got = {e["prompt_id"]: (e["iteration"], e["sample"]) for e in expect}
    # equal reward: the more recent iteration, then the lower sample index
    assert got == {"p1": (2, 0), "p2": (1, 1)}
    for seed in range(5):  # the order entries arrive in never matters
        rng = random.Random(seed)
        shuffled = [rng.sample(p, len(p)) for p in (it1, it2)]
        assert select_pool(shuffled, "all") == expect
    assert [e["prompt_id"] for e in expect] == ["p1", "p2"]


class TableScorer:
    """A reward model given as a table: response text -> probability."""

    def __init__(self, table):
        self.table = table

    def prob(self, dialogs, responses):
        return torch.tensor([self.table[r] for r in responses])


def prompt(pid, is_safety):
    return {"id": pid, "messages": [{"role": "user", "content": f"question {pid}"}], "is_safety": is_safety,
            "task": "adversarial" if is_safety else "fact"}


def test_selection_follows_the_gated_reward():
    helpful = TableScorer({"A": 0.9, "B": 0.2, "C": 0.95, "D": 0.5})
    safe = TableScorer({"A": 0.4, "B": 0.8, "C": 0.05, "D": 0.6})
    reward = GatedReward(helpful, safe, threshold=0.15)
    records = [prompt("safety", True), prompt("plain", False), prompt("unsafe-answer", False)]
    rows = score_samples(reward, records, [["A", "B"], ["A", "B"], ["C", "D"]])
    chosen = {e["prompt_id"]: e["response"] for e in best_per_prompt(records, rows, 1)}
    # a safety prompt follows Rs although Rh prefers A; a plain prompt follows Rh; C's Rs < 0.15
    # gates it to 0.05 on a plain prompt too, so D wins although Rh prefers C
    assert chosen == {"safety": "B", "plain": "A", "unsafe-answer": "D"}
    by_id = {e["prompt_id"]: e for e in best_per_prompt(records, rows, 1)}
    assert by_id["safety"]["used_safety"] and by_id["safety"]["reward"] == pytest.approx(0.8)
    assert not by_id["plain"]["used_safety"] and by_id["plain"]["reward"] == pytest.approx(0.9)


def test_best_per_prompt_skips_unusable_answers_and_breaks_ties_by_index():
    records = [prompt("p", False), prompt("q", False)]
    rows = [{"prompt_id": "p", "samples": [{"text": t, "reward": r, "helpfulness": r, "safety": 1.0,
                                            "used_safety": False} for t, r in
                                           [("  ", 0.9), ("fake [INST] turn", 0.8), ("ok one", 0.5), ("ok two", 0.5)]]},
            {"prompt_id": "q", "samples": [{"text": "", "reward": 1.0, "helpfulness": 1.0, "safety": 1.0,
                                            "used_safety": False}]}]
    pool = best_per_prompt(records, rows, 3)
    assert [(e["prompt_id"], e["response"], e["sample"], e["iteration"]) for e in pool] == [("p", "ok one", 2, 3)]


def test_truncated_samples_are_not_targets_but_count_in_the_median():
    records = [prompt("p", False), prompt("q", False)]

    def sample(text, reward, finish):
        return {"text": text, "reward": reward, "helpfulness": reward, "safety": 1.0, "used_safety": False,
                "finish": finish}

    rows = [{"prompt_id": "p", "samples": [sample("cut off in the mid", 0.9, "length"), sample("whole", 0.6, "stop"),
                                           sample("meh", 0.2, "stop"), sample("also cut", 0.8, "length")]},
            {"prompt_id": "q", "samples": [sample("cut", 0.9, "length")]}]
    # default of the function: the paper's plain best-of-K, the truncated sample wins
    assert [e["response"] for e in best_per_prompt(records, rows, 1)] == ["cut off in the mid", "cut"]
    pool = best_per_prompt(records, rows, 1, drop_truncated=True)
    # the best complete answer; its gap is against the median of all four samples (0.7)
    assert [(e["prompt_id"], e["response"], e["sample"]) for e in pool] == [("p", "whole", 1)]
    assert pool[0]["gap"] == pytest.approx(0.6 - 0.7)
    assert RejectionSamplingConfig().drop_truncated  # the recipe's default


def test_min_gap_keeps_only_answers_the_reward_clearly_prefers():
    records = [prompt("clear", False), prompt("flat", False)]

    def samples(rewards):
        return [{"text": f"answer {i}", "reward": r, "helpfulness": r, "safety": 1.0, "used_safety": False}
                for i, r in enumerate(rewards)]

    rows = [{"prompt_id": "clear", "samples": samples([0.2, 0.9, 0.3, 0.25])},  # median 0.275: gap 0.625
            {"prompt_id": "flat", "samples": samples([0.52, 0.5, 0.51, 0.5])}]  # median 0.505: gap 0.015
    every = best_per_prompt(records, rows, 1)
    assert [(e["prompt_id"], round(e["gap"], 3)) for e in every] == [("clear", 0.625), ("flat", 0.015)]
    kept = clear_preferences(every, 0.1)
    assert [(e["prompt_id"], e["response"]) for e in kept] == [("clear", "answer 1")]
    with pytest.raises(ConfigError, match="min_gap"):
        from llama2.recipes.rejection_sampling import check_config

        check_config(RejectionSamplingConfig(policy=str(REPO), prompts=[__file__], min_gap=-0.1))


def test_reward_axes_choose_the_prompts_by_the_reward_model_that_judges_them(world_dir):
    from llama2.recipes.best_of_n import load_prompt_records
    from llama2.gated_reward import prompt_axis

    assert prompt_axis({"is_safety": True}) == "safety" and prompt_axis({"is_safety": False}) == "helpfulness"
    assert prompt_axis({}) == "helpfulness"
    path = [str(world_dir / "prompts" / "train.jsonl")]
    every = load_prompt_records(path, "train", 0, 0, "prompts")
    safety = load_prompt_records(path, "train", 0, 0, "prompts", ["safety"])
    helpful = load_prompt_records(path, "train", 0, 0, "prompts", ["helpfulness"])
    assert safety == [r for r in every if r["is_safety"]] and helpful == [r for r in every if not r["is_safety"]]
    assert load_prompt_records(path, "train", 0, 0, "prompts", ["helpfulness", "safety"]) == every
    # the subset of max_prompts is drawn from the chosen prompts
    subset = load_prompt_records(path, "train", 40, 3, "prompts", ["safety"])
    assert len(subset) == 40 and all(r["is_safety"] for r in subset)
    assert RejectionSamplingConfig().reward_axes == ["helpfulness", "safety"]  # the paper: all prompts
    from llama2.recipes.rejection_sampling import check_config

    for bad in ([], ["helpfulness", "honesty"]):
        with pytest.raises(ConfigError, match="reward_axes"):
            check_config(RejectionSamplingConfig(policy=str(REPO), prompts=[__file__], reward_axes=bad))


def test_a_short_selection_fine_tunes_with_the_batch_it_fills(world_tokenizer, world_dir, tmp_path):
    from llama2.recipes.rejection_sampling import fitting_batch
    from llama2.recipes.sft import SFTConfig

    lines = (world_dir / "sft" / "train.jsonl").read_text().splitlines()
    few, many = tmp_path / "few.jsonl", tmp_path / "many.jsonl"
    few.write_text("\n".join(lines[:5]) + "\n")
    many.write_text("\n".join(lines[:400]) + "\n")
    sft = SFTConfig(seq_len=256, batch_size=16, micro_batch_size=8)
    small = fitting_batch(replace(sft, train_data=[str(few)]), world_tokenizer, 512, 1)
    assert 1 <= small.batch_size < 16 and small.micro_batch_size == small.batch_size  # one rank here
    assert fitting_batch(replace(sft, train_data=[str(many)]), world_tokenizer, 512, 1) == \
        replace(sft, train_data=[str(many)])


# ----------------------------------------------------------------------------- best-of-N


def brute_force(table, N, stat):
    """Average over prompts of the mean over every N-subset of stat(subset)."""
    per_prompt = []
    for row in table:
        per_prompt.append(statistics.fmean(stat(s) for s in itertools.combinations(row, N)))
    return statistics.fmean(per_prompt)


def test_best_of_n_curves_match_hand_values_and_brute_force():
    c = best_of_n_curves(torch.tensor([[3.0, 0.0, 2.0, 1.0]]))
    assert c["max"] == pytest.approx([1.5, 14 / 6, 2.75, 3.0])  # N=2: 6 pairs, maxes 1,2,3,2,3,3
    assert c["median"] == pytest.approx([1.5, 1.5, 1.5, 1.5])
    assert c["mean"] == pytest.approx(1.5)

    rng = random.Random(0)
    table = [[rng.choice([0.0, 0.25, 0.5, 1.0]) if i % 2 else rng.random() for _ in range(7)] for i in range(4)]
    c = best_of_n_curves(torch.tensor(table))
    for N in range(1, 8):
        assert c["max"][N - 1] == pytest.approx(brute_force(table, N, max))
        assert c["median"][N - 1] == pytest.approx(brute_force(table, N, statistics.median))
    assert c["max"][0] == pytest.approx(statistics.fmean(x for row in table for x in row))  # N=1: the mean
    assert c["median"][0] == pytest.approx(c["max"][0])
    assert all(b >= a - 1e-12 for a, b in zip(c["max"], c["max"][1:]))  # non-decreasing in N
    assert all(m <= x + 1e-12 for m, x in zip(c["median"], c["max"]))
    assert c["max"][-1] == pytest.approx(statistics.fmean(max(row) for row in table))  # N=n: the best


def test_the_judge_scores_the_reward_model_pick_exactly_as_every_subset_would():
    """Figure 7 judged by the ground truth: the judge's score of the reward's argmax among N random
    samples, against brute force over every N-subset; a reward that agrees with the judge rises to
    the judge's best, one that contradicts it falls to the judge's worst."""
    rng = random.Random(1)
    rewards = [[rng.random() for _ in range(6)] for _ in range(3)]
    judged = [[rng.choice([0.0, 0.2, 1.0]) for _ in range(6)] for _ in range(3)]
    got = judged_pick_curve(torch.tensor(rewards), torch.tensor(judged))
    for N in range(1, 7):
        per_prompt = [statistics.fmean(judged[p][max(s, key=lambda i: rewards[p][i])]
                                       for s in itertools.combinations(range(6), N)) for p in range(3)]
        assert got[N - 1] == pytest.approx(statistics.fmean(per_prompt))
    truth = torch.tensor(judged)
    agree, contradict = judged_pick_curve(truth, truth), judged_pick_curve(-truth, truth)
    assert agree[-1] == pytest.approx(truth.max(1).values.mean().item())
    assert contradict[-1] == pytest.approx(truth.min(1).values.mean().item())
    assert agree[0] == pytest.approx(contradict[0]) == pytest.approx(truth.mean().item())  # N=1: a random sample


def test_best_of_n_curves_at_n_100_are_stable():
    torch.manual_seed(0)
    c = best_of_n_curves(torch.rand(5, 100))  # binomials up to C(100, 50) ~ 1e29 stay exact enough
    assert all(b >= a - 1e-9 for a, b in zip(c["max"], c["max"][1:]))
    assert 0.9 < c["max"][-1] <= 1.0 and abs(c["median"][-1] - 0.5) < 0.15
    assert c["max"][-1] - c["median"][-1] > c["max"][3] - c["median"][3]  # the gap widens with N


def test_choose_temperature_picks_the_argmax_at_k():
    result = {"n": 3, "curves": {
        "0.6": {"max": [0.50, 0.60, 0.65], "median": [0.5, 0.5, 0.5]},
        "1.0": {"max": [0.40, 0.62, 0.75], "median": [0.4, 0.4, 0.4]},
        "1.4": {"max": [0.30, 0.62, 0.70], "median": [0.3, 0.3, 0.3]}}}
    assert choose_temperature(result, 1) == 0.6
    assert choose_temperature(result, 2) == 1.0  # tie between 1.0 and 1.4: the lower temperature
    assert choose_temperature(result, 3) == 1.0
    with pytest.raises(ValueError, match="k=4"):
        choose_temperature(result, 4)


class FakeSampler:
    """Answers 'T<temperature> #j' for sample j: the reward below reads the score from the text."""

    def sample(self, dialogs, n, temperature, top_p, max_new_tokens, seed):
        return [[Completion([], f"{temperature} {i} {j}", [], "stop", 1) for j in range(n)]
                for i in range(len(dialogs))]


class TextReward:
    def __call__(self, records, responses):
        from llama2.gated_reward import RewardScores

        # reward = j / n at T = 1.0, half of that at other temperatures
        vals = torch.tensor([float(r.split()[2]) / 4 * (1.0 if r.startswith("1.0") else 0.5) for r in responses])
        return RewardScores(vals, vals, vals, torch.zeros(len(vals), dtype=torch.bool))


def test_best_of_n_function_and_plots(tmp_path):
    records = [prompt("a", False), prompt("b", False)]
    result = best_of_n(FakeSampler(), TextReward(), records, 4, [0.6, 1.0], k=2, log=lambda *_: None)
    assert result["rewards"]["1.0"] == [[0.0, 0.25, 0.5, 0.75]] * 2
    assert result["curves"]["1.0"]["max"] == pytest.approx([0.375, 0.25 * 14 / 6, 0.6875, 0.75])
    assert result["chosen"] == 1.0
    paths = plot_best_of_n(result, tmp_path)
    assert [p.name for p in paths] == ["best_of_n_max_median.png", "best_of_n_temperatures.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


# ----------------------------------------------------------------------------- the recipe end to end



def rs_overrides(world_dir, start, out, **kw):
    base = {"policy": str(start), "out_dir": str(out), "prompts": f"[{world_dir / 'prompts' / 'train.jsonl'}]",
            "max_prompts": 24, "k": 3, "max_new_tokens": 12, "chunk_prompts": 8, "iterations": 2,
            "temperature": 1.0, "sample_batch_size": 32, "sft.seq_len": 256, "sft.batch_size": 4,
            "sft.micro_batch_size": 4, "sft.epochs": 1, "sft.optim.lr": 1e-3, "sft.ckpt_every": 1,
            "sft.log_every": 1,
            # a random policy's answers all run to the 12-token limit: keep them, or nothing is left
            "drop_truncated": False,
            # a fixed temperature: these tests are about sampling, selection and resume (the
            # pipeline test runs the per-iteration sweep)
            "retune_temperature": False}
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def finished_run(world_dir, tiny_policy, tmp_path_factory):
    out = tmp_path_factory.mktemp("rs_run") / "run"
    main(load_config(RejectionSamplingConfig, REPO / "configs" / "rlhf" / "rejection_sampling_tiny.yaml",
                     rs_overrides(world_dir, tiny_policy, out)))
    return out


def test_tiny_recipe_runs_end_to_end(finished_run, world_dir, tiny_policy, monkeypatch, capsys):
    out = finished_run
    stats = json.loads((out / "stats.json").read_text())
    assert [s["iteration"] for s in stats] == [1, 2]
    for s in stats:
        assert s["samples"]["n"] == 24 * 3 and s["prompts"] == 24
        assert s["samples"]["mean"] <= s["best_of_k"]["mean"] <= s["selected"]["mean"] + 1e-9
        assert 0 <= s["samples"]["used_safety"] <= 1
        # where the time went, per phase (durations themselves depend on the machine)
        assert set(s["seconds"]) == {"tuning", "sampling", "scoring", "fine_tuning"}
        assert all(math.isfinite(v) and v >= 0 for v in s["seconds"].values())
    assert stats[1]["policy"] == str(out / "iter-1" / "sft" / "final")  # iteration 2 samples the new model
    pool1, pool2 = (
        [json.loads(x) for x in (out / "pool" / f"iter-{i}.jsonl").read_text().splitlines()] for i in (1, 2))
    assert {e["iteration"] for e in pool1} == {1} and {e["iteration"] for e in pool2} == {2}
    assert set(pool1[0]) >= {"prompt_id", "messages", "response", "reward", "iteration"}
    # the selection of iteration 2 is the per-prompt best over both pools, as SFT dialogs
    selected = [json.loads(x) for x in (out / "iter-2" / "selected.jsonl").read_text().splitlines()]
    best = {e["prompt_id"]: e["reward"] for e in select_pool([pool1, pool2], "all")}
    assert {r["id"]: r["meta"]["reward"] for r in selected} == {f"rs-{k}": v for k, v in best.items()}
    assert all(r["messages"][-1]["role"] == "assistant" for r in selected)
    # RUN/final is a checkpoint `llama2 chat` can load and talk with
    from llama2.chat import cli as chat_cli

    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2 plus 3?\n/exit\n"))
    assert chat_cli(["--model", str(out / "final"), "--max-new-tokens", "4", "--seed", "0"]) == 0
    assert "parameters" in capsys.readouterr().err
    # a finished run is not overwritten without --resume
    with pytest.raises(ConfigError, match="--resume"):
        main(load_config(RejectionSamplingConfig, None, rs_overrides(world_dir, tiny_policy, out)))


def test_no_clear_preference_keeps_the_policy(world_dir, tiny_policy, tmp_path, monkeypatch):
    # min_gap beyond any reward difference: nothing to fine-tune on, so the iteration keeps its
    # policy (instead of failing a pipeline) and RUN/final resolves to that policy
    monkeypatch.setenv("LLAMA2_NO_PROGRESS", "1")
    out = tmp_path / "run"
    main(load_config(RejectionSamplingConfig, REPO / "configs" / "rlhf" / "rejection_sampling_tiny.yaml",
                     rs_overrides(world_dir, tiny_policy, out, iterations=1, max_prompts=8, min_gap=1.5)))
    stats = json.loads((out / "iter-1" / "stats.json").read_text())
    assert stats["selected"]["n"] == 0 and stats["best_of_k"]["cleared_min_gap"] == 0
    assert stats["best_of_k"]["n"] == 8 and stats["samples"]["n"] == 8 * 3
    assert (out / "final").resolve() == Path(tiny_policy).resolve()
    assert not (out / "iter-1" / "sft" / "metrics.jsonl").exists()


def test_reward_axes_in_the_recipe(world_dir, tiny_policy, tmp_path, monkeypatch):
    # only safety prompts are sampled, and so only their answers are fine-tuned on
    monkeypatch.setenv("LLAMA2_NO_PROGRESS", "1")
    out = tmp_path / "run"
    main(load_config(RejectionSamplingConfig, REPO / "configs" / "rlhf" / "rejection_sampling_tiny.yaml",
                     rs_overrides(world_dir, tiny_policy, out, iterations=1, max_prompts=16,
                                  reward_axes="[safety]", replay=f"[{world_dir / 'sft' / 'train.jsonl'}]",
                                  replay_examples=5, replay_tasks="[borderline]")))
    by_id = {json.loads(x)["id"]: json.loads(x) for x in (world_dir / "prompts" / "train.jsonl").read_text().splitlines()}
    rows = [row for p in sorted((out / "iter-1" / "samples").glob("chunk-*.json"))
            for row in json.loads(p.read_text())["rows"]]
    assert len(rows) == 16 and all(by_id[row["prompt_id"]]["is_safety"] for row in rows)
    assert all(s["used_safety"] for row in rows for s in row["samples"])  # Rc = Rs on every one
    selected = [json.loads(x) for x in (out / "iter-1" / "selected.jsonl").read_text().splitlines()]
    picked = [r for r in selected if r["source"] == "rejection_sampling"]
    assert picked and all(by_id[r["id"].removeprefix("rs-")]["is_safety"] for r in picked)
    # ... plus 5 replayed SFT dialogs answering borderline prompts
    replayed = [r for r in selected if r["source"] != "rejection_sampling"]
    assert len(replayed) == 5 and all(r["task"] == "borderline" for r in replayed)
    assert json.loads((out / "iter-1" / "stats.json").read_text())["replayed"] == 5


def test_replay_draws_seeded_sft_dialogs_of_the_tasks_named(world_dir):
    from llama2.recipes.rejection_sampling import check_config, replay_dialogs

    path = [str(world_dir / "sft" / "train.jsonl")]
    a = replay_dialogs(path, 7, ["borderline"], 3)
    assert len(a) == 7 and all(r["task"] == "borderline" for r in a) and a == replay_dialogs(path, 7, ["borderline"], 3)
    assert a != replay_dialogs(path, 7, ["borderline"], 4)  # another iteration, another draw
    every = sum(1 for x in (world_dir / "sft" / "train.jsonl").read_text().splitlines()
                if json.loads(x).get("task") == "borderline")
    assert len(replay_dialogs(path, 10**6, ["borderline"], 0)) == every  # fewer than asked: all of them
    assert replay_dialogs(path, 0, [], 0) == [] and len(replay_dialogs(path, 3, [], 0)) == 3
    with pytest.raises(ConfigError, match="replay_examples"):
        check_config(RejectionSamplingConfig(policy=str(REPO), prompts=[__file__], replay_examples=5))


def test_killed_sampling_resumes_without_resampling(finished_run, world_dir, tiny_policy, tmp_path):
    env = {**os.environ, "LLAMA2_NO_PROGRESS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    args = [sys.executable, "-m", "llama2", "rlhf", "rejection-sampling",
            "--config", str(REPO / "configs" / "rlhf" / "rejection_sampling_tiny.yaml"),
            *rs_overrides(world_dir, tiny_policy, tmp_path / "run", iterations=1)]
    killed = subprocess.run(args, env={**env, "LLAMA2_KILL_AT_SAMPLE_CHUNK": "2"}, cwd=REPO, capture_output=True,
                            text=True, timeout=300, check=False)
    assert killed.returncode == -9, killed.stderr
    samples = tmp_path / "run" / "iter-1" / "samples"
    assert sorted(p.name for p in samples.glob("chunk-*.json")) == ["chunk-00000.json", "chunk-00001.json"]
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in samples.glob("chunk-*.json")}

    # resume; this time die after the first fine-tuning step (its checkpoint is written)
    resumed = subprocess.run(args + ["--resume"], env={**env, "LLAMA2_KILL_AT_STEP": "1"}, cwd=REPO,
                             capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == -9, resumed.stderr
    assert "2 of 3 chunks already sampled" in resumed.stderr
    for name, (mtime, data) in before.items():  # finished chunks were not sampled again
        p = samples / name
        assert (p.stat().st_mtime_ns, p.read_bytes()) == (mtime, data)
    assert not (tmp_path / "run" / "iter-1" / "sft" / "final").exists()

    done = subprocess.run(args + ["--resume"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "all 3 chunks already sampled" in done.stderr
    assert "(resuming)" in done.stderr  # the fine-tuning continued from its checkpoint
    # and the resumed run drew exactly what the uninterrupted run drew
    assert (tmp_path / "run" / "pool" / "iter-1.jsonl").read_text() == \
        (finished_run / "pool" / "iter-1.jsonl").read_text()
    assert (tmp_path / "run" / "final" / "model.json").is_file()


def test_config_errors_name_the_field(world_dir, tiny_policy, tmp_path):
    def run(**kw):
        main(load_config(RejectionSamplingConfig, None, rs_overrides(world_dir, tiny_policy, tmp_path / "x", **kw)))

    with pytest.raises(ConfigError, match="policy: checkpoint not found"):
        run(policy=tmp_path / "missing")
    with pytest.raises(ConfigError, match="safety_rm: reward model not found"):
        run(safety_rm=tmp_path / "rm")
    with pytest.raises(ConfigError, match="sft.model: set by the recipe"):
        run(**{"sft.model": str(tiny_policy)})
    with pytest.raises(ConfigError, match="pool"):
        run(pool="best")
    assert not (tmp_path / "x").exists()  # refused before any work


def test_rlhf_command_dispatch(capsys, monkeypatch):
    from llama2 import cli

    assert cli.main(["rlhf", "--help"]) == 0
    assert "rejection-sampling" in capsys.readouterr().out
    assert cli.main(["rlhf", "dpo"]) == 2
    assert "unknown command 'dpo'" in capsys.readouterr().err
    monkeypatch.setitem(cli.RLHF, "ppo", ("llama2.recipes.no_such_recipe:cli", ""))
    assert cli.main(["rlhf", "ppo"]) == 1
    assert "no module 'llama2.recipes.no_such_recipe'" in capsys.readouterr().err
