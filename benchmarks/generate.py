"""Generation speed: ours vs Hugging Face transformers' `generate` (and llama.cpp), one run.

SmolLM2-135M-Instruct, greedy, `--new-tokens` (128) new tokens, EOS ignored, at batches `--batches`
(1, 16, 64), `--threads` (2) threads. Sides, timed in alternating rounds (`--repeats`):

- ours, eager: `Decoder` (the PackedModel copy), fp32;
- ours, compiled (batch 1; `--no-compile` leaves it out): `Decoder(compile=True)`, the compiled
  one-token step of llama2.compiled_decode;
- transformers' `generate` on the same fp32 weights.

At batch 1 it also reports memory-bandwidth utilisation: weight bytes x tokens/s over a measured
read bandwidth (a large sum; decoding only reads weights, so this is its ceiling) and over a
measured copy bandwidth. tokens/s are medians, ratios the medians of per-round ratios.

`--quant int8,int4,gguf` adds our model with quantized weights (llama2.quant): int8 / int4 (group
32) quantized from the fp32 model, and `gguf`, the file's own Q4_1 blocks kept as int4 (its Q8_0
tied head as int8); at batch 1 compiled (and eager with `--quant-eager`), in batches eager. Each
gets tokens/s, its speed-up over our fp32 eager, the bytes it streams per token and whether its
greedy rows equal our fp32 model's.

`--vs llama.cpp` adds llama.cpp (llama-cpp-python, in benchmarks/.venv-llamacpp, built on first
use) at batch 1 on the same GGUF file, with our `gguf` variant compiled beside it.

The OpenMP wait policy is left as the user's (libgomp's default when unset); `--omp-wait-policy`
sets it for the whole run.

    python benchmarks/generate.py [--new-tokens 128] [--repeats 3] [--threads 2] [--batches 1,16,64]
        [--quant int8,int4,gguf] [--vs llama.cpp] [--no-compile] [--profile]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _policy_from_argv() -> None:
    """--omp-wait-policy must be in the environment before torch starts its OpenMP runtime."""
    if "--omp-wait-policy" in sys.argv:
        os.environ["OMP_WAIT_POLICY"] = sys.argv[sys.argv.index("--omp-wait-policy") + 1].upper()


_policy_from_argv()

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


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def profile_step(dec, prompt, new_tokens: int) -> str:
    """The top operators of one batch-1 generation under torch.profiler (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    from llama2.generation import SamplingParams

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        dec.generate(prompt, SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--quant", default="", help="comma-separated quantized variants to time too: int8, int4, gguf")
    ap.add_argument("--quant-eager", action="store_true", help="at batch 1, time the quantized variants eager too")
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled batch-1 step")
    ap.add_argument("--vs", default="", choices=["", "llama.cpp"], help="also time llama.cpp on the same GGUF")
    ap.add_argument("--llama-cpp-python", help="a python with llama_cpp (default: benchmarks/.venv-llamacpp)")
    ap.add_argument("--omp-wait-policy", choices=["active", "passive"], help="default: the environment's")
    ap.add_argument("--profile", action="store_true", help="print the operator profile of a batch-1 generation, "
                    "eager and compiled")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

    from transformers import AutoModelForCausalLM

    from llama2.checkpoint import build_model
    from llama2.generation import Decoder, SamplingParams
    from llama2.gguf_checkpoint import read_gguf
    from llama2.paths import smollm2_gguf
    from llama2.quant import quantize_model, quantized_bytes

    compile_ = not a.no_compile
    if a.vs and not compile_:
        sys.exit("--vs llama.cpp compares against our compiled step: drop --no-compile")
    gguf = smollm2_gguf()
    ck = read_gguf(gguf)
    ours_model = build_model(ck.args, ck.state, ck.source)
    tok = ck.tokenizer()
    eager = Decoder(ours_model, tok)
    compiled = Decoder(ours_model, tok, compile=True) if compile_ else None
    quant_names = [q for q in a.quant.split(",") if q]
    if a.vs and "gguf" not in quant_names:
        quant_names.append("gguf")
    quant: dict[str, tuple[Decoder, Decoder | None, int]] = {}  # name -> (eager, compiled, bytes per token)
    for name in quant_names:
        if name == "gguf":
            qk = read_gguf(gguf, dequantize=False)
            qm = build_model(qk.args, qk.state, qk.source)
        else:
            qm = quantize_model(build_model(ck.args, ck.state, ck.source), name, 32)
        quant[name] = (Decoder(qm, tok), Decoder(qm, tok, compile=True) if compile_ else None, quantized_bytes(qm))
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in ours_model.parameters())  # tied head counted once
    copy_bw, read_bw = bandwidths()
    print(f"SmolLM2-135M fp32 ({weight_bytes / 1e6:.0f} MB of weights), {a.threads} threads, "
          f"{a.new_tokens} new tokens, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write), read bandwidth {read_bw / 1e9:.1f} GB/s",
          flush=True)

    results: dict = {"read_bandwidth": read_bw, "copy_bandwidth": copy_bw, "weight_bytes": weight_bytes,
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset")}
    greedy = SamplingParams(max_new_tokens=a.new_tokens, temperature=0, ignore_eos=True)
    warm = SamplingParams(max_new_tokens=4, temperature=0)
    for B in [int(b) for b in a.batches.split(",")]:
        prompt = [[1] + [(17 * i + 101 * b) % 40000 + 100 for i in range(a.prompt_tokens - 1)] for b in range(B)]
        ids = torch.tensor(prompt)
        # name -> (decoder or None for transformers, bytes streamed per token)
        sides: dict[str, tuple[Decoder | None, int]] = {"ours": (eager, weight_bytes), "transformers": (None, weight_bytes)}
        if B == 1 and compiled is not None:
            sides["ours compiled"] = (compiled, weight_bytes)
        for n, (qe, qc, nbytes) in quant.items():
            if B > 1 or qc is None or a.quant_eager:
                sides[n] = (qe, nbytes)
            if B == 1 and qc is not None:
                sides[f"{n} compiled"] = (qc, nbytes)

        def run(dec):
            if dec is None:
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                                  min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=2)
                return [row[a.prompt_tokens:].tolist() for row in out]
            out = dec.generate(prompt, greedy)
            assert all(len(c.tokens) == a.new_tokens for c in out)
            return [c.tokens for c in out]

        for dec, _ in sides.values():  # warm up (and compile)
            if dec is None:
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=2)
            else:
                dec.generate(prompt, warm)
        times: dict[str, list[float]] = {n: [] for n in sides}
        outs: dict[str, list] = {}
        for _ in range(a.repeats):
            for n, (dec, _) in sides.items():
                dt, outs[n] = timed(lambda: run(dec))
                times[n].append(dt)
        lcpp = None
        if B == 1 and a.vs == "llama.cpp":
            import llama_cpp_env

            lcpp = llama_cpp_env.run(llama_cpp_env.llama_cpp_python(a.llama_cpp_python), gguf, prompt[0],
                                     a.new_tokens, a.threads, a.repeats)
        row: dict = {}
        base = times["ours"]
        for n in sides:
            tps = B * a.new_tokens / statistics.median(times[n])
            entry = {"tok_s": tps, "vs_ours_eager": statistics.median([o / t for o, t in zip(base, times[n])]),
                     "greedy_rows_as_ours_fp32": f"{sum(x == y for x, y in zip(outs[n], outs['ours']))}/{B}"}
            if n != "transformers":
                entry["vs_transformers"] = statistics.median(
                    [h / t for h, t in zip(times["transformers"], times[n])])
            if B == 1:
                nbytes = sides[n][1]
                entry.update(bytes_per_token=nbytes, bandwidth_vs_read=nbytes * tps / read_bw,
                             bandwidth_vs_copy=nbytes * tps / copy_bw)
            row[n] = entry
        if lcpp is not None:
            l_tps = statistics.median(lcpp["tok_s"])
            row["llama.cpp"] = {"tok_s": l_tps, "version": lcpp["version"],
                                "greedy_as_ours_gguf": sum(x == y for x, y in zip(lcpp["tokens"], outs["gguf compiled"][0]))}
        results[f"batch{B}"] = row
        print(f"batch {B}:")
        for n, e in row.items():
            extra = ""
            if n == "llama.cpp":
                ours_q = row["gguf compiled"]["tok_s"]
                print(f"  {n:>16}: {e['tok_s']:7.1f} tok/s | ours gguf compiled / llama.cpp {ours_q / e['tok_s']:.2f}x, "
                      f"ours fp32 compiled / llama.cpp {row['ours compiled']['tok_s'] / e['tok_s']:.2f}x | "
                      f"first {e['greedy_as_ours_gguf']}/{a.new_tokens} greedy tokens as ours gguf (llama-cpp-python "
                      f"{e['version']})")
                continue
            if "vs_transformers" in e:
                extra += f" | {e['vs_transformers']:.2f}x transformers"
            if "bandwidth_vs_read" in e:
                extra += (f" | {e['bytes_per_token'] / 1e6:.0f} MB/token streamed at "
                          f"{e['bytes_per_token'] * e['tok_s'] / 1e9:.1f} GB/s = {e['bandwidth_vs_read']:.0%} of read, "
                          f"{e['bandwidth_vs_copy']:.0%} of copy bandwidth")
            print(f"  {n:>16}: {e['tok_s']:7.1f} tok/s | {e['vs_ours_eager']:.2f}x ours eager | greedy rows as "
                  f"ours fp32 {e['greedy_rows_as_ours_fp32']}{extra}", flush=True)
    if a.profile:
        prompt = [[1] + [(17 * i) % 40000 + 100 for i in range(a.prompt_tokens - 1)]]
        for name, dec in (("eager", eager), ("compiled", compiled)):
            if dec is not None:
                print(f"\nprofile, ours {name}, batch 1, 32 new tokens:\n{profile_step(dec, prompt, 32)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
