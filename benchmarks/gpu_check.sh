#!/usr/bin/env bash
# The GPU training and decoding checks as one short run, for a session that the device tool lends a GPU (a few
# minutes on an H100; nothing to install: the card's image has torch, transformers, sentencepiece):
#   bash benchmarks/gpu_check.sh                # results under $OUT (the device tool's) or runs/gpu_check
# 1. the card and the torch / transformers versions;
# 2. `llama2 pretrain` of the tiny preset for a few steps on the GPU (bf16 autocast, fused AdamW,
#    checkpoints, the metrics line with MFU): the engine's CUDA path runs;
# 3. benchmarks/train_step.py at the GPU target's setting: a ~1B model (TinyLlama-1.1B's shape) in
#    bf16 at sequence 4096, ours vs transformers, MFU against the card's datasheet dense bf16 peak
#    (target >= 55%);
# 4. benchmarks/gpu_decode.py: batch-1 decoding of the same ~1B shape in bf16, eager vs the compiled
#    step as CUDA graphs, model-bandwidth utilisation against the measured copy bandwidth and the
#    datasheet's (PEAK_GBS, default 4800 for an H200; target >= 80%).
# DEVICE / DTYPE / PRESET / SEQ / BATCH / NEW_TOKENS override the defaults (e.g. to try the plumbing on a CPU:
# DEVICE=cpu DTYPE=float32 PRESET=20m SEQ=64 BATCH=1).
set -uo pipefail
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 LLAMA2_NO_PROGRESS=1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
pt=$(mktemp -d)
status=0
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $py -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda)
print('transformers', transformers.__version__)" | tr '\n' ' '; echo; } | tee "$out/versions.txt"
echo "== llama2 pretrain (tiny preset, $device)"
$py -m llama2 pretrain --config configs/pretrain/tiny.yaml device="$device" max_steps=30 log_every=10 \
    eval_every=15 ckpt_every=15 out_dir="$pt/pretrain" 2>&1 | tail -4 | tee "$out/pretrain.log" || status=1
tail -1 "$pt/pretrain/metrics.jsonl" | tee -a "$out/pretrain.log" || status=1
echo "== training step: ours vs transformers"
$py benchmarks/train_step.py --device "$device" --dtype "${DTYPE:-bfloat16}" --preset "${PRESET:-1b}" \
    --seq-len "${SEQ:-4096}" --batch "${BATCH:-4}" --rounds 3 --steps 3 --json "$out/train_step.json" 2>&1 \
    | tee "$out/train_step.log" || status=1
echo "== batch-1 decoding: eager vs compiled (CUDA graphs)"
$py benchmarks/gpu_decode.py --device "$device" --dtype "${DTYPE:-bfloat16}" --preset "${PRESET:-1b}" \
    --peak-gbs "${PEAK_GBS:-4800}" --new-tokens "${NEW_TOKENS:-256}" --json "$out/decode.json" 2>&1 | tail -6 | tee "$out/decode.log" || status=1
rm -rf "$pt"
exit $status
