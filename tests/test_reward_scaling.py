"""Figure 6's study (`llama2 study reward-scaling`): one reward model per model × number of pairs,
measured on held-out ranked pairs; JSON, plot, resume, clear errors, the pipeline-run entry and
the report's section. Tiny random models on hand-made pairs: seconds, not minutes."""
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from llama2.checkpoint import save_native
from llama2.cli import main as cli_main
from llama2.config import ConfigError, load_config
from llama2.model import ModelArgs, Transformer
from llama2.pipeline import PipelineConfig, reward_scaling_config
from llama2.recipes.reward_model import accuracy_against_truth
from llama2.recipes.reward_scaling import (ScalingConfig, check, describe_models, likelihood_accuracy, main, pair_counts,
                                          table_rows)
from llama2.report import REWARD_SCALING_DIR, write_report

# A learnable signal: the chosen answer is about hills, the rejected one about the town.
GOOD = ["over green hills", "the llama walks over green hills", "green hills and grass"]
BAD = ["the sun shines on a small town", "a small town where people ask", "people ask questions"]
REWARD = {"batch_size": 8, "micro_batch_size": 8, "epochs": 4, "optim": {"lr": 1e-2, "warmup_steps": 0},
          "ckpt_every": 0, "eval_every": 0, "log_every": 100}


def chat_model(path: Path, tokenizer, dim: int) -> str:
    args = ModelArgs(dim=dim, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.vocab_size, hidden_dim=2 * dim,
                     max_seq_len=128)
    model = Transformer(args)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return str(save_native(path, model, tokenizer=tokenizer))


def pairs(n: int, split: str, batches: int = 1, axis: str = "helpfulness", gap: float | None = 0.4,
          prefix: str = "p") -> list[dict]:
    rng = random.Random(f"{prefix}{split}")
    return [{"id": f"{prefix}{i}", "messages": [{"role": "user", "content": f"where does the llama walk {i}?"}],
             "chosen": rng.choice(GOOD), "rejected": rng.choice(BAD), "rating": "better", "axis": axis,
             "safety_label": None, "source": "test", "batch": 1 + i * batches // n, "split": split,
             "meta": {"grader_gap": gap}} for i in range(n)]


def write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory, sp_tokenizer):
    d = tmp_path_factory.mktemp("scaling")
    # four weekly batches of 8 training pairs; the second file's test pairs are held out, never trained on
    train = [write(d / "b12.jsonl", pairs(16, "train", 2) + pairs(4, "test", prefix="t")),
             write(d / "b34.jsonl", [{**r, "batch": r["batch"] + 2} for r in pairs(16, "train", 2, prefix="q")])]
    test = write(d / "test.jsonl", pairs(40, "test", prefix="h") + pairs(8, "test", gap=0.0, prefix="tie"))
    models = [chat_model(d / "small", sp_tokenizer, 16), chat_model(d / "large", sp_tokenizer, 32)]
    return {"dir": d, "train": train, "test": test, "models": models}


def config(data, out: Path, **kw) -> ScalingConfig:
    return ScalingConfig(**{"out_dir": str(out), "models": data["models"], "train_data": data["train"],
                            "test_data": [data["test"]], "points": [0.25, 0.5, 16, 1.0], "reward": REWARD,
                            "device": "cpu", **kw})


@pytest.fixture(scope="module")
def study(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    main(config(data, out))
    return out


def test_one_result_per_model_and_point_in_batch_order(study, data, capsys):
    result = json.loads((study / "reward_scaling.json").read_text())
    assert [m["model"] for m in result["models"]] == data["models"]
    assert result["models"][0]["params"] < result["models"][1]["params"]
    assert result["train_pairs"] == 32 and result["test_pairs"] == 48 and result["ranked_test_pairs"] == 40
    for m in data["models"]:
        mine = [p for p in result["points"] if p["model"] == m]
        # 16 given both as a count and as 0.5: one point; more pairs = more weekly batches = more steps
        assert [p["pairs"] for p in mine] == [8, 16, 32]
        assert [p["batches"] for p in mine] == [[1], [1, 2], [1, 2, 3, 4]]
        assert [p["steps"] for p in mine] == [4, 8, 16]
        for p in mine:
            acc = p["accuracy"]
            assert acc["pairs"] == 48 and acc["grader_ties"] == 8 and acc["graders_ranked"]["n"] == 40
            lo, hi = acc["graders_ranked"]["ci95"]
            assert lo <= acc["graders_ranked"]["accuracy"] <= hi
            assert acc["labels_ranked"] == acc["graders_ranked"]  # here the labels are the graders' ranking
    # the training subsets: the first pairs in batch order, never a test pair
    subset = [json.loads(line) for line in (study / "data" / "train-16.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in subset] == [1] * 8 + [2] * 8 and {r["split"] for r in subset} == {"train"}
    assert (study / "reward_scaling.png").stat().st_size > 10_000
    assert not list(study.glob("*/pairs-*/rm/final"))  # keep_models: false
    # with a learnable signal the larger model's reward model is well above chance on the most pairs
    best = next(p for p in result["points"] if p["model"] == data["models"][1] and p["pairs"] == 32)
    assert best["accuracy"]["graders_ranked"]["ci95"][0] > 0.6, best["accuracy"]


def test_each_model_is_also_judged_by_its_own_likelihood(study, data):
    """The untrained reference: the answer with the higher mean log-probability wins. Flipping which
    answer the graders prefer flips every decided verdict."""
    result = json.loads((study / "reward_scaling.json").read_text())
    for m in result["models"]:
        assert m["likelihood"]["graders_ranked"]["n"] == 40 and m["likelihood"]["grader_ties"] == 8
    tests = [json.loads(line) for line in Path(data["test"]).read_text().splitlines()][:40]
    got = likelihood_accuracy(data["models"][0], tests, "cpu")["graders_ranked"]["accuracy"]
    flipped = [{**t, "meta": {"grader_gap": -t["meta"]["grader_gap"]}} for t in tests]
    assert likelihood_accuracy(data["models"][0], flipped, "cpu")["graders_ranked"]["accuracy"] == pytest.approx(1 - got)
    assert "its own likelihood" in " ".join(r[0] for r in table_rows(result)[1])


def test_rerun_skips_finished_points(study, data, capsys):
    before = {p: p.stat().st_mtime_ns for p in study.glob("*/pairs-*/result.json")}
    assert len(before) == 6
    overrides = [f"out_dir={study}", f"models=[{','.join(data['models'])}]", f"train_data=[{','.join(data['train'])}]",
                 f"test_data=[{data['test']}]", "points=[0.25,0.5,1]", "device=cpu"]
    cfg_file = study.parent / "study.yaml"
    cfg_file.write_text(yaml.safe_dump({"reward": REWARD}))
    assert cli_main(["study", "reward-scaling", "--config", str(cfg_file), *overrides]) == 0
    out = capsys.readouterr().out
    assert out.count("done before") == 6 and "training a" not in out
    assert {p: p.stat().st_mtime_ns for p in study.glob("*/pairs-*/result.json")} == before
    # the same out_dir with other reward settings is refused, not mixed in
    assert cli_main(["study", "reward-scaling", "--config", str(cfg_file), *overrides, "reward.epochs=2"]) == 1
    err = capsys.readouterr().err.strip()
    assert "result.json: made with another reward; use another out_dir" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("change, message", [
    ({"train_data": ["missing.jsonl"]}, "train_data: missing.jsonl does not exist"),
    ({"points": [0.5, 40]}, r"points\[1\]: 40 pairs, but train_data holds only 32 training pairs"),
    ({"points": [2.5]}, r"points\[0\]: 2.5: a number of pairs must be whole"),
    ({"objective": "safety"}, "points: the first 8 training pairs hold no safety pair"),
    ({"test_data": "UNRANKED"}, "test_data: .*unranked.jsonl hold no held-out helpfulness pairs the graders rank"),
    ({"reward": {"model": "x"}}, "reward.model: set by the study for each run; use the study's own models field"),
    ({"reward": {"epoch": 2}}, "reward: unknown key 'epoch'"),
    ({"models": []}, "models: at least one chat checkpoint"),
    ({"models": ["MODEL", "MODEL"]}, r"models\[1\]: .*small is listed twice"),
])
def test_bad_config_is_a_clear_error(data, tmp_path, change, message):
    if change.get("test_data") == "UNRANKED":
        change = {"test_data": [write(tmp_path / "unranked.jsonl", pairs(4, "test", gap=None))]}
    if change.get("models") == ["MODEL", "MODEL"]:
        change = {"models": [data["models"][0]] * 2}
    with pytest.raises(ConfigError, match=message):
        check(config(data, tmp_path / "out", **change))
    assert not (tmp_path / "out").exists()


def test_the_cli_prints_a_bad_config_in_one_line(data, tmp_path, capsys):
    rc = cli_main(["study", "reward-scaling", f"out_dir={tmp_path}", f"models=[{data['models'][0]}]",
                   f"train_data=[{data['train'][0]}]", f"test_data=[{data['test']}]", "points=[100]"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "points[0]: 100 pairs, but train_data holds only 16 training pairs" in err


def test_models_of_one_size_are_told_apart(data):
    models = describe_models([data["models"][0], data["models"][0], data["models"][1]])
    assert [m.label for m in models] == [f"12K ({data['models'][0]})"] * 2 + ["28.5K"]


def test_pair_counts_and_accuracy_by_hand():
    assert pair_counts([1.0, 0.125, 3, 0.1], 24) == [2, 3, 24]
    # 4 ranked pairs (2 ties left out): right, right, wrong, a tie of the reward model counts half
    got = accuracy_against_truth([1.0, -0.5, 0.2, 0.0, 3.0, -3.0], [0.3, -0.1, -0.2, 0.5, 0.0, 0.0])
    assert got["graders_ranked"]["n"] == 4 and got["graders_ranked"]["accuracy"] == pytest.approx(2.5 / 4)
    assert got["grader_ties"] == 2 and got["labels_all"]["accuracy"] == pytest.approx(3.5 / 6)
    by_task = accuracy_against_truth([1.0, -0.5, 0.2, 0.0, 3.0, -3.0], [0.3, -0.1, -0.2, 0.5, 0.0, 0.0],
                                     ["fact", "fact", "units", "units", "fact", "units"])["graders_by_task"]
    assert {t: (a["n"], a["accuracy"]) for t, a in by_task.items()} == {"fact": (2, 1.0), "units": (2, 0.25)}


def test_a_pipeline_run_gives_the_study_its_batches_and_model(data, tmp_path, capsys):
    run = tmp_path / "run"
    done = {"sft": {"model": "elsewhere/sft/final"}}
    for v in (1, 2, 3):
        (run / f"v{v}" / "annotate").mkdir(parents=True)
        write(run / f"v{v}" / "annotate" / f"batch{v}.jsonl", [])
        done[f"v{v}.annotate"] = {"pairs": "relative/path"}
    (run / "sft" / "final").mkdir(parents=True)
    (run / "state.json").write_text(json.dumps({"done": done}))
    pipeline = load_config(PipelineConfig, None, ["reward.max_steps=60", "reward.batch_size=32", "seed=3"])
    (run / "config.yaml").write_text(yaml.safe_dump({"reward": pipeline.reward, "seed": 3}))
    cfg = reward_scaling_config(run)
    batches = [str(run / f"v{v}" / "annotate" / f"batch{v}.jsonl") for v in (1, 2, 3)]
    assert cfg.train_data == batches and cfg.test_data == batches[-1:]
    assert cfg.models == [str(run / "sft" / "final")] and cfg.out_dir == str(run / REWARD_SCALING_DIR)
    assert cfg.reward == {"batch_size": 32} and cfg.seed == 3  # epochs-based: more pairs, more steps
    assert cli_main(["study", "reward-scaling-run", "--run", str(run), "models=[a,b]", "points=[1]",
                     "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["models"] == ["a", "b"] and printed["points"] == [1.0] and printed["train_data"] == batches
    (run / "state.json").write_text(json.dumps({"done": {"sft": {}}}))
    with pytest.raises(ConfigError, match="has no finished weekly batch yet"):
        reward_scaling_config(run)
    with pytest.raises(ConfigError, match="is not a pipeline run"):
        reward_scaling_config(tmp_path)


def test_the_report_shows_the_study(study, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(study, run / REWARD_SCALING_DIR)
    page = write_report(run).read_text()
    assert "Reward-model accuracy vs data and model size (Figure 6)" in page
    assert page.count("data:image/png") == 1
    result = json.loads((study / "reward_scaling.json").read_text())
    labels = [m["label"] for m in result["models"]]
    assert "<th>training pairs</th>" + "".join(f"<th>{label}</th>" for label in labels) in page
    assert "<td>32</td>" in page and "n=40" in page
