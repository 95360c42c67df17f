"""Generation speed: ours vs Hugging Face transformers' `generate`, same SmolLM2 weights, one run.

fp32, greedy, `--new-tokens` (128) new tokens, EOS ignored, at batch 1 and batch 16, with
`--threads` (2) threads. Also reports memory-bandwidth utilisation at batch 1: weight bytes x
tokens/s over a measured copy bandwidth (bytes read + written per second by a large copy) and over
a measured read bandwidth (a large sum; decoding only reads weights, so this is its real ceiling).
Timings alternate ours/theirs over `--repeats` rounds; tokens/s are medians, the ratio is the
median of the per-round ratios.

`--quant int8,int4,gguf` adds our model with quantized weights (llama2.quant) to the same rounds:
int8 / int4 (group 32) quantized from the fp32 model, and `gguf`, the file's own Q4_1 blocks kept
as int4 (its Q8_0 tied head as int8). Each gets its tokens/s, its speed-up over our fp32, the
bytes it streams per token (integers, scales and norms: what a decoded token reads) and the
fraction of read bandwidth, and whether its greedy rows equal our fp32 model's.

    python benchmarks/generate.py [--new-tokens 128] [--repeats 3] [--threads 2] [--quant int8,int4,gguf]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def bandwidths(gib: float = 0.5, repeats: int = 5) -> tuple[float, float]:
    """Bytes/s of a large tensor copy (read + write counted) and of a pure read (a sum), best of a few."""
    x = torch.ones(int(gib * 2**30) // 4)
    y = torch.empty_like(x)
    best = {"copy": float("inf"), "read": float("inf")}
    for name, op in (("copy", lambda: y.copy_(x)), ("read", lambda: x.sum())):
        op()
        for _ in range(repeats):
            t = time.perf_counter()
            op()
            best[name] = min(best[name], time.perf_counter() - t)
    return 2 * x.numel() * 4 / best["copy"], x.numel() * 4 / best["read"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--quant", default="", help="comma-separated quantized variants to time too: int8, int4, gguf")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from transformers import AutoModelForCausalLM

    from llama2.checkpoint import build_model
    from llama2.gguf_checkpoint import read_gguf
    from llama2.generation import Decoder, SamplingParams
    from llama2.paths import smollm2_gguf
    from llama2.quant import quantize_model, quantized_bytes

    gguf = smollm2_gguf()
    ck = read_gguf(gguf)
    ours_model = build_model(ck.args, ck.state, ck.source)
    gen = Decoder(ours_model, ck.tokenizer())
    quant: dict[str, tuple[Decoder, int]] = {}  # name -> (decoder, bytes streamed per token)
    for name in [q for q in a.quant.split(",") if q]:
        if name == "gguf":
            qk = read_gguf(gguf, dequantize=False)
            qm = build_model(qk.args, qk.state, qk.source)
        else:
            qm = quantize_model(build_model(ck.args, ck.state, ck.source), name, 32)
        quant[name] = (Decoder(qm), quantized_bytes(qm))
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in ours_model.parameters())  # tied head counted once
    copy_bw, read_bw = bandwidths()
    print(f"SmolLM2-135M fp32 ({weight_bytes / 1e6:.0f} MB of weights), {a.threads} threads, "
          f"{a.new_tokens} new tokens, copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write), "
          f"read bandwidth {read_bw / 1e9:.1f} GB/s")

    results = {}
    for B in [int(b) for b in a.batches.split(",")]:
        prompt = [[1] + [(17 * i + 101 * b) % 40000 + 100 for i in range(a.prompt_tokens - 1)] for b in range(B)]
        ids = torch.tensor(prompt)
        params = SamplingParams(max_new_tokens=a.new_tokens, temperature=0, ignore_eos=True)

        def run_ours():
            t = time.perf_counter()
            out = gen.generate(prompt, params)
            dt = time.perf_counter() - t
            assert all(len(c.tokens) == a.new_tokens for c in out)
            return dt, out

        def run_theirs():
            t = time.perf_counter()
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                              min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=2)
            return time.perf_counter() - t, out

        def run_quant(qgen):
            t = time.perf_counter()
            out = qgen.generate(prompt, params)
            return time.perf_counter() - t, out

        gen.generate(prompt, SamplingParams(max_new_tokens=4, temperature=0))  # warm up both
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=2)
        for qgen, _ in quant.values():
            qgen.generate(prompt, SamplingParams(max_new_tokens=4, temperature=0))
        ours_t, theirs_t = [], []
        quant_t: dict[str, list[float]] = {n: [] for n in quant}
        quant_out = {}
        for _ in range(a.repeats):
            dt, ours_out = run_ours()
            ours_t.append(dt)
            dt, theirs_out = run_theirs()
            theirs_t.append(dt)
            for n, (qgen, _) in quant.items():
                dt, quant_out[n] = run_quant(qgen)
                quant_t[n].append(dt)
        same = sum(o.tokens == t[a.prompt_tokens:].tolist() for o, t in zip(ours_out, theirs_out))
        o_tps = B * a.new_tokens / statistics.median(ours_t)
        t_tps = B * a.new_tokens / statistics.median(theirs_t)
        ratio = statistics.median([t / o for o, t in zip(ours_t, theirs_t)])  # per round: robust to drift
        row = {"ours_tok_s": o_tps, "transformers_tok_s": t_tps, "ratio": ratio,
               "identical_greedy_rows": f"{same}/{B}"}
        extra = ""
        if B == 1:
            # Each decoded token reads every weight once (the tied head/embedding counted once).
            row["bandwidth_vs_copy"] = weight_bytes * o_tps / copy_bw
            row["bandwidth_vs_read"] = weight_bytes * o_tps / read_bw
            extra = (f", weights streamed at {weight_bytes * o_tps / 1e9:.1f} GB/s = "
                     f"{row['bandwidth_vs_copy']:.0%} of copy, {row['bandwidth_vs_read']:.0%} of read bandwidth")
        results[f"batch{B}"] = row
        print(f"batch {B:>2}: ours {o_tps:7.1f} tok/s | transformers {t_tps:7.1f} tok/s | "
              f"ratio {ratio:.2f}x (median of {a.repeats} rounds) | greedy rows identical {same}/{B}{extra}")
        for n, (_, nbytes) in quant.items():
            q_tps = B * a.new_tokens / statistics.median(quant_t[n])
            speedup = statistics.median([o / q for o, q in zip(ours_t, quant_t[n])])
            q_same = sum(x.tokens == y.tokens for x, y in zip(quant_out[n], ours_out))
            qrow = {"tok_s": q_tps, "speedup_vs_fp32": speedup, "greedy_rows_as_fp32": f"{q_same}/{B}",
                    "bytes_per_token": nbytes}
            qextra = ""
            if B == 1:
                qrow["bandwidth_vs_read"] = nbytes * q_tps / read_bw
                qextra = (f", {nbytes / 1e6:.0f} MB streamed at {nbytes * q_tps / 1e9:.1f} GB/s = "
                          f"{qrow['bandwidth_vs_read']:.0%} of read bandwidth")
            row[f"quant_{n}"] = qrow
            print(f"          {n:>5}: {q_tps:7.1f} tok/s | {speedup:.2f}x our fp32 | greedy rows as fp32 "
                  f"{q_same}/{B}{qextra}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
