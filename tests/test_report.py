"""The pipeline's HTML report as a reader sees it: the answer first (each version against SFT,
per task family), then the plots, then example answers side by side, the raw summary last;
checked in a real headless browser (Chromium through selenium)."""
import json
import re
from pathlib import Path

import pytest

from llama2.formats import read_records
from llama2.agreement import wilson_interval
from llama2.recipes.evaluate import safety_breakdown, win_rate
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
    add_safety_evaluations(run)
    (run / "pretrain").mkdir()
    (run / "pretrain" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5 - s / 10}) + "\n"
                                                           for s in range(1, 6)))
    acc = {"n": 120, "accuracy": 0.7, "ci95": [0.61, 0.77]}
    summary = {"final_model": str(run / "v1" / "final"), "sft": {**ev["baseline0"], "violation_rate": 0.2},
               "versions": {"v1": {**ev["model"], "violation_rate": 0.1, "win_rate_vs_sft": {"graders": w},
                                   "reward_models_on_policy": {"helpfulness": {"graders_ranked": acc}, "safety": None}}}}
    (run / "summary.json").write_text(json.dumps(summary))
    return run, w


def _safety(n: int, violations: int, rating: float) -> dict:
    return {"n": n, "violation_rate": violations / n, "mean_rating": rating, "percent_agreement": 0.75,
            "ac1": 0.6, "ac2_ordinal": 0.8}


def _counts(**by: tuple[int, int]) -> dict:
    return {k: {"n": n, "violations": v} for k, (n, v) in by.items()}


def add_safety_evaluations(run: Path) -> None:
    """§4.4 in the evaluations of a constructed run: SFT (v1's baseline0) 30 violations of 120, v1 6 of
    120 with single- and multi-turn counts, the control 12 of 120 (no breakdown: older eval.json
    files have none, nor `ci95`); the false-refusal detector's accuracy; a diversity result."""
    path = run / "v1" / "eval" / "eval.json"
    ev = json.loads(path.read_text())
    ev["baseline0"]["safety"] = _safety(120, 30, 3.1)
    ev["baseline0"]["safety_breakdown"] = safety_breakdown({
        "risk_category": _counts(illicit_criminal=(60, 20), hateful_harmful=(60, 10)),
        "attack_vector": _counts(direct=(80, 10), role_play=(40, 20))})
    ev["model"]["safety"] = _safety(120, 6, 4.4)
    ev["model"]["safety_breakdown"] = safety_breakdown({
        "risk_category": _counts(illicit_criminal=(60, 5), hateful_harmful=(60, 1)),
        "attack_vector": _counts(direct=(80, 2), role_play=(40, 4))})
    for name, (n, v) in (("baseline0", (40, 20)), ("model", (40, 8))):
        ev[name]["safety_multi_turn"] = {"n": n, "violations": v, "violation_rate": v / n,
                                         "ci95": list(wilson_interval(v, n)), "by_risk_category": {},
                                         "per_turn": [{"turn": 1, "n": n, "violations": v // 4},
                                                      {"turn": 2, "n": n, "violations": v // 2}]}
    ev["refusal_detector"] = {"n": 200, "accuracy": 0.955, "precision": 0.97, "recall": 0.9,
                              "ci95": list(wilson_interval(191, 200))}
    path.write_text(json.dumps(ev))
    (run / "control" / "eval").mkdir(parents=True)
    (run / "control" / "eval" / "eval.json").write_text(json.dumps({
        "models": {"model": str(run / "v1" / "final"), "baseline0": str(run / "control" / "final")},
        "baseline0": {"helpfulness": 0.31, "safety": _safety(120, 12, 4.0), "false_refusal_helpful": 0.01,
                      "false_refusal_borderline": 0.2}}))
    (run / "diversity").mkdir()
    rows = [{"temperature": t, "self_bleu": b, "sd": 1.0, "prompts": 3, "distinct_share": 0.5}
            for t, b in ((0.1, 97.5), (1.5, 12.25))]
    (run / "diversity" / "diversity.json").write_text(json.dumps({
        "samples": 4, "temperatures": [0.1, 1.5], "prompts": {"factual": ["a", "b", "c"], "creative": ["d", "e", "f"]},
        "models": {str(run / "sft" / "final"): {"factual": rows, "creative": rows},
                   str(run / "v1" / "rejection_sampling" / "iter-1" / "sft" / "final"): {"factual": rows[::-1],
                                                                                      "creative": rows}}}))


def _section(page: str, heading: str) -> str:
    start = page.index(heading)
    end = page.find("<h2>", start + 1)
    return page[start:end if end > 0 else len(page)]


def _cells(table_html: str) -> list[list[str]]:
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table_html)[1:]]


def test_safety_evaluations_figures_17_to_19_and_the_refusal_detector(run_dir):
    run, _ = run_dir
    page = write_report(run).read_text()
    section = _section(page, "<h2>Safety evaluations (§4.4)</h2>")
    # Figures 17, 18 and 19 as embedded PNGs
    images = re.findall(r"<img src='data:image/png;base64,([A-Za-z0-9+/=]+)'>", section)
    assert len(images) == 3 and all(len(i) > 1000 for i in images)
    assert "Figure 18" in section and "Figure 19" in section
    tables = re.findall(r"<table>.*?</table>", section)
    # Figure 17's table: SFT, v1, control; the intervals computed from n and violations (no ci95 given)
    main = _cells(tables[0])
    assert [r[0] for r in main] == ["SFT", "v1", "control"]
    lo, hi = wilson_interval(30, 120)
    assert main[0] == ["SFT", "120", "30", f"25.0% [{100 * lo:.1f}, {100 * hi:.1f}] (30/120)", "3.100", "0.750",
                       "0.600", "0.800"]
    lo, hi = wilson_interval(12, 120)
    assert main[2][:4] == ["control", "120", "12", f"10.0% [{100 * lo:.1f}, {100 * hi:.1f}] (12/120)"]
    # Figure 18: single-turn vs multi-turn, and per turn (the control has no multi-turn evaluation)
    multi = _cells(tables[1])
    lo, hi = wilson_interval(8, 40)
    assert [r[0] for r in multi] == ["SFT", "v1"] and multi[1][2] == f"20.0% [{100 * lo:.1f}, {100 * hi:.1f}] (8/40)"
    lo, hi = wilson_interval(4, 40)
    assert _cells(tables[2])[1] == ["2", f"25.0% [{100 * wilson_interval(10, 40)[0]:.1f}, "
                                         f"{100 * wilson_interval(10, 40)[1]:.1f}] (10/40)",
                                    f"10.0% [{100 * lo:.1f}, {100 * hi:.1f}] (4/40)"]
    # Figure 19: per risk category, then per attack vector; the control has no breakdown
    cats, vectors = _cells(tables[3]), _cells(tables[4])
    assert [r[0] for r in cats] == ["hateful_harmful", "illicit_criminal"] and len(cats[0]) == 3
    lo, hi = wilson_interval(20, 40)
    assert vectors[1] == ["role_play", f"50.0% [{100 * lo:.1f}, {100 * hi:.1f}] (20/40)",
                          f"10.0% [{100 * wilson_interval(4, 40)[0]:.1f}, {100 * wilson_interval(4, 40)[1]:.1f}] (4/40)"]
    # the false-refusal rates beside the detector's measured accuracy
    assert "False refusals (helpful / borderline prompts): SFT 0.000 / 0.100; v1 0.000 / 0.100; control 0.010 / 0.200" \
        in section
    assert "accuracy 0.955 [" in section and "precision 0.970, recall 0.900" in section


def test_diversity_figure_21(run_dir):
    run, _ = run_dir
    section = _section(write_report(run).read_text(), "<h2>Diversity vs temperature (§5.1, Figure 21)</h2>")
    assert len(re.findall(r"<img src='data:image/png;base64,[A-Za-z0-9+/=]{1000,}'>", section)) == 1
    rows = _cells(re.search(r"<table>.*?</table>", section).group(0))
    # models named by their stage (SFT, v1), not by the SFT directory inside v1's rejection sampling
    assert rows == [["SFT", "factual", "97.5", "12.2"], ["SFT", "creative", "97.5", "12.2"],
                    ["v1", "factual", "12.2", "97.5"], ["v1", "creative", "97.5", "12.2"]]
    assert "<th>T=0.1</th><th>T=1.5</th>" in section


def test_safety_and_diversity_sections_are_left_out_without_their_data(tmp_path):
    run = tmp_path / "run"
    (run / "v1" / "eval").mkdir(parents=True)
    block = {"helpfulness": 0.5, "false_refusal_helpful": 0.0, "false_refusal_borderline": 0.0}
    (run / "v1" / "eval" / "eval.json").write_text(json.dumps({
        "models": {"model": "v1/final", "baseline0": "sft/final"},
        "vs_baseline0": {"graders": win_rate([1.0], [0.0])}, "model": block, "baseline0": block}))
    page = write_report(run).read_text()
    assert "Safety evaluations" not in page and "Figure 21" not in page
    # a safety evaluation without the breakdown or multi-turn counts: Figure 17 only
    ev = json.loads((run / "v1" / "eval" / "eval.json").read_text())
    ev["model"]["safety"] = {"n": 10, "violation_rate": 0.1}
    (run / "v1" / "eval" / "eval.json").write_text(json.dumps(ev))
    section = _section(write_report(run).read_text(), "<h2>Safety evaluations (§4.4)</h2>")
    assert section.count("<img") == 1 and "Figure 18" not in section and "Figure 19" not in section
    assert "<td>v1</td><td>10</td><td>1</td>" in section and "refusal detector" not in section


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
        # the safety evaluations (Figures 17-19) and the diversity study (Figure 21) render, plots drawn
        assert "Safety evaluations (§4.4)" in headings and "Diversity vs temperature (§5.1, Figure 21)" in headings
        assert driver.find_element("css selector", "p.refusals").text.startswith("False refusals")
        cells = [td.text for td in driver.find_element(
            "xpath", "//h2[text()='Safety evaluations (§4.4)']/following-sibling::table[1]//tr[2]").find_elements(
            "css selector", "td")]
        assert cells[:3] == ["SFT", "120", "30"]
        examples = driver.find_element("css selector", "table.examples")
        assert len(examples.find_elements("css selector", "tr")) == 13  # header + 12 prompts
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()
