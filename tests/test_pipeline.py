"""`llama2 pipeline` end to end at a reduced size: every stage, kill-and-resume, --from-stage,
and the configuration checked before any work starts."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llama2.config import ConfigError, load_config
from llama2.pipeline import PipelineConfig, check, stage_names

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "pipeline" / "tiny.yaml"

# configs/pipeline/tiny.yaml shrunk to seconds per stage: the same code paths, far fewer steps.
REDUCED = [
    "annotate.prompts_per_batch=48", "annotate.test_prompts_per_batch=0", "annotate.max_new_tokens=24",
    "pretrain.max_steps=20", "pretrain.batch_tokens=1024", "pretrain.data.seq_len=128",
    "pretrain.eval_every=10", "pretrain.ckpt_every=10", "pretrain.model.vocab_size=1024",
    "sft.epochs=0.05", "sft.eval_every=5", "sft.ckpt_every=5",
    "reward.max_steps=6", "reward.batch_size=16", "reward.micro_batch_size=16", "reward.eval_every=6",
    "rejection_sampling.max_prompts=32", "rejection_sampling.k=2", "rejection_sampling.max_new_tokens=24",
    "rejection_sampling.chunk_prompts=16", "rejection_sampling.sft.epochs=1", "rejection_sampling.sft.batch_size=8",
    "rejection_sampling.sft.micro_batch_size=8", "rejection_sampling.tune_prompts=4", "rejection_sampling.tune_n=4",
    "ppo.iterations=2", "ppo.batch_size=16", "ppo.mini_batch_size=8", "ppo.micro_batch_size=8",
    "ppo.max_new_tokens=24", "ppo.eval_every=1", "ppo.eval_size=16",
    "evaluate.max_prompts=64", "evaluate.max_new_tokens=24",
]


def run(out: Path, *extra: str, env: dict | None = None):
    e = {**os.environ, "LLAMA2_NO_PROGRESS": "1", "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    return subprocess.run([sys.executable, "-m", "llama2", "pipeline", "--config", str(TINY), f"out_dir={out}",
                           *REDUCED, *extra], env=e, cwd=REPO, capture_output=True, text=True, timeout=900)


# Values that depend on the machine's speed, not on what was computed.
VOLATILE = re.compile(r"time|seconds|per_s|mfu|elapsed|eta|memory|throughput")


def _scrub(x, root: Path):
    """`x` without machine-speed values, with paths made relative to the run's directory."""
    if isinstance(x, dict):
        return {k: _scrub(v, root) for k, v in x.items() if not VOLATILE.search(k)}
    if isinstance(x, list):
        return [_scrub(v, root) for v in x]
    return x.replace(str(root), "RUN") if isinstance(x, str) else x


def outcome(out: Path) -> dict[str, object]:
    """Everything a run learned and decided: every stage's logged values by step (a resumed stage's
    rows overwrite the ones it redid), the sampled pools and the summary."""
    found = {}
    for path in sorted(out.rglob("metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        found[str(path.relative_to(out))] = {r.get("step"): _scrub(r, out) for r in rows}
    for path in sorted(out.rglob("pool/iter-*.jsonl")):
        found[str(path.relative_to(out))] = path.read_text()
    found["summary.json"] = _scrub(json.loads((out / "summary.json").read_text()), out)
    return found


@pytest.mark.slow
def test_pipeline_end_to_end_with_kills_equals_an_uninterrupted_run(tmp_path):
    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "run"
    killed = run(out, env={"LLAMA2_KILL_AT_STEP": "15"})  # pretraining dies after step 15 (checkpoint at 10)
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = json.loads((out / "state.json").read_text())
    assert list(state["done"]) == ["world"]
    # resumed, and killed again later on: V1's rejection sampling after its first chunk of prompts
    killed = run(out, env={"LLAMA2_KILL_AT_SAMPLE_CHUNK": "1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "stage 2/15: pretrain (resuming)" in killed.stdout
    assert list(json.loads((out / "state.json").read_text())["done"]) == ["world", "pretrain", "sft", "v1.annotate",
                                                                          "v1.reward"]
    resumed = run(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage 6/15: v1.rejection_sampling (resuming)" in resumed.stdout
    assert "1 of 2 chunks already sampled" in resumed.stderr
    state = json.loads((out / "state.json").read_text())
    cfg = load_config(PipelineConfig, TINY, [f"out_dir={out}"])
    assert list(state["done"]) == stage_names(cfg)
    steps = [json.loads(line)["step"] for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == list(range(1, 21))  # nothing lost, steps 11-15 redone after the kill
    # the interrupted run learned, sampled, chose and evaluated exactly what the uninterrupted one did
    got, expected = outcome(out), outcome(tmp_path / "full")
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == expected[name], name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["versions"]) == {"v1", "v2"} and "final_vs_control" in summary
    from llama2.agreement import wilson_interval

    for judge in ("graders", "reward_models"):
        w = summary["versions"]["v2"]["win_rate_vs_sft"][judge]
        assert w["wins"] + w["losses"] + w["ties"] == 64
        # the interval reported is the Wilson interval of wins among decided comparisons, around the rate
        decided = w["wins"] + w["losses"]
        assert w["ci95"] == pytest.approx(list(wilson_interval(w["wins"], decided)), abs=1e-9)
        if decided:
            assert w["win_rate"] == pytest.approx(w["wins"] / decided) and w["ci95"][0] <= w["win_rate"] <= w["ci95"][1]
    assert (out / "report.html").stat().st_size > 10_000
    assert f"llama2 chat --model {summary['final_model']}" in resumed.stdout
    assert Path(summary["final_model"]).name == "final" and "ppo" in summary["final_model"]
    # --from-stage reruns that stage and everything after it, nothing before
    again = run(out, "--from-stage", "control")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage 13/15: control" in again.stdout and "v2.eval" not in again.stdout


def test_configuration_is_checked_before_any_work(tmp_path, world_dir):
    cfg = load_config(PipelineConfig, TINY, [f"out_dir={tmp_path / 'x'}", "sft.bogus=1"])
    with pytest.raises(ConfigError, match="'sft'.*unknown key 'bogus'"):
        check(cfg)
    cfg = load_config(PipelineConfig, TINY, [f"out_dir={tmp_path / 'x'}", f"base_model={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="base_model: .*missing does not exist"):
        check(cfg)
    # a base model skips pretraining: pretrain_mix then needs pretrain_data named (the preset mixes)
    (tmp_path / "base").mkdir()
    cfg = load_config(PipelineConfig, TINY, [f"out_dir={tmp_path / 'x'}", f"base_model={tmp_path / 'base'}",
                                             "sft.pretrain_mix=0"])
    with pytest.raises(ConfigError, match="rejection_sampling.sft.pretrain_mix: with base_model"):
        check(cfg)
    # sampling safety prompts only (an ablation): a prompt file without any is refused at once
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(line for line in (world_dir / "prompts" / "train.jsonl").read_text().splitlines(True)
                             if not json.loads(line)["is_safety"]))
    cfg = load_config(PipelineConfig, TINY, [f"out_dir={tmp_path / 'x'}", f"prompts=[{plain}]",
                                             "rejection_sampling.reward_axes=[safety]"])
    with pytest.raises(ConfigError, match=r"rejection_sampling.reward_axes: \['safety'\], but prompts .* hold only "
                                          r"\['helpfulness'\]"):
        check(cfg)
    r = run(tmp_path / "y", "reward.margin=7")
    assert r.returncode == 1 and "margin" in r.stderr and not (tmp_path / "y").exists()
    with pytest.raises(ConfigError, match="unknown stage"):
        from llama2.pipeline import Run

        Run(load_config(PipelineConfig, TINY, [f"out_dir={tmp_path / 'z'}"])).forget_from("v9.ppo", ["world"])


def test_reward_model_accuracy_on_the_policy_answers_is_measured_on_what_the_graders_rank(tmp_path, capsys):
    from llama2.pipeline import report_on_policy_accuracy
    from llama2.recipes.reward_model import accuracy_against_truth

    # 6 pairs: the RM's score differences, the graders' gaps (chosen - rejected; 0 = a tie)
    diff = [1.0, 0.5, -0.2, 0.0, 0.3, -1.0]
    gaps = [0.4, -0.5, -0.1, 0.2, 0.0, 0.0]
    got = accuracy_against_truth(diff, gaps)
    assert got["pairs"] == 6 and got["grader_ties"] == 2
    # vs the annotators' labels (chosen is the label): 1, 1, 0, half, 1, 0 -> 3.5 / 6
    assert got["labels_all"]["accuracy"] == pytest.approx(3.5 / 6)
    # the 4 ranked pairs: vs labels 1, 1, 0, half; vs graders 1 (same sign), 0, 1, half
    assert got["labels_ranked"]["n"] == got["graders_ranked"]["n"] == 4
    assert got["labels_ranked"]["accuracy"] == pytest.approx(2.5 / 4)
    assert got["graders_ranked"]["accuracy"] == pytest.approx(2.5 / 4)

    safety_only = load_config(PipelineConfig, TINY, [f"out_dir={tmp_path / 'x'}", "rejection_sampling.reward_axes=[safety]",
                                                     "ppo.reward_axes=[safety]"])  # the ablation: the safety RM only
    paper = load_config(PipelineConfig, TINY, [f"out_dir={tmp_path / 'x'}"])  # the preset: both, as the paper
    chance = accuracy_against_truth([1.0] * 53 + [-1.0] * 47 + [1.0] * 20, [0.3] * 100 + [0.0] * 20)
    clear = accuracy_against_truth([1.0] * 160 + [-1.0] * 40, [0.3] * 200)
    report_on_policy_accuracy(safety_only, chance, "helpfulness", 2)
    report_on_policy_accuracy(paper, chance, "helpfulness", 2)
    report_on_policy_accuracy(paper, clear, "safety", 2)
    report_on_policy_accuracy(paper, {}, "safety", 1)  # no held-out pairs: nothing to say
    report_on_policy_accuracy(paper, accuracy_against_truth([1.0] * 12 + [-1.0] * 10, [0.2] * 22), "safety", 1)
    lines = capsys.readouterr().out.splitlines()
    # 53 of 100 ranked: Wilson 95% interval [0.433, 0.625] holds 0.5; the 20 ties are left out
    assert "helpfulness RM on batch 2's 120 held-out pairs (20 that the graders tie): on the 100 they rank, " \
           "0.530 [0.433, 0.625] vs the graders" in lines[0]
    assert lines[0].endswith("at chance; left out of reward_axes")
    assert lines[1].endswith("at chance, yet rejection_sampling and ppo optimise it (see reward_axes)")
    assert "on the 200 they rank, 0.800 [0.739, 0.850] vs the graders" in lines[2] and "chance" not in lines[2]
    assert lines[3].endswith("too few ranked pairs to tell it from chance")
    assert len(lines) == 4



def test_rejection_sampling_pools_earlier_versions_from_v3(tmp_path):
    """§3.2.3: up to RLHF-V2 only the current samples; from V3 on, every earlier version's best answers."""
    from llama2.pipeline import Run, earlier_pools

    cfg = load_config(PipelineConfig, TINY, [f"out_dir={tmp_path}", "versions=4"])
    run = Run(cfg)
    for v in (1, 2, 3):
        pool = run.root / f"v{v}" / "rejection_sampling" / "pool"
        pool.mkdir(parents=True)
        (pool / "iter-1.jsonl").write_text("")
    assert cfg.pool_from_version == 3
    assert earlier_pools(run, cfg, 1) == [] and earlier_pools(run, cfg, 2) == []
    assert [Path(p).parts[-4] for p in earlier_pools(run, cfg, 3)] == ["v1", "v2"]
    assert [Path(p).parts[-4] for p in earlier_pools(run, cfg, 4)] == ["v1", "v2", "v3"]
    cfg.pool_from_version = 2
    assert [Path(p).parts[-4] for p in earlier_pools(run, cfg, 2)] == ["v1"]
    cfg.pool_from_version = 0
    assert earlier_pools(run, cfg, 4) == []


def test_held_out_prompts_per_batch_take_the_batch_own_first_then_the_others(tmp_path, world_dir):
    """More held-out prompts than a batch has (annotation is cheap; the reward models' accuracy on
    the policy's own answers needs hundreds of pairs the graders rank): its own test prompts first,
    then the other batches', never a training prompt."""
    from llama2.pipeline import Run, _batch_prompts

    cfg = load_config(PipelineConfig, TINY, [f"out_dir={tmp_path}", "annotate.prompts_per_batch=100",
                                             "annotate.test_prompts_per_batch=0",
                                             f"prompts=[{world_dir}/prompts/train.jsonl]",
                                             f"test_prompts=[{world_dir}/prompts/test_batch1.jsonl,"
                                             f"{world_dir}/prompts/test_batch2.jsonl]"])
    mine, tests = _batch_prompts(Run(cfg), cfg, 2)
    assert len(mine) == 100 and len(tests) == 25 and {r["batch"] for r in tests} == {2}
    cfg.annotate.test_prompts_per_batch = 400
    mine, more = _batch_prompts(Run(cfg), cfg, 2)
    assert len(more) == 400 and more[:25] == tests
    assert {r["batch"] for r in more[:250]} == {2} and {r["batch"] for r in more[250:]} == {1}
    assert len({r["id"] for r in more}) == 400 and all(r["split"] == "test" for r in more)


def test_ghost_attention_stage_and_multi_turn_evaluation_in_the_pipeline(tmp_path, world_dir, tiny_policy):
    """`gatt_after_version: K` adds vK.gatt (GAtt on version K's model) and vK.multi_turn (adherence
    turn by turn, with and without GAtt) before vK.eval, which then evaluates the GAtt model; the
    report shows the adherence table."""
    import shutil

    from llama2.pipeline import Run, run_stage
    from llama2.report import write_report

    cfg = load_config(PipelineConfig, TINY, [f"out_dir={tmp_path / 'run'}", "gatt_after_version=2"])
    names = stage_names(cfg)
    assert names.index("v2.ppo") < names.index("v2.gatt") < names.index("v2.multi_turn") < names.index("v2.eval")
    assert "v1.gatt" not in names
    with pytest.raises(ConfigError, match="gatt_after_version: 3 is not one of the versions 1..2"):
        check(load_config(PipelineConfig, TINY, [f"out_dir={tmp_path / 'x'}", "gatt_after_version=3"]))

    cfg = load_config(PipelineConfig, TINY, [
        f"out_dir={tmp_path / 'run'}", "versions=1", "gatt_after_version=1", "gatt.max_dialogs=8",
        "gatt.max_new_tokens=12", "gatt.retries=0", "gatt.repair=llama2.world.gatt:comply", "gatt.sft.seq_len=256",
        "gatt.sft.batch_size=4", "gatt.sft.micro_batch_size=2", "gatt.sft.epochs=1", "gatt.sft.ckpt_every=100",
        "multi_turn.dialogs=2", "multi_turn.turns=3", "multi_turn.max_new_tokens=8", "device=cpu"])
    run = Run(cfg)
    shutil.copytree(world_dir, run.world)
    for stage in ("sft", "v1.rejection_sampling"):
        run.finish(stage, {"model": str(tiny_policy)}, 0.0)
    for stage in ("v1.gatt", "v1.multi_turn"):
        run.finish(stage, run_stage(run, cfg, stage, run.stage_dir(stage), False), 0.0)
    gatt_model = run.output("v1.gatt")
    assert Path(gatt_model).is_dir() and run.state["done"]["v1.gatt"]["steps"] >= 1
    result = json.loads((run.root / "v1" / "multi_turn" / "multi_turn.json").read_text())
    assert result["paths"] == {"model": gatt_model, "baseline": str(tiny_policy)}
    page = write_report(run.root).read_text()
    assert "Ghost Attention: instructions kept turn by turn" in page and "without GAtt" in page


def test_context_distillation_and_red_teaming_stages(tmp_path, world_dir, tiny_policy):
    """`context_distill_after_version: K` distils version K's model (gated by its safety RM; later
    stages use the result); `redteam: true` runs two rounds, SFT then the final model, the second also
    asked the first round's violating prompts; the report shows both."""
    import shutil

    from llama2.pipeline import Run, _trained_policy, run_stage
    from llama2.report import write_report

    cfg = load_config(PipelineConfig, TINY, [f"out_dir={tmp_path / 'run'}", "context_distill_after_version=2",
                                             "redteam=true"])
    names = stage_names(cfg)
    assert names.index("v2.ppo") < names.index("v2.context_distill") < names.index("v2.eval")
    assert names.index("v2.eval") < names.index("redteam") < names.index("control")

    policy = str(tiny_policy)
    cfg = load_config(PipelineConfig, TINY, [
        f"out_dir={tmp_path / 'run'}", "versions=1", "context_distill_after_version=1", "redteam=true",
        "context_distill.max_prompts=8", "context_distill.max_new_tokens=8", "context_distill.gate=false",
        "context_distill.drop_truncated=false", "context_distill.sft.seq_len=256", "context_distill.sft.batch_size=4",
        "context_distill.sft.micro_batch_size=2", "context_distill.sft.ckpt_every=100",
        "redteam_options.per_seed=1", "redteam_options.max_new_tokens=8", "redteam_options.risk_categories=[illicit_criminal]",
        "device=cpu"])
    run = Run(cfg)
    shutil.copytree(world_dir, run.world)
    for stage, out in [("sft", {"model": policy}), ("v1.reward", {"helpfulness": "grader", "safety": "grader"}),
                       ("v1.rejection_sampling", {"model": policy})]:
        run.finish(stage, out, 0.0)
    run.finish("v1.context_distill", run_stage(run, cfg, "v1.context_distill", run.stage_dir("v1.context_distill"),
                                               False), 0.0)
    distilled = run.output("v1.context_distill")
    assert Path(distilled).is_dir() and _trained_policy(run, 1) == distilled
    run.finish("v1.eval", {"model_path": distilled}, 0.0)
    got = run_stage(run, cfg, "redteam", run.stage_dir("redteam"), False)
    first, second = (json.loads(Path(got[k]).read_text()) for k in ("round1", "round2"))
    assert first["model"] == policy and second["model"] == distilled and first["attempts"] == second["attempts"] > 0
    assert second["previous_violations"]["prompts"] == first["violating_distinct_prompts"] or \
        second["previous_violations"]["prompts"] == first["violating"]
    page = write_report(run.root).read_text()
    assert "Safety context distillation (v1, Figure 16)" in page and "Red-teaming rounds" in page


def test_diversity_stage(tmp_path, world_dir, tiny_policy):
    """`diversity: true` adds the `diversity` stage after the control: Self-BLEU vs temperature (Figure 21)
    of the SFT model, every version's final model and the control, each named by its stage in
    RUN/diversity/diversity.json and in the report; its options are checked before any work starts."""
    import shutil

    from llama2.pipeline import Run, run_stage
    from llama2.report import write_report

    cfg = load_config(PipelineConfig, TINY, [f"out_dir={tmp_path / 'run'}", "diversity=true"])
    names = stage_names(cfg)
    assert names.index("control.eval") < names.index("diversity") == len(names) - 2 and names[-1] == "summary"
    assert "diversity" not in stage_names(load_config(PipelineConfig, TINY, [f"out_dir={tmp_path / 'x'}"]))
    with pytest.raises(ConfigError, match="samples=1"):
        check(load_config(PipelineConfig, TINY, [f"out_dir={tmp_path / 'x'}", "diversity_options.samples=1"]))
    with pytest.raises(ConfigError, match="diversity_options.*unknown key 'sample'"):
        check(load_config(PipelineConfig, TINY, [f"out_dir={tmp_path / 'x'}", "diversity_options.sample=3"]))

    cfg = load_config(PipelineConfig, TINY, [
        f"out_dir={tmp_path / 'run'}", "versions=1", "diversity=true", "diversity_options.samples=2",
        "diversity_options.temperatures=[0.7]", "diversity_options.prompts_per_type=2",
        "diversity_options.max_new_tokens=6", "device=cpu"])
    check(cfg)
    run = Run(cfg)
    shutil.copytree(world_dir, run.world)
    v1 = shutil.copytree(tiny_policy, run.root / "v1" / "ppo" / "final")
    run.finish("sft", {"model": str(tiny_policy)}, 0.0)
    run.finish("v1.eval", {"model_path": str(v1)}, 0.0)
    run.finish("control", {"model": str(tiny_policy)}, 0.0)  # the same model twice is sampled once
    got = run_stage(run, cfg, "diversity", run.stage_dir("diversity"), False)
    result = json.loads(Path(got["diversity"]).read_text())
    assert got["models"] == {"SFT": str(tiny_policy), "v1": str(v1), "control": str(tiny_policy)}
    assert result["labels"] == {str(tiny_policy): "SFT", str(v1): "v1"}
    assert set(result["models"]) == {str(tiny_policy), str(v1)}
    for by_type in result["models"].values():
        assert {k: [r["temperature"] for r in rows] for k, rows in by_type.items()} == {"factual": [0.7],
                                                                                       "creative": [0.7]}
        assert all(0 <= r["self_bleu"] <= 100 and r["prompts"] == 2 for rows in by_type.values() for r in rows)
    assert (run.root / "diversity" / "self_bleu.png").stat().st_size > 1000
    page = write_report(run.root).read_text()
    assert "Diversity vs temperature (§5.1, Figure 21)" in page
    assert "<tr><td>SFT</td><td>factual</td>" in page and "<tr><td>v1</td><td>creative</td>" in page
