"""The safety-data scaling study (§4.2.3, Figures 15 and 33): nested data shares, the measures, a run."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from llama2.config import ConfigError, load_config
from llama2.gated_reward import load_scorer
from llama2.recipes.safety_scaling import (SafetyScalingConfig, check_config, dialog_data, group_of, main, measure,
                                          nested_shares, quantile)
from llama2.report import safety_scaling_section
from llama2.world.safety import adversarial_prompts, bad_answer, borderline_prompts, gold_answer

REPO = Path(__file__).resolve().parent.parent


def test_shares_are_nested_exact_and_seeded():
    picks = nested_shares(480, [0.0, 0.01, 0.1, 0.25, 0.5, 1.0], seed=3)
    assert [len(picks[s]) for s in sorted(picks)] == [0, 5, 48, 120, 240, 480]
    shares = sorted(picks)
    for small, large in zip(shares, shares[1:]):
        assert set(picks[small]) <= set(picks[large])  # a larger share only adds safety data
    assert picks[1.0] == list(range(480))
    assert nested_shares(480, [0.1], seed=3)[0.1] == picks[0.1]  # the same draw whatever the other shares
    assert nested_shares(480, [0.1], seed=4)[0.1] != picks[0.1]
    assert [len(v) for v in nested_shares(7, [0.5, 0.3], 0).values()] == [4, 2]  # round half up


def test_quantile_matches_linear_interpolation():
    assert quantile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.5
    assert quantile([0.0, 10.0], 0.1) == pytest.approx(1.0)
    assert quantile([5.0], 0.1) == 5.0


def held_out():
    rng = random.Random(0)
    helpful = [{"id": f"h{i}", "messages": [{"role": "user", "content": f"Calculate {i} + 2."}], "task": "arithmetic",
                "split": "eval", "is_safety": False,
                "reference": {"check": "number", "answer": i + 2, "gold": f"{i} + 2 = {i + 2}."}} for i in range(4)]
    return helpful + adversarial_prompts(rng, 6, split="eval") + borderline_prompts(rng, 4, split="eval")


def test_measure_judges_each_group_by_its_own_judge():
    records = held_out()
    assert [group_of(r) for r in records] == ["helpful"] * 4 + ["safety"] * 6 + ["borderline"] * 4
    rng = random.Random(1)
    answers = ([f"{i} + 2 = {i + 2}." for i in range(3)] + ["I cannot help with that."]  # one false refusal
               + [bad_answer(r, rng, "compliant") for r in records[4:6]]  # two violations
               + [gold_answer(r, rng) for r in records[6:10]]
               + ["I'm sorry, but I can't help with that."] * 2 + [gold_answer(r, rng) for r in records[12:]])
    scorers = {axis: load_scorer("grader", axis) for axis in ("helpfulness", "safety")}
    m = measure(records, answers, scorers, seed=0)
    assert m["n"] == {"helpful": 4, "safety": 6, "borderline": 4}
    assert m["false_refusal"]["helpful"]["count"] == 1 and m["false_refusal"]["borderline"]["count"] == 2
    assert m["false_refusal"]["borderline"]["rate"] == 0.5
    assert m["graders"]["violations"] == 2 and m["graders"]["violation_rate"] == pytest.approx(2 / 6)
    assert m["graders"]["helpfulness"] == pytest.approx(0.75)
    s = m["safety_rm"]
    assert len(s["scores"]) == 6 and s["low_tail"] <= s["mean"]
    assert sorted(s["scores"])[:2] == [min(s["scores"])] * 2  # the compliant answers score lowest
    assert len(m["helpfulness_rm"]["scores"]) == 4


def sft_file(path: Path, n_help=24, n_safe=12) -> Path:
    rng = random.Random(2)
    rows = [{"id": f"h{i}", "split": "train", "task": "arithmetic", "source": "test",
             "messages": [{"role": "user", "content": f"Calculate {i} + 3."},
                          {"role": "assistant", "content": f"{i} + 3 = {i + 3}."}]} for i in range(n_help)]
    for i, r in enumerate(adversarial_prompts(rng, n_safe)):
        rows.append({"id": f"s{i}", "split": "train", "task": "adversarial", "source": "test",
                     "messages": r["messages"] + [{"role": "assistant", "content": gold_answer(r, rng)}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dialog_data_splits_by_task_and_names_what_is_missing(tmp_path):
    helpful, safety = dialog_data(SafetyScalingConfig(data=[str(sft_file(tmp_path / "d.jsonl"))]))
    assert (len(helpful), len(safety)) == (24, 12)
    only_help = sft_file(tmp_path / "h.jsonl", n_safe=0)
    with pytest.raises(ConfigError, match="no dialog of a safety task \\(adversarial\\)"):
        dialog_data(SafetyScalingConfig(data=[str(only_help)]))
    with pytest.raises(ConfigError, match="shares: fractions"):
        check_config(SafetyScalingConfig(shares=[0.0, 1.5], tuning="sft", data=["x"], init="m", eval_prompts=["e"]))
    with pytest.raises(ConfigError, match="policy: the model"):
        check_config(SafetyScalingConfig(eval_prompts=["e"]))


def small_overrides(world_dir, policy, out, *extra):
    return [f"out_dir={out}", f"policy={policy}", "helpfulness_rm=grader", "safety_rm=grader",
            f"eval_prompts=[{world_dir / 'prompts' / 'eval.jsonl'}]", "eval_per_group=3", "eval_max_new_tokens=8",
            "sft.seq_len=128", "sft.batch_size=4", "sft.micro_batch_size=4", "sft.epochs=1", "sft.optim.lr=1e-3",
            "sft.optim.warmup_steps=1", "sft.ckpt_every=1000", "sft.eval_every=1000", *extra]


def test_sft_tuning_runs_every_share_and_a_rerun_reuses_them(world_dir, tiny_policy, tmp_path):
    out = tmp_path / "run" / "safety_scaling"  # where the pipeline's stage writes it
    data = sft_file(tmp_path / "d.jsonl")
    cfg = load_config(SafetyScalingConfig, None, small_overrides(
        world_dir, tiny_policy, out, "tuning=sft", f"data=[{data}]", "shares=[0.0,0.5]"))
    assert main(cfg) == 0
    study = json.loads((out / "safety_scaling.json").read_text())
    assert [r["share"] for r in study["results"]] == [0.0, 0.5]
    assert [r["safety_examples"] for r in study["results"]] == [0, 6]
    used = [len((out / d / "data.jsonl").read_text().splitlines()) for d in ("share-0pct", "share-50pct")]
    assert used == [24, 30]  # the helpfulness data is fixed; only the safety share grows
    r = study["results"][1]
    assert r["n"] == {"helpful": 3, "safety": 3, "borderline": 3} and len(r["safety_rm"]["scores"]) == 3
    assert (out / "figure15.png").stat().st_size > 10_000 and (out / "figure33.png").stat().st_size > 5_000
    section = safety_scaling_section(tmp_path / "run")
    assert "Figures 15 and 33" in section and section.count("<img src='data:image/png;base64,") == 2
    assert "<td>50%</td><td>6</td>" in section
    stamp = (out / "share-50pct" / "result.json").stat().st_mtime_ns
    assert main(cfg) == 0  # a rerun continues: the finished shares are read back, not retrained
    assert (out / "share-50pct" / "result.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="seed"):
        main(load_config(SafetyScalingConfig, None, small_overrides(
            world_dir, tiny_policy, out, "tuning=sft", f"data=[{data}]", "shares=[0.0,0.5]", "seed=1")))


def test_rejection_sampling_tuning_from_the_cli_resumes_exactly_after_a_kill(world_dir, tiny_policy, tmp_path):
    def run(out, env=None):
        return subprocess.run(
            [sys.executable, "-m", "llama2", "study", "safety-scaling", *small_overrides(
                world_dir, tiny_policy, out, f"prompts=[{world_dir / 'prompts' / 'train.jsonl'}]",
                "max_helpful_prompts=8", "max_safety_prompts=4", "k=2", "max_new_tokens=8", "drop_truncated=false",
                "chunk_prompts=4", "shares=[0.0,1.0]")],
            capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, **(env or {})})

    out = tmp_path / "rs"
    killed = run(out, {"LLAMA2_KILL_AT_SAMPLE_CHUNK": "2"})  # SIGKILL after the 2nd of 3 sampling chunks
    assert killed.returncode == -9 and not (out / "pool.jsonl").exists()
    proc = run(out)  # the same command again continues: the 2 chunks written are kept
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 of 3 chunks already sampled" in proc.stderr
    study = json.loads((out / "safety_scaling.json").read_text())
    pool = [json.loads(x) for x in (out / "pool.jsonl").read_text().splitlines()]
    assert study["safety_examples"] == sum(e["is_safety"] for e in pool) <= 4
    assert study["helpfulness_examples"] == sum(not e["is_safety"] for e in pool) <= 8
    assert [r["safety_examples"] for r in study["results"]] == [0, study["safety_examples"]]
    assert "100% safety" in proc.stdout
    clean = tmp_path / "clean"
    assert run(clean).returncode == 0  # never killed: the same data and the same measurements
    assert (clean / "pool.jsonl").read_text() == (out / "pool.jsonl").read_text()
    again = json.loads((clean / "safety_scaling.json").read_text())
    assert [{k: v for k, v in r.items() if k != "model"} for r in again["results"]] == \
        [{k: v for k, v in r.items() if k != "model"} for r in study["results"]]
