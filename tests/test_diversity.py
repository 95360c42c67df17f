"""Self-BLEU diversity (§5.1, Figure 21): the measure against sacrebleu and by hand, and the study on fake models."""
import json
import math

import pytest
import sacrebleu

from llama2.cli import main as cli_main
from llama2.config import ConfigError
from llama2.formats import write_jsonl
from llama2.recipes.diversity import DiversityConfig, check_config, diversity, main, self_bleu


def test_identical_samples_score_100_and_disjoint_ones_0():
    assert self_bleu(["the cat sat on the mat"] * 5) == pytest.approx(100.0)
    assert self_bleu(["red green blue", "one two three", "dog cat bird"]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least two samples"):
        self_bleu(["alone"])


def test_self_bleu_by_hand_and_against_sacrebleu():
    a, b = "the cat sat on a mat", "the cat sat on the mat"
    # a against b: 1-grams 5/6, 2-grams 3/5, 3-grams 2/4, 4-grams 1/3, same length (no brevity penalty);
    # b against a: 1-grams 5/6 ("the" twice, once in a), 2-grams 3/5, 3-grams 2/4, 4-grams 1/3
    by_hand = math.exp(sum(map(math.log, (5 / 6, 3 / 5, 2 / 4, 1 / 3))) / 4) * 100
    assert self_bleu([a, b]) == pytest.approx(by_hand)
    samples = ["the cat sat on a mat", "a cat sat on the mat today", "the dog ran in the park", "the cat ran"]
    expected = sum(sacrebleu.sentence_bleu(s, samples[:i] + samples[i + 1:]).score for i, s in enumerate(samples)) / 4
    assert self_bleu(samples) == pytest.approx(expected)


def fake_sampler(n_distinct_at):
    """Answers whose diversity grows with the temperature: ceil(n * T) distinct answers of n."""
    def sample(dialogs, n, temperature, seed):
        k = max(1, min(n, math.ceil(n * temperature)))
        return [[f"answer number {i % k} to {d[-1]['content']}" for i in range(n)] for d in dialogs]
    return sample


def prompt_file(tmp_path):
    recs = []
    for i in range(6):
        for task in ("fact", "creative", "arithmetic"):
            recs.append({"id": f"{task}-{i}", "messages": [{"role": "user", "content": f"{task} question {i}?"}],
                         "split": "eval", "batch": None, "is_safety": False, "risk_category": None,
                         "attack_vector": None, "task": task, "reference": {}})
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, recs)
    return path


def test_diversity_falls_as_temperature_rises(tmp_path):
    cfg = DiversityConfig(models=["a", "b"], prompts=[str(prompt_file(tmp_path))], prompts_per_type=4, samples=5,
                          temperatures=[0.1, 0.5, 1.0], out_dir=str(tmp_path / "div"))
    result = main(cfg, {"a": fake_sampler(None), "b": fake_sampler(None)})
    rows = result["models"]["a"]["creative"]
    assert rows[0]["self_bleu"] == pytest.approx(100.0) and rows[0]["distinct_share"] == pytest.approx(1 / 5)
    assert rows[0]["self_bleu"] > rows[1]["self_bleu"] > rows[2]["self_bleu"]
    assert all(r["prompts"] == 4 for r in rows)
    assert set(result["prompts"]) == {"factual", "creative"}
    assert all(pid.startswith("fact-") for pid in result["prompts"]["factual"])
    saved = json.loads((tmp_path / "div" / "diversity.json").read_text())
    assert saved["models"]["b"]["factual"][2]["temperature"] == 1.0
    assert (tmp_path / "div" / "self_bleu.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="must return 3 answers"):
        diversity({"factual": [{"messages": [{"role": "user", "content": "x"}]}]},
                  lambda d, n, t, s: [["one"]], [0.5], 3)


def test_config_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="models"):
        check_config(DiversityConfig())
    with pytest.raises(ConfigError, match="two samples"):
        check_config(DiversityConfig(models=["m"], prompts=["p"], samples=1))
    with pytest.raises(ConfigError, match="positive temperatures"):
        check_config(DiversityConfig(models=["m"], prompts=["p"], temperatures=[0.0, 1.0]))
    path = prompt_file(tmp_path)
    assert cli_main(["evaluate", "diversity", "--model", "m", "--prompts", str(path), "creative_tasks=[poem]"]) == 1
    assert "creative_tasks: no single-turn prompt of task(s) ['poem']" in capsys.readouterr().err
