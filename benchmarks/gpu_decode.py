"""Batch-1 decoding on a GPU: eager vs the compiled step as CUDA graphs, and model-bandwidth use.

A ~1B-parameter Llama (`--preset 1b`, TinyLlama-1.1B's shape as in benchmarks/train_step.py, random weights) in bf16 on CUDA,
greedy, `--new-tokens` (256) new tokens after a 32-token prompt, EOS ignored:

- ours eager: `Decoder` on the model;
- ours compiled: `Decoder(compile=True)`, llama2.compiled_decode's one-token step captured as CUDA
  graphs (torch.compile mode "reduce-overhead", static KV cache), greedy tokens compared with eager;
- model-bandwidth utilisation (gpt-fast's MBU): weight bytes x decode tokens/s over the card's
  measured copy bandwidth (a large device-to-device copy, read + write counted) and over
  `--peak-gbs` when given (the datasheet figure: H100 SXM 3350, H200 4800). gpt-fast reports
  ~72% on an A100; the target here is >= 80%.

    python benchmarks/gpu_decode.py [--preset 1b] [--dtype bfloat16] [--new-tokens 256] [--json F]
    DEVICE=cpu python benchmarks/gpu_decode.py --device cpu --dtype float32 --preset 20m   # plumbing only
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import PRESETS  # noqa: E402  (one definition of the benchmark shapes)


def copy_bandwidth(device: str, gib: float = 1.0) -> float:
    x = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * x.numel() * 2 / best


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1b", choices=list(PRESETS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-gbs", type=float, default=0.0, help="the card's datasheet memory bandwidth, GB/s")
    ap.add_argument("--json")
    a = ap.parse_args()
    from llama2.generation import Decoder, GenerationStats, SamplingParams
    from llama2.model import Transformer

    torch.manual_seed(0)
    args = dataclasses.replace(PRESETS[a.preset], max_seq_len=max(512, 32 + a.new_tokens + 8))
    with torch.device(a.device):
        model = Transformer(args)
        model.init_weights(std=0.02)
    model = model.to(getattr(torch, a.dtype)).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt = [[1] + [(17 * i) % (args.vocab_size - 100) + 50 for i in range(31)]]
    params = SamplingParams(max_new_tokens=a.new_tokens, temperature=0, ignore_eos=True)
    sides = {"eager": Decoder(model), "compiled": Decoder(model, compile=True)}
    results: dict = {"preset": a.preset, "params": model.args.num_params(), "weight_bytes": weight_bytes,
                     "dtype": a.dtype, "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device}
    bw = copy_bandwidth(a.device) if a.device.startswith("cuda") else 0.0
    results["copy_bandwidth"] = bw
    print(f"{a.preset}: {model.args.num_params() / 1e9:.2f}B parameters, {weight_bytes / 1e9:.2f} GB of {a.dtype} "
          f"weights on {results['device']}; measured copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    tokens = {}
    for name, dec in sides.items():
        t = time.perf_counter()
        dec.generate(prompt, SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))  # compile, warm up
        dec.generate(prompt, params)
        warm = time.perf_counter() - t
        rates = []
        for _ in range(a.repeats):
            st = GenerationStats()
            sync(a.device)
            out = dec.generate(prompt, params, stats=st)
            sync(a.device)
            rates.append(st.decode_tps)
        tps = sorted(rates)[len(rates) // 2]
        tokens[name] = out[0].tokens
        row = {"decode_tok_s": tps, "warmup_s": warm, "weights_gb_s": weight_bytes * tps / 1e9}
        if bw:
            row["mbu_vs_copy"] = weight_bytes * tps / bw
        if a.peak_gbs:
            row["mbu_vs_datasheet"] = weight_bytes * tps / (a.peak_gbs * 1e9)
        results[name] = row
        print(f"  {name:>8}: {tps:8.1f} tok/s decode | weights streamed at {row['weights_gb_s']:.0f} GB/s"
              + (f" = {row['mbu_vs_copy']:.0%} of measured copy bandwidth" if bw else "")
              + (f", {row['mbu_vs_datasheet']:.0%} of datasheet" if a.peak_gbs else "")
              + f" | warm-up incl. compile {warm:.0f} s", flush=True)
    same = sum(x == y for x, y in zip(tokens["eager"], tokens["compiled"]))
    results["greedy_tokens_equal"] = f"{same}/{a.new_tokens}"
    results["compiled_vs_eager"] = results["compiled"]["decode_tok_s"] / results["eager"]["decode_tok_s"]
    print(f"  compiled / eager {results['compiled_vs_eager']:.2f}x; greedy tokens equal {same}/{a.new_tokens}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
