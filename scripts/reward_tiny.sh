#!/usr/bin/env bash
# The tiny helpfulness and safety reward models end to end on the built-in world, on CPU (§3.2.2):
#   world -> tiny pretrained model (3.1M) -> SFT chat model -> helpfulness RM and safety RM with
#   each margin table (small = the presets; none and large = Table 28's ablation) -> accuracy per
#   test set and rating level (Tables 7 and 8) and the margin ablation, printed and in $RUNS/summary.json.
# Usage: scripts/reward_tiny.sh [RUNS_DIR]      (default runs/reward_tiny; finished steps are skipped)
# Cost on 2 shared CPU cores: pretraining ~35 min, SFT ~8 min, six reward models ~45 min.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/reward_tiny}
PY=${PYTHON:-.venv/bin/python}
export OMP_WAIT_POLICY=PASSIVE LLAMA2_NO_PROGRESS=${LLAMA2_NO_PROGRESS:-1}
done_() { [ -f "$1/final/model.json" ]; }

# 1. Pretraining (§2) of the tiny preset: 600 steps of 4,096 tokens (~1.2 passes over the world's
#    corpus). The world itself (seed 0, size tiny) is generated on the way, under $RUNS/pt/world.
done_ $RUNS/pt || $PY -m llama2 pretrain preset=tiny out_dir=$RUNS/pt data.seq_len=256 batch_tokens=4096 \
    micro_batch_size=16 max_steps=600 optim.lr=3e-3 optim.warmup_steps=30 eval_every=100 ckpt_every=100
W=$RUNS/pt/world

# 2. SFT (§3.1): one epoch of the world's demonstrations, half the loss from pretraining text so
#    that the tiny model keeps its facts (what the reward model must know to spot a wrong value).
done_ $RUNS/sft || $PY -m llama2 sft model=$RUNS/pt/final out_dir=$RUNS/sft train_data=[$W/sft/train.jsonl] \
    eval_data=[$W/sft/test.jsonl] seq_len=512 batch_size=16 micro_batch_size=8 epochs=1 optim.lr=1e-4 \
    pretrain_data=$RUNS/pt/tokens pretrain_mix=0.5 eval_every=0 ckpt_every=0

# 3. The two reward models from the chat model, each with the three margin tables (Table 27).
for objective in helpfulness safety; do
  preset=tiny; [ $objective = safety ] && preset=tiny_safety
  for margin in small none large; do
    out=$RUNS/rm_${objective}_${margin}
    done_ $out || $PY -m llama2 reward train --config configs/reward/$preset.yaml model=$RUNS/sft/final \
        out_dir=$out train_data=[$W/preferences/offline_train.jsonl] eval_data=[$W/preferences/offline_test.jsonl] \
        margin=$margin ckpt_every=0
  done
done

# 4. Tables 8 and 28 from the runs' eval.json files.
$PY - "$RUNS" <<'PY'
import json, sys
from pathlib import Path
from llama2.losses import RATINGS
runs = Path(sys.argv[1])
head = f"{'':34}" + "".join(f"{r.split()[0][:11]:>12}" for r in RATINGS) + f"{'avg':>8}"
summary = {}
def row(name, ts):
    cells = "".join(f"{ts['by_rating'][r]['accuracy'] * 100:>12.1f}" if r in ts["by_rating"] else f"{'-':>12}" for r in RATINGS)
    return f"{name:34}{cells}{ts['accuracy'] * 100:>8.1f}"
for margin in ("small", "none", "large"):
    print(f"\n== margin {margin}: accuracy (%) per test set and rating level (Table 8)\n{head}")
    for objective in ("helpfulness", "safety"):
        rep = json.loads((runs / f"rm_{objective}_{margin}" / "eval.json").read_text())
        summary[f"{objective}/{margin}"] = rep
        for name, ts in rep["test_sets"].items():
            print(row(f"{objective} RM on {name.split('/')[1]}", ts))
print(f"\n== margin ablation (Table 28): each RM on its own axis' test pairs\n{head}")
for objective in ("helpfulness", "safety"):
    for margin in ("none", "small", "large"):
        print(row(f"{objective} RM, margin {margin}", summary[f"{objective}/{margin}"]["test_sets"][f"offline_test/{objective}"]))
print("\n== per task family, helpfulness RM (margin small), both test sets together")
print({t: round(v["accuracy"] * 100, 1) for t, v in summary["helpfulness/small"]["overall"]["by_task"].items()})
(runs / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
PY
