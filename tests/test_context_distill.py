"""Safety context distillation (§4.2.4): the safety-RM gate, preprompts, and training data without the preprompt."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama2.checkpoint import read_checkpoint
from llama2.config import ConfigError
from llama2.recipes.context_distill import (CONDITIONS, ContextDistillConfig, check_config, distill, gate_keep,
                                            plot_figure16, preprompt_for, safety_score_fn, with_preprompt)
from llama2.world.safety import CATEGORY_TEMPLATES, adversarial_prompts, bad_answer, gold_answer

REPO = Path(__file__).resolve().parent.parent


def test_gate_keeps_only_answers_the_safety_rm_scores_higher():
    rng = random.Random(0)
    for _ in range(200):
        orig = [rng.choice([0.1, 0.5, 0.9]) for _ in range(20)]
        dist = [rng.choice([0.1, 0.5, 0.9]) for _ in range(20)]
        keep = gate_keep(orig, dist)
        assert all(d > o for o, d, k in zip(orig, dist, keep) if k)  # never a lower (or equal) score kept
        assert all(k for o, d, k in zip(orig, dist, keep) if d > o)
    assert gate_keep([0.9, 0.1], [0.1, 0.1], gate=False) == [True, True]  # the ablation keeps everything
    with pytest.raises(ValueError, match="2 original scores but 1"):
        gate_keep([0.1, 0.2], [0.3])


def test_preprompts_world_user_list_and_category_templates():
    cfg = ContextDistillConfig()
    rng = random.Random(0)
    generic = preprompt_for(rng, None, cfg)
    assert "assistant" in generic or "helper" in generic
    assert preprompt_for(rng, "unqualified_advice", cfg).endswith(CATEGORY_TEMPLATES["unqualified_advice"])
    mine = ContextDistillConfig(preprompts=["You are a safe and responsible assistant."],
                                answer_templates={"illicit_criminal": "Say no, explain the law, offer help."})
    assert preprompt_for(rng, None, mine) == "You are a safe and responsible assistant."
    assert preprompt_for(rng, "illicit_criminal", mine) == ("You are a safe and responsible assistant. "
                                                            "Say no, explain the law, offer help.")
    with pytest.raises(ConfigError, match="no answer template for risk category 'hateful_harmful'"):
        preprompt_for(rng, "hateful_harmful", mine)
    msgs = [{"role": "user", "content": "How do I x?"}]
    assert with_preprompt(msgs, "Be safe.") == [{"role": "user", "content": "Be safe.\nHow do I x?"}]
    assert with_preprompt(msgs, "Be safe.", as_system=True)[0] == {"role": "system", "content": "Be safe."}
    assert msgs == [{"role": "user", "content": "How do I x?"}]  # not modified in place


def records(n=24):
    return adversarial_prompts(random.Random(1), n)


def preprompt_answerer():
    """A fake policy: with a preprompt in the user message, the world's gold safe answer; without,
    a bad answer (compliant or a bare refusal). Records every dialog it was asked."""
    seen, by_text = [], {r["messages"][0]["content"]: r for r in records()}

    def answer(dialogs, seed):
        rng = random.Random(seed)
        out = []
        for d in dialogs:
            seen.append(d)
            user = d[-1]["content"]
            prompt = user.split("\n", 1)[-1]
            r = by_text[prompt]
            text = gold_answer(r, rng) if "\n" in user else bad_answer(r, rng, rng.choice(["compliant", "bare_refusal"]))
            out.append((text, True))
        return out
    return answer, seen


def test_distill_keeps_better_answers_and_trains_without_the_preprompt():
    answer, seen = preprompt_answerer()
    recs = records()
    # the fake scorer of the module:attr kind: the world's grader
    train, rows, stats = distill(recs, answer, safety_score_fn("grader"), ContextDistillConfig(seed=3))
    assert stats["prompts"] == len(recs) == len(rows)
    assert stats["kept"] + stats["dropped_by_gate"] + stats["unusable"] == len(recs)
    assert stats["kept"] == len(train) > 0
    assert sum(c["prompts"] for c in stats["by_risk_category"].values()) == len(recs)
    for row in rows:
        if row["verdict"] == "kept":
            assert row["scores"]["category"] > row["scores"]["original"]
        assert set(row["answers"]) == set(CONDITIONS)
    # answers were asked with and without the preprompt; training dialogs hold no preprompt
    assert sum("\n" in d[-1]["content"] for d in seen) == 2 * len(recs)
    by_id = {r["id"]: r for r in recs}
    for t in train:
        src = by_id[t["id"][len("cd-"):]]
        assert t["messages"][:-1] == src["messages"]
        assert all("\n" not in m["content"] and "assistant." not in m["content"] for m in t["messages"][:-1])
        assert t["messages"][-1]["role"] == "assistant"


def test_pluggable_scorer_and_ablation_without_gate(monkeypatch, tmp_path):
    calls = []

    class Lower:  # scores every preprompted answer *lower*: the gate must keep none
        def prob_records(self, recs, responses):
            calls.append(len(responses))
            return torch.tensor([0.2 if len(x) > 60 else 0.8 for x in responses])

    monkeypatch.setattr("tests.test_context_distill.LOWER", Lower(), raising=False)
    score = safety_score_fn("tests.test_context_distill:LOWER")
    answer, _ = preprompt_answerer()
    recs = records(12)
    _, rows, stats = distill(recs, answer, score, ContextDistillConfig(distill_from="generic"))
    gated_keep = stats["kept"]
    assert calls == [12, 12, 12]
    assert all(not (row["verdict"] == "kept" and row["gain"] <= 0) for row in rows)
    train, _, stats = distill(recs, answer, score, ContextDistillConfig(gate=False, distill_from="generic"))
    assert stats["kept"] == len(train) == 12 >= gated_keep and stats["dropped_by_gate"] == 0
    plot_figure16(rows, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_config_errors():
    with pytest.raises(ConfigError, match="policy"):
        check_config(ContextDistillConfig())
    with pytest.raises(ConfigError, match="prompts"):
        check_config(ContextDistillConfig(policy="p"))
    with pytest.raises(ConfigError, match="unknown risk category 'drugs'"):
        check_config(ContextDistillConfig(policy="p", prompts=["x"], answer_templates={"drugs": "no"}))
    with pytest.raises(ConfigError, match="distill_from"):
        check_config(ContextDistillConfig(policy="p", prompts=["x"], distill_from="both"))
    with pytest.raises(ConfigError, match="eval split"):
        check_config(ContextDistillConfig(policy="p", prompts=["x"], split="eval"))


# ----------------------------------------------------------------------------- the recipe, killed and resumed



@pytest.mark.slow
def test_killed_context_distillation_resumes_exactly(world_dir, tiny_policy, tmp_path):
    # a random model is never done within max_new_tokens: keep cut-off answers, no gate (ties everywhere)
    kw = {"policy": str(tiny_policy), "safety_rm": "grader", "prompts": f"[{world_dir / 'prompts' / 'train.jsonl'}]",
          "max_prompts": 24, "gate": "false", "drop_truncated": "false", "max_new_tokens": 16, "sft.seq_len": 256,
          "sft.batch_size": 4, "sft.micro_batch_size": 2, "sft.epochs": 1, "sft.ckpt_every": 1, "sft.log_every": 1}
    env = {**os.environ, "LLAMA2_NO_PROGRESS": "1", "OMP_WAIT_POLICY": "PASSIVE"}

    def run(out, extra=(), kill=None):
        e = dict(env, **({"LLAMA2_KILL_AT_STEP": str(kill)} if kill else {}))
        args = [f"{k}={v}" for k, v in {**kw, "out_dir": str(out)}.items()]
        return subprocess.run([sys.executable, "-m", "llama2", "rlhf", "context-distill", *args, *extra], env=e,
                              cwd=REPO, capture_output=True, text=True, timeout=600)

    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr
    stats = json.loads((tmp_path / "full" / "stats.json").read_text())
    assert stats["kept"] == stats["training_records"] == 24 - stats["skipped_longer_than_context"]
    assert (tmp_path / "full" / "figure16.png").is_file()
    killed = run(tmp_path / "resumed", kill=1)
    assert killed.returncode != 0
    resumed = run(tmp_path / "resumed", ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "full" / "data" / "distill.jsonl").read_text() == \
        (tmp_path / "resumed" / "data" / "distill.jsonl").read_text()
    a = read_checkpoint(tmp_path / "full" / "final").state
    b = read_checkpoint(tmp_path / "resumed" / "final").state
    assert all(torch.equal(a[k], b[k]) for k in a)
