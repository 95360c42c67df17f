"""Training-step speed: ours vs Hugging Face transformers' LlamaForCausalLM, same weights, one run.

One step = forward + next-token cross-entropy + backward + gradient clipping (1.0) + AdamW step
(β 0.9/0.95, eps 1e-5, weight decay 0.1 on matrices, the same param groups and the fused AdamW
kernel for both: `build_optimizer` uses it, and so does transformers' `Trainer` by default,
`optim="adamw_torch_fused"` since torch 2.8). Ours is `llama2.model.Transformer` + `lm_loss` + `build_optimizer`; theirs is
`LlamaForCausalLM(input_ids, labels)` with the same config and `torch.optim.AdamW`. Both start
from the same weights and see the same batch; the first losses are printed side by side.
Each side runs in a process of its own, as a user would run it: ours as the recipes run it (which
includes `llama2.train.keep_freed_memory`, the malloc setting `place_model` applies on CPU),
transformers in a stock process (`--theirs-malloc` gives it the same setting, to show how much of
the difference that is). The parent alternates the two over `--rounds` rounds of `--steps` steps,
the idle side blocked on a pipe; tokens/s are medians and the ratio is the median of the per-round
ratios (robust to the shared machine's drift). Both sides run with OpenMP's default wait policy,
as each would alone on the cores (`--omp-wait-policy passive` for the setting of processes that
share cores; measurements before 2026-11-28 used it).

`--profile N` then profiles N steps of each side and prints where the time goes: matrix products,
attention, the optimizer, everything else, and the ratio that our matrix products and attention
alone would allow (what it showed, by date and commit: docs/results.md).

MFU = tokens/s x ModelArgs.flops_per_token(T) / peak. On CPU the peak is measured in this run:
the best GFLOP/s of square fp32 matmuls (768 and 1536) with this many threads over both kernel
libraries torch can call (MKL through `torch.mm`, oneDNN through the op our model uses, so that a
faster library in our step cannot inflate its MFU), re-measured after every round and the maximum
kept (the machine is shared: a peak caught in a busy moment would flatter the MFU). On GPUs it is
the datasheet dense peak (`llama2.train.peak_flops`).

    python benchmarks/train_step.py                       # CPU: ~20M model, seq 256, fp32, 2 threads
    python benchmarks/train_step.py --rounds 8 --profile 2  # ... and where each side's step goes
    python benchmarks/train_step.py --device cuda --dtype bfloat16 --preset 1b --seq-len 4096 --batch 4

With --dtype bfloat16 both models' weights, activations and optimizer states are bf16 (no master
copy): a throughput measurement, not a training recipe. The GPU path has not been run yet (no GPU
has been lent to this project's benchmark work so far); `benchmarks/gpu_check.sh` runs it with the
other GPU checks.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from llama2.model import ModelArgs, Transformer

# "20m": Llama-shaped at the size a 2-core CPU trains in minutes. dim 384 with 6 heads of 64,
# Meta's SwiGLU rule (int(8·384/3) rounded up to 256 = 1024), 8 layers: 14.2M in the blocks.
# Vocabulary 8192, untied like Llama 2: 2 x 3.1M. With a 32k vocabulary the embedding and head
# alone would be 25M, and the benchmark would time one vocabulary projection, not a transformer.
# "1b": TinyLlama-1.1B's shape (dim 2048, 22 layers, GQA 32/4, SwiGLU 5632, 32k vocab) for a GPU.
PRESETS = {
    "20m": ModelArgs(dim=384, n_layers=8, n_heads=6, n_kv_heads=6, hidden_dim=1024, vocab_size=8192,
                     max_seq_len=4096),
    "1b": ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, vocab_size=32000,
                    max_seq_len=4096),
}


def hf_twin(model: Transformer, dtype: torch.dtype):
    """A LlamaForCausalLM with the same config and weights (q/k rows permuted to HF's rotary layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama2.hf_checkpoint import meta_to_hf_name, meta_to_hf_qk

    a = model.args
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim,
                      num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                      head_dim=a.head_dim, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
                      max_position_embeddings=a.max_seq_len, tie_word_embeddings=a.tie_embeddings,
                      attention_bias=False, attn_implementation="sdpa")
    hf = LlamaForCausalLM(cfg)
    state = {}
    for k, v in model.state_dict().items():
        if a.tie_embeddings and k == "output.weight":
            continue
        if k.endswith(("wq.weight", "wk.weight")):
            v = meta_to_hf_qk(v, a.n_heads if k.endswith("wq.weight") else a.n_kv_heads)
        state[meta_to_hf_name(k)] = v.clone()
    hf.load_state_dict(state, strict=not a.tie_embeddings)
    return hf.to(dtype)


def adamw(model: torch.nn.Module):
    """torch.optim.AdamW as transformers' Trainer builds it by default (`adamw_torch_fused`), with
    build_optimizer's hyperparameters and groups (decay on matrices only)."""
    from llama2.train import OptimConfig

    c = OptimConfig()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": c.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps, fused=True)


def worker(a: argparse.Namespace) -> None:
    """One side of the benchmark: build model, optimizer and batch, then time steps on request.

    Protocol on stdin/stdout, one JSON object per line: the worker first reports its step-1 loss,
    then answers each `{"steps": n}` with the seconds n steps took; `{}` ends it.
    """
    torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    from llama2.losses import lm_loss
    from llama2.train import OptimConfig, build_optimizer, clip_grad_norm, keep_freed_memory

    args = PRESETS[a.preset]
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()  # the same weights on both sides: the same seed, then HF's layout for theirs
    ours = a.worker == "ours"
    if (ours or a.theirs_malloc) and device.type == "cpu":
        keep_freed_memory()  # what llama2.recipes.common.place_model does on CPU
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, args.vocab_size, (a.batch, a.seq_len + 1), generator=g).to(device)
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    if ours:
        model = model.to(device=device, dtype=dtype).train()
        blocks = model.layers if a.compile in ("ours", "both") else []
        opt = build_optimizer(model, OptimConfig())
        forward = lambda: lm_loss(model(x), y)  # noqa: E731
        clip = lambda: clip_grad_norm(model, 1.0)  # noqa: E731
    else:
        model = hf_twin(model, dtype).to(device).train()
        blocks = model.model.layers if a.compile == "both" else []
        opt = adamw(model)
        forward = lambda: model(input_ids=x, labels=y, shift_labels=y).loss  # noqa: E731 (y is already shifted)
        clip = lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)  # noqa: E731
    for block in blocks:
        block.compile()  # what `compile: true` does in the recipes (llama2.recipes.common.place_model)

    def step() -> float:
        loss = forward()
        loss.backward()
        clip()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    first = step()  # also the warm-up
    step()
    print(json.dumps({"loss": first}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if not req:
            break
        if "profile" in req:
            print(json.dumps(profile_steps(step, req["profile"])), flush=True)
            continue
        sync()
        t = time.perf_counter()
        for _ in range(req["steps"]):
            step()
        sync()
        print(json.dumps({"seconds": time.perf_counter() - t}), flush=True)


# Where a CPU step's time goes, by the ops the profiler records (self time on the calling thread,
# which for an op parallelised over the threads is its wall time): the matrix products, attention,
# the optimizer step, everything else (elementwise work: norms, RoPE, SwiGLU, residual adds, the loss).
CATEGORIES = {
    "matmul": ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "optimizer": ("aten::_fused_adamw_",),
}


def profile_steps(step, n: int) -> dict:
    """Seconds per step by category over n profiled steps, plus the step's wall time ("wall"); what
    no op accounts for (Python, the autograd engine, waking threads) is wall minus the categories."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(n):
            step()
        wall = time.perf_counter() - t
    out = dict.fromkeys((*CATEGORIES, "other"), 0.0)
    for e in prof.key_averages():
        cat = next((c for c, names in CATEGORIES.items() if e.key in names), "other")
        out[cat] += e.self_cpu_time_total / 1e6 / n
    out["wall"] = wall / n
    return out


class Side:
    """A worker process of this script, driven over its stdin/stdout."""

    def __init__(self, name: str, argv: list[str], env: dict):
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", name, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"benchmark worker exited with status {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("{}\n")
            self.proc.stdin.flush()
            self.proc.wait()


def print_profile(prof: dict, n: int) -> None:
    o, t = prof["ours"], prof["transformers"]
    for side in (o, t):
        side["unaccounted"] = side["wall"] - sum(side[c] for c in (*CATEGORIES, "other"))
    print(f"\nwhere a step's time goes (ms per step, {n} profiled steps per side; the profiler slows both)")
    print(f"{'':<13}{'ours':>9}{'transformers':>14}{'difference':>12}")
    for c in (*CATEGORIES, "other", "unaccounted", "wall"):
        print(f"{c:<13}{o[c] * 1e3:>9.0f}{t[c] * 1e3:>14.0f}{(t[c] - o[c]) * 1e3:>+12.0f}")
    # The most our side could gain without faster matrix products or attention: all else at zero.
    bound = t["wall"] / (o["matmul"] + o["attention"])
    print(f"ratio in this profile {t['wall'] / o['wall']:.2f}x; with nothing but our matrix products and "
          f"attention (everything else free) it would be {bound:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="20m", choices=list(PRESETS))
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (8 x 256 = 2048 tokens)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--compile", choices=["none", "ours", "both"], default="none",
                    help="torch.compile each decoder block: ours only (the recipes' `compile: true`) or both sides")
    ap.add_argument("--omp-wait-policy", choices=["default", "passive"], default="default",
                    help="OpenMP wait policy of both sides (default: OpenMP's own, each side being alone on the "
                         "cores, as a training run is; passive: the setting for processes that share cores)")
    ap.add_argument("--theirs-malloc", action="store_true",
                    help="give the transformers process our malloc setting too (keep_freed_memory)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="CPU only: after the rounds, profile this many steps per side and print where the "
                         "time goes (matrix products, attention, optimizer, other)")
    ap.add_argument("--worker", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    from llama2.train import matmul_peaks, peak_flops

    args = PRESETS[a.preset]
    T, tokens = a.seq_len, a.batch * a.seq_len
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
            if k in ("preset", "seq_len", "batch", "threads", "device", "dtype", "compile")]
    argv += ["--theirs-malloc"] if a.theirs_malloc else []
    # Each side is alone on the cores while it runs (the other blocks on its pipe), as `llama2 pretrain`
    # or a transformers script would be: OpenMP's default wait policy for both, unless told otherwise.
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if a.omp_wait_policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    ours, theirs = Side("ours", argv, env), Side("transformers", argv, env)
    try:
        first = (ours.read()["loss"], theirs.read()["loss"])  # each side has warmed up with 2 steps
        print(f"{a.preset}: {args.num_params() / 1e6:.1f}M parameters ({args.num_params(False) / 1e6:.1f}M "
              f"without embeddings), batch {a.batch} x {T} = {tokens} tokens/step, {a.dtype} on {a.device}, "
              f"{a.threads} threads, OpenMP wait policy {a.omp_wait_policy}, one process per side"
              f"{' (same malloc setting)' if a.theirs_malloc else ''}; "
              f"step-1 loss ours {first[0]:.5f} | transformers {first[1]:.5f}")
        fpt = args.flops_per_token(T)
        print(f"{fpt / 1e6:.1f} MFLOP per token (6N + 12·L·d·T)")
        peaks = dict.fromkeys(("mkl", "onednn"), 0.0)

        def measure_peak() -> None:  # in this process, while both sides wait on their pipes
            if device.type == "cpu":
                for lib, flops in matmul_peaks().items():
                    peaks[lib] = max(peaks[lib], flops)

        measure_peak()
        ours_t, theirs_t = [], []
        for r in range(a.rounds):
            ours_t.append(ours.ask({"steps": a.steps})["seconds"])
            theirs_t.append(theirs.ask({"steps": a.steps})["seconds"])
            measure_peak()
            print(f"  round {r + 1}: ours {a.steps * tokens / ours_t[-1]:7.0f} tok/s | "
                  f"transformers {a.steps * tokens / theirs_t[-1]:7.0f} tok/s | ratio {theirs_t[-1] / ours_t[-1]:.2f}x")
        prof = ({"ours": ours.ask({"profile": a.profile}), "transformers": theirs.ask({"profile": a.profile})}
                if a.profile and device.type == "cpu" else None)
    finally:
        ours.close()
        theirs.close()
    if prof:
        print_profile(prof, a.profile)
    if device.type == "cpu":
        peak = max(peaks.values())
        print(f"measured fp32 matmul peak, {a.threads} threads, best over the run: "
              + ", ".join(f"{lib} {f / 1e9:.1f}" for lib, f in peaks.items() if f) + " GFLOP/s")
    else:
        peak = peak_flops(device, dtype)
        print(f"datasheet dense {a.dtype} peak {peak / 1e12:.0f} TFLOP/s ({torch.cuda.get_device_name(device)})")
    o_tps = a.steps * tokens / statistics.median(ours_t)
    t_tps = a.steps * tokens / statistics.median(theirs_t)
    res = {"ours_tok_s": o_tps, "transformers_tok_s": t_tps,
           "ratio": statistics.median(t / o for o, t in zip(ours_t, theirs_t)),
           "ours_mfu": o_tps * fpt / peak, "transformers_mfu": t_tps * fpt / peak, "peak_flops": peak,
           "flops_per_token": fpt, "step1_loss": {"ours": first[0], "transformers": first[1]}, "profile": prof}
    print(f"median: ours {o_tps:.0f} tok/s (MFU {res['ours_mfu']:.1%}) | transformers {t_tps:.0f} tok/s "
          f"(MFU {res['transformers_mfu']:.1%}) | ratio (median of rounds) {res['ratio']:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
