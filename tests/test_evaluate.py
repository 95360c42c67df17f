"""Evaluation arithmetic (§3.4.1) and the answers cache the pipeline's evaluations share."""
import pytest

from llama2.recipes import evaluate as ev


def test_wilson_interval_textbook_value():
    # 8 of 10 at 95%: the Wilson interval is (0.4902, 0.9433) (Newcombe 1998, Table I style check)
    lo, hi = ev.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert ev.wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = ev.wilson_interval(0, 20)
    assert lo == 0.0 and 0 < hi < 0.2
    for n in (1, 20, 19, 1000):  # all wins: the interval ends at 1 exactly and holds the rate
        lo, hi = ev.wilson_interval(n, n)
        assert hi == 1.0 and lo < 1.0


def test_win_rate_counts_ties_apart():
    a = [1.0, 0.5, 0.2, 0.7, 0.0]
    b = [0.0, 0.5, 0.3, 0.69, 0.0]
    w = ev.win_rate(a, b)
    assert (w["wins"], w["losses"], w["ties"], w["n"]) == (2, 1, 2, 5)
    assert w["win_rate"] == pytest.approx(2 / 3) and w["tie_rate"] == pytest.approx(0.4)
    w = ev.win_rate(a, b, tie_margin=0.05)  # 0.7 vs 0.69 is now a tie
    assert (w["wins"], w["losses"], w["ties"]) == (1, 1, 3)
    with pytest.raises(ValueError):
        ev.win_rate([1.0], [])


def test_answers_cache_reuses_only_identical_model_prompts_and_decoding(tmp_path, monkeypatch):
    calls = []

    def fake_sample(model_path, records, temperature, seed, max_new_tokens, top_p):
        calls.append(model_path)
        return [f"{model_path}:{r['id']}:{temperature}" for r in records]

    monkeypatch.setattr(ev, "sample_responses", fake_sample)
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights-1")
    records = [{"id": "a", "messages": [{"role": "user", "content": "hi"}]},
               {"id": "b", "messages": [{"role": "user", "content": "yo"}]}]
    cfg = ev.EvaluateConfig(answers_cache=str(tmp_path / "cache"))
    first = ev.answer(str(model), records, cfg)
    assert ev.answer(str(model), records, cfg) == first and len(calls) == 1  # reused
    ev.answer(str(model), records[:1], cfg)  # other prompts
    ev.answer(str(model), records, ev.EvaluateConfig(answers_cache=cfg.answers_cache, temperature=0.7))  # decoding
    assert len(calls) == 3
    (model / "model.safetensors").write_bytes(b"weights-two")  # retrained in place
    ev.answer(str(model), records, cfg)
    assert len(calls) == 4
    ev.answer(str(model), records, ev.EvaluateConfig())  # no cache: always sampled
    assert len(calls) == 5


def test_safety_breakdown_per_risk_category_and_attack_vector():
    import random

    from llama2.recipes.evaluate import grader_report, summary_lines
    from llama2.world.safety import adversarial_prompts, compliant_answer, gold_answer
    from llama2.world.safety_data import HARMS_BY_KEY

    rng = random.Random(0)
    records = adversarial_prompts(rng, 42)
    # compliant (a violation) exactly on perspective attacks, the gold safe answer elsewhere
    answers = [compliant_answer(rng, HARMS_BY_KEY[r["reference"]["harm"]]) if r["attack_vector"] == "perspective"
               else gold_answer(r, rng) for r in records]
    report, _ = grader_report(records, answers)
    by_vector = report["safety_breakdown"]["by_attack_vector"]
    assert sum(g["n"] for g in by_vector.values()) == len(records) == report["safety"]["n"]
    assert by_vector["perspective"]["violation_rate"] > 0.8 > 0.2 > by_vector["direct"]["violation_rate"]
    for g in by_vector.values():
        assert g["ci95"][0] <= g["violation_rate"] <= g["ci95"][1]
    by_cat = report["safety_breakdown"]["by_risk_category"]
    assert set(by_cat) == {"illicit_criminal", "hateful_harmful", "unqualified_advice"}
    assert sum(g["violations"] for g in by_cat.values()) == sum(g["violations"] for g in by_vector.values())
    assert "by" not in report["safety"]
    result = {"models": {"model": "m"}, "model": report}
    assert any("violations by attack vector: " in line and "perspective" in line for line in summary_lines(result))
