"""The pipeline's HTML report as a reader sees it: the answer first (each version against SFT,
per task family), then the plots, then example answers side by side, the raw summary last;
checked in a real headless browser (Chromium through selenium)."""
import json

import pytest

from llama2.formats import read_records
from llama2.recipes.evaluate import win_rate
from llama2.report import write_report
from llama2.world.grading import grade_helpfulness
from tests.conftest import chromium


@pytest.fixture(scope="module")
def run_dir(world_dir, tmp_path_factory):
    """A finished run in miniature: one version whose answers are the gold ones where SFT's are empty."""
    run = tmp_path_factory.mktemp("report") / "run"
    records = [r for r in read_records(world_dir / "prompts" / "eval.jsonl", "prompts")
               if not r["is_safety"] and r["task"] != "borderline"][:40]
    (run / "v1" / "eval").mkdir(parents=True)
    rows, ours, theirs = [], [], []
    for i, r in enumerate(records):
        mine = r["reference"]["gold"] if i % 4 else "I do not know."
        base = r["reference"]["gold"] if i % 2 else "I do not know."
        g_m, g_b = grade_helpfulness(r, mine).score, grade_helpfulness(r, base).score
        rows.append({"id": r["id"], "task": r["task"], "model": mine, "baseline0": base,
                     "model_grade": g_m, "baseline0_grade": g_b})
        ours.append(g_m)
        theirs.append(g_b)
    (run / "v1" / "eval" / "answers.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    w = win_rate(ours, theirs)
    ev = {"prompts": len(rows), "prompt_files": [str(world_dir / "prompts" / "eval.jsonl")],
          "models": {"model": "v1/final", "baseline0": "sft/final"}, "vs_baseline0": {"graders": w},
          "model": {"helpfulness": sum(ours) / len(ours), "false_refusal_helpful": 0.0, "false_refusal_borderline": 0.1},
          "baseline0": {"helpfulness": sum(theirs) / len(theirs), "false_refusal_helpful": 0.0,
                        "false_refusal_borderline": 0.1}}
    (run / "v1" / "eval" / "eval.json").write_text(json.dumps(ev))
    (run / "pretrain").mkdir()
    (run / "pretrain" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5 - s / 10}) + "\n"
                                                           for s in range(1, 6)))
    acc = {"n": 120, "accuracy": 0.7, "ci95": [0.61, 0.77]}
    summary = {"final_model": str(run / "v1" / "final"), "sft": {**ev["baseline0"], "violation_rate": 0.2},
               "versions": {"v1": {**ev["model"], "violation_rate": 0.1, "win_rate_vs_sft": {"graders": w},
                                   "reward_models_on_policy": {"helpfulness": {"graders_ranked": acc}, "safety": None}}}}
    (run / "summary.json").write_text(json.dumps(summary))
    return run, w


def test_the_report_leads_with_the_answer(run_dir):
    run, w = run_dir
    page = write_report(run).read_text()
    order = [page.index(h) for h in ("Each version against SFT", "Win rate by task family", "<img",
                                     "Example answers", "Raw summary")]
    assert order == sorted(order)
    assert f"{w['win_rate']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}]" in page
    assert f"{w['wins']}W / {w['losses']}L / {w['ties']}T" in page
    assert "0.700 [0.610, 0.770] (n=120)" in page  # the helpfulness RM's on-policy accuracy
    assert "I do not know." in page and "the answer" in page  # an answer and the graders' reason




def test_the_report_in_a_real_browser(run_dir, tmp_path):
    run, w = run_dir
    page = write_report(run, tmp_path / "report.html")
    driver = chromium()
    try:
        driver.get(page.as_uri())
        headings = [h.text for h in driver.find_elements("css selector", "h2")]
        assert headings[0] == "Each version against SFT" and headings[-1] == "Raw summary"
        first = driver.find_elements("css selector", "table")[0]
        cells = [td.text for td in first.find_elements("css selector", "tr")[2].find_elements("css selector", "td")]
        assert cells[0] == "v1" and cells[1].startswith(f"{w['win_rate']:.3f}")
        images = driver.find_elements("css selector", "img")
        assert images and all(driver.execute_script("return arguments[0].naturalWidth", i) > 100 for i in images)
        # the headline table is on the first screen, above the fold
        assert first.location["y"] < 600
        examples = driver.find_element("css selector", "table.examples")
        assert len(examples.find_elements("css selector", "tr")) == 13  # header + 12 prompts
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()
