"""Training-step speed: ours vs Hugging Face transformers' LlamaForCausalLM, same weights, one run.

One step = forward + next-token cross-entropy + backward + gradient clipping (1.0) + AdamW step
(β 0.9/0.95, eps 1e-5, weight decay 0.1 on matrices, the same param groups and `foreach` kernels
for both). Ours is `llama2.model.Transformer` + `lm_loss` + `build_optimizer`; theirs is
`LlamaForCausalLM(input_ids, labels)` with the same config and `torch.optim.AdamW`. Both start
from the same weights and see the same batch; the first losses are printed side by side.
Timings alternate ours/theirs over `--rounds` rounds of `--steps` steps; tokens/s are medians and
the ratio is the median of the per-round ratios (robust to the shared machine's drift).

MFU = tokens/s x ModelArgs.flops_per_token(T) / peak. On CPU the peak is measured in this run:
the best GFLOP/s of square fp32 matmuls (768 and 1536) with this many threads over both kernel
libraries torch can call (MKL through `torch.mm`, oneDNN through the op our model uses, so that a
faster library in our step cannot inflate its MFU), re-measured after every round and the maximum
kept (the machine is shared: a peak caught in a busy moment would flatter the MFU). On GPUs it is
the datasheet dense peak (`llama2.train.peak_flops`).

    python benchmarks/train_step.py                       # CPU: ~20M model, seq 256, fp32, 2 threads
    python benchmarks/train_step.py --device cuda --dtype bfloat16 --preset 1b --seq-len 4096 --batch 4

With --dtype bfloat16 both models' weights, activations and optimizer states are bf16 (no master
copy): a throughput measurement, not a training recipe. The GPU path has not been run yet (no GPU
has been lent to this project's benchmark work so far).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from llama2.model import ModelArgs, Transformer  # noqa: E402

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

    from llama2.checkpoint import meta_to_hf_name, meta_to_hf_qk

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


def adamw(model: torch.nn.Module, foreach: bool, fused: bool):
    """torch.optim.AdamW with build_optimizer's hyperparameters and groups (decay on matrices only)."""
    from llama2.train import OptimConfig

    c = OptimConfig()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": c.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps,
                             foreach=None if fused else foreach, fused=fused or None)


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
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)

    from llama2.losses import lm_loss
    from llama2.train import OptimConfig, build_optimizer, clip_grad_norm, matmul_peaks, peak_flops

    args = PRESETS[a.preset]
    torch.manual_seed(0)
    ours = Transformer(args)
    ours.init_weights()
    theirs = hf_twin(ours, dtype).to(device).train()
    ours = ours.to(device=device, dtype=dtype).train()
    if a.compile != "none":
        for block in ours.layers:
            block.compile()  # what `compile: true` does in the recipes (llama2.recipes.common.place_model)
        if a.compile == "both":
            for layer in theirs.model.layers:
                layer.compile()
    opt_ours = build_optimizer(ours, OptimConfig())
    on_cuda = device.type == "cuda"
    opt_theirs = adamw(theirs, foreach=not on_cuda, fused=on_cuda)

    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, args.vocab_size, (a.batch, a.seq_len + 1), generator=g).to(device)
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    T, tokens = a.seq_len, a.batch * a.seq_len

    def step_ours() -> float:
        loss = lm_loss(ours(x), y)
        loss.backward()
        clip_grad_norm(ours, 1.0)
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.item()

    def step_theirs() -> float:
        loss = theirs(input_ids=x, labels=y, shift_labels=y).loss  # y is already shifted
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0, foreach=True)
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        return loss.item()

    def timed(step) -> float:
        if on_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(a.steps):
            step()
        if on_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    first = (step_ours(), step_theirs())  # also the warm-up
    print(f"{a.preset}: {args.num_params() / 1e6:.1f}M parameters ({args.num_params(False) / 1e6:.1f}M "
          f"without embeddings), batch {a.batch} x {T} = {tokens} tokens/step, {a.dtype} on {a.device}, "
          f"{a.threads} threads; step-1 loss ours {first[0]:.5f} | transformers {first[1]:.5f}")
    step_ours(), step_theirs()

    fpt = args.flops_per_token(T)
    print(f"{fpt / 1e6:.1f} MFLOP per token (6N + 12·L·d·T)")
    peaks = dict.fromkeys(("mkl", "onednn"), 0.0)

    def measure_peak() -> None:
        if device.type == "cpu":
            for lib, flops in matmul_peaks().items():
                peaks[lib] = max(peaks[lib], flops)

    measure_peak()
    ours_t, theirs_t = [], []
    for r in range(a.rounds):
        ours_t.append(timed(step_ours))
        theirs_t.append(timed(step_theirs))
        measure_peak()
        print(f"  round {r + 1}: ours {a.steps * tokens / ours_t[-1]:7.0f} tok/s | "
              f"transformers {a.steps * tokens / theirs_t[-1]:7.0f} tok/s | ratio {theirs_t[-1] / ours_t[-1]:.2f}x")
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
           "flops_per_token": fpt}
    print(f"median: ours {o_tps:.0f} tok/s (MFU {res['ours_mfu']:.1%}) | transformers {t_tps:.0f} tok/s "
          f"(MFU {res['transformers_mfu']:.1%}) | ratio (median of rounds) {res['ratio']:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
