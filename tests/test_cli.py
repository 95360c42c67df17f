"""`llama2 <command>` for the commands no recipe test runs: a smoke run and an error case each,
through the command line, and the entry point's own contract (unknown command, Ctrl-C)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama2.cli import main as cli

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def policy(world_tokenizer, tmp_path_factory):
    """An untrained tiny chat model on the world's tokenizer (answers are noise; the plumbing is the point)."""
    from llama2.checkpoint import save_native
    from llama2.model import ModelArgs, Transformer

    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=world_tokenizer.vocab_size, hidden_dim=64,
                              max_seq_len=256))
    m.init_weights()
    d = tmp_path_factory.mktemp("cli_policy") / "policy"
    save_native(d, m, tokenizer=world_tokenizer)
    return d


@pytest.fixture(scope="module")
def evaluated(policy, world_dir, tmp_path_factory):
    """`llama2 evaluate` of the policy against itself on 8 prompts, judged by the graders."""
    out = tmp_path_factory.mktemp("cli_eval") / "eval"
    code = cli(["evaluate", f"model={policy}", f"baselines=[{policy}]", f"prompts=[{world_dir / 'prompts' / 'eval.jsonl'}]",
                "max_prompts=8", "max_new_tokens=8", "helpfulness_rm=grader", "safety_rm=grader", f"out_dir={out}"])
    return code, out


def test_evaluate_command(evaluated, capsys):
    code, out = evaluated
    assert code == 0
    assert torch.is_grad_enabled()  # run in-process, it leaves the caller's autograd state alone
    result = json.loads((out / "eval.json").read_text())
    assert result["prompts"] == 8 and set(result["models"]) == {"model", "baseline0"}
    for judge in ("graders", "reward_models"):
        w = result["vs_baseline0"][judge]
        assert w["wins"] + w["losses"] + w["ties"] == w["n"] == 8
    # the same model, prompts and seeded decoding on both sides: identical answers, all ties
    assert result["vs_baseline0"]["graders"]["ties"] == 8
    rows = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["model"] == r["baseline0"] for r in rows)
    assert (out / "config.yaml").is_file()


def test_evaluate_command_errors(tmp_path, capsys):
    assert cli(["evaluate", f"out_dir={tmp_path / 'e'}", "model=somewhere"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llama2 evaluate: error: prompts: evaluation prompt files are required")
    assert "Traceback" not in err and not (tmp_path / "e").exists()
    assert cli(["evaluate", "temperature=warm"]) == 1
    assert "temperature" in capsys.readouterr().err


def test_report_command(evaluated, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "v1" / "eval").mkdir(parents=True)
    (run / "v1" / "eval" / "eval.json").write_text((evaluated[1] / "eval.json").read_text())
    (run / "pretrain").mkdir()
    (run / "pretrain" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 5.0 - s / 10, **({"val_loss": 5.1} if s == 5 else {})}) + "\n"
                for s in range(1, 6)))
    (run / "summary.json").write_text(json.dumps({"final_model": "nowhere/final"}))
    assert cli(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    assert capsys.readouterr().out.strip() == f"[report] {tmp_path / 'r.html'}"
    html = (tmp_path / "r.html").read_text()
    assert "nowhere/final" in html and "Evaluation per version" in html and "<td>v1</td>" in html
    assert html.count("<img src='data:image/png;base64,") >= 2  # the losses and the win rates
    assert cli(["report", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "llama2 report: error:" in err and "missing: no such run directory" in err


def test_best_of_n_command(policy, world_dir, tmp_path, capsys):
    out = tmp_path / "bon"
    assert cli(["rlhf", "best-of-n", "--policy", str(policy), "--reward-models", "grader",
                "--prompts", str(world_dir / "prompts" / "train.jsonl"), "--max-prompts", "3", "--n", "4",
                "--temperatures", "0.8,1.2", "--k", "2", "--max-new-tokens", "6", "--device", "cpu",
                "--judge", "grader", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[best-of-n] wrote" in printed and "best temperature for K=2" in printed
    assert "the judge's score of the pick: N=1" in printed
    result = json.loads((out / "best_of_n.json").read_text())
    # the graders judging the graders' own pick: it can only get better with N
    pick = result["curves"]["0.8"]["judged_pick"]
    assert len(pick) == 4 and all(b >= a - 1e-9 for a, b in zip(pick, pick[1:]))
    assert result["policy"] == str(policy) and result["chosen"] in (0.8, 1.2)
    assert sorted(p.name for p in out.glob("*.png")) == ["best_of_n_max_median.png", "best_of_n_temperatures.png"]
    assert cli(["rlhf", "best-of-n", "--policy", str(policy), "--reward-models", "grader", "--prompts",
                str(world_dir / "prompts" / "train.jsonl"), "--temperatures", "hot", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "--temperatures: expected comma-separated numbers, got 'hot'" in err and "Traceback" not in err


def test_data_validate_command(world_dir, tmp_path, capsys):
    files = [world_dir / "sft" / "train.jsonl", world_dir / "prompts" / "eval.jsonl",
             world_dir / "preferences" / "offline_test.jsonl"]
    assert cli(["data", "validate", *map(str, files)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == list(map(str, files))
    assert all(line.endswith("records, all valid") for line in lines)
    assert " sft records" in lines[0] and " prompts records" in lines[1] and " preferences records" in lines[2]
    bad = tmp_path / "bad.jsonl"
    good = (world_dir / "sft" / "train.jsonl").read_text().splitlines()[0]
    bad.write_text(good + "\n" + json.dumps({"messages": [{"role": "robot", "content": "beep"}]}) + "\n{not json\n")
    assert cli(["data", "validate", str(bad), "--kind", "sft"]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl, line 2" in err and "bad.jsonl, line 3" in err and "line 1" not in err


def test_unknown_command_prints_usage_and_exits_2(capsys):
    assert cli(["pretrian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama2: unknown command 'pretrian'") and "usage: llama2 <command>" in err
    assert "  pretrain " in err  # the commands are listed
    r = subprocess.run([sys.executable, "-m", "llama2", "pretrian"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "usage: llama2 <command>" in r.stderr and r.stdout == ""


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr("llama2.data_cli.info_cli", interrupted)  # Ctrl-C somewhere inside a command
    assert cli(["data", "info"]) == 130
    assert capsys.readouterr().err == "\ninterrupted\n"


def test_ctrl_c_in_chat_exits_130(policy):
    # a real SIGINT while `llama2 chat` waits for the user's line
    p = subprocess.Popen([sys.executable, "-m", "llama2", "chat", "--model", str(policy), "--device", "cpu"],
                         cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "LLAMA2_NO_PROGRESS": "1"},
                         # a shell that started the suite in the background ignores SIGINT, and a
                         # child inherits that; the user at a terminal does not
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        banner = p.stderr.readline()  # printed once the model is loaded, just before input()
        assert banner.startswith("[llama2]") and "parameters" in banner, banner
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert err.strip() == "interrupted" and "Traceback" not in err
