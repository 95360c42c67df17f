"""benchmarks/train_step.py end to end at a tiny size: both sides train the same weights on the same
batch (equal step-1 losses), and the --profile breakdown accounts for each side's step."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.machine
def test_train_step_benchmark_runs_both_sides_and_profiles(tmp_path):
    out = tmp_path / "res.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--batch", "1", "--seq-len", "16",
                           "--rounds", "1", "--steps", "1", "--threads", "1", "--profile", "1", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    loss = res["step1_loss"]
    assert abs(loss["ours"] - loss["transformers"]) <= 1e-4 * abs(loss["transformers"])  # same model, same batch
    assert res["ours_tok_s"] > 0 and res["transformers_tok_s"] > 0 and res["ratio"] > 0
    for side in ("ours", "transformers"):
        p = res["profile"][side]
        assert set(p) >= {"matmul", "attention", "optimizer", "other", "wall"}
        assert p["matmul"] > 0 and p["attention"] > 0 and p["optimizer"] > 0
        # one thread (--threads 1): the ops' self times are disjoint slices of the step's wall time
        assert sum(p[c] for c in ("matmul", "attention", "optimizer", "other")) <= p["wall"] * 1.05
    assert "where a step's time goes" in proc.stdout


def test_gpu_check_script_plumbing_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh (the GPU checks, for a session lent a GPU) runs end to end; here on
    the CPU with a small shape, so that a GPU session spends its minutes measuring, not debugging."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "DEVICE": "cpu", "DTYPE": "float32",
           "PRESET": "20m", "SEQ": "16", "BATCH": "1", "NEW_TOKENS": "12", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "pretrain.log").read_text().strip().splitlines()[-1])
    assert metrics["step"] == 30 and metrics["mfu"] > 0 and metrics["val_loss"] < 6.0
    res = json.loads((tmp_path / "train_step.json").read_text())
    assert res["ours_mfu"] > 0 and res["transformers_mfu"] > 0
    assert "torch" in (tmp_path / "versions.txt").read_text()
    decode = json.loads((tmp_path / "decode.json").read_text())
    assert decode["eager"]["decode_tok_s"] > 0 and decode["compiled"]["decode_tok_s"] > 0
    assert decode["greedy_tokens_equal"] == "12/12"  # the compiled step decodes what the eager model does
