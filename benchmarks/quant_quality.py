"""Quality of quantized weights (llama2.quant) against the fp32 model, measured on SmolLM2-135M.

The fp32 reference is the bundled GGUF dequantised to fp32 (its projections are Q4_1 in the file,
so "fp32" means those weights exactly, in fp32). Variants:

- int8: every projection and the head quantized per output channel from the fp32 weights;
- int4 (group 32) and int4-g64: the same, int4 in groups of 32 / 64 inputs;
- gguf: the file's own blocks kept quantized (Q4_1 -> int4 exactly, the Q8_0 tied head
  requantized per row to int8): its gap to fp32 is the kernels' bfloat16 activations and the
  head's requantization only, since the weights are the same numbers.
- a suffix `-fp32act` (e.g. int8-fp32act): the same weights with the product taken in fp32 on the
  dequantised weight instead of torch's bfloat16-activation kernel: the error of the integers
  alone, apart from the kernel's rounding.

On held-out text (`--text`, default this repo's docs/design.md, cut into `--windows` windows of
`--window` tokens), teacher-forced: the per-token log-probability of the actual next token (mean
and max |difference| to fp32), perplexity, and how often the greedy next token equals fp32's.
Free-running: `--prompts` prompts (starts of the windows) decoded greedily for `--new-tokens`
tokens; the fraction of tokens equal to fp32's position by position, and the mean number of
tokens before the first difference.

    python benchmarks/quant_quality.py [--variants int8,int4,int4-g64,gguf] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from llama2.checkpoint import build_model  # noqa: E402
from llama2.generation import Decoder, SamplingParams  # noqa: E402
from llama2.gguf_checkpoint import read_gguf  # noqa: E402
from llama2.model import Transformer  # noqa: E402
from llama2.paths import REPO_ROOT, smollm2_gguf  # noqa: E402
from llama2.quant import QuantLinear, describe, quantize_model, quantized_bytes  # noqa: E402


@torch.no_grad()
def token_logprobs(model: Transformer, windows: torch.Tensor) -> torch.Tensor:
    """log p(actual next token) at every position of each window: (W, T-1)."""
    out = []
    for row in windows:
        logp = model(row[None]).float().log_softmax(-1)[0, :-1]
        out.append(logp.gather(-1, row[1:, None])[:, 0])
    return torch.stack(out)


@torch.no_grad()
def greedy_next(model: Transformer, windows: torch.Tensor) -> torch.Tensor:
    return torch.stack([model(row[None])[0, :-1].argmax(-1) for row in windows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="int8,int4,int4-g64,gguf")
    ap.add_argument("--text", default=str(REPO_ROOT / "docs" / "design.md"))
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    path = smollm2_gguf()
    ck = read_gguf(path)
    tok = ck.tokenizer()
    fp32 = build_model(ck.args, ck.state, ck.source)
    ids = tok.encode(Path(a.text).read_text(), bos=False)
    need = a.window * a.windows
    if len(ids) < need:
        raise SystemExit(f"{a.text}: {len(ids)} tokens, fewer than {a.windows} windows of {a.window}")
    windows = torch.tensor(ids[:need]).view(a.windows, a.window)
    step = max(1, (len(ids) - a.prompt_tokens) // a.prompts)
    prompts = [[tok.bos_id] + ids[i * step: i * step + a.prompt_tokens] for i in range(a.prompts)]
    params = SamplingParams(max_new_tokens=a.new_tokens, temperature=0, ignore_eos=True)

    ref_lp = token_logprobs(fp32, windows)
    ref_next = greedy_next(fp32, windows)
    ref_gen = [c.tokens for c in Decoder(fp32).generate(prompts, params)]
    results = {"fp32": {"perplexity": math.exp(-ref_lp.mean().item()), "mb_per_token": quantized_bytes(fp32) / 1e6}}
    print(f"SmolLM2-135M-Instruct on {Path(a.text).name}: {a.windows} windows of {a.window} tokens, "
          f"{a.prompts} prompts x {a.new_tokens} greedy tokens")
    print(f"{'fp32':>9}: perplexity {results['fp32']['perplexity']:.3f} | "
          f"{results['fp32']['mb_per_token']:.0f} MB of weights per token")
    for name in [v for v in a.variants.split(",") if v]:
        base, fp32act = name.removesuffix("-fp32act"), name.endswith("-fp32act")
        if base == "gguf":
            qk = read_gguf(path, dequantize=False)
            model = build_model(qk.args, qk.state, qk.source)
        else:
            mode, _, group = base.partition("-g")
            model = quantize_model(build_model(ck.args, ck.state, ck.source), mode, int(group or 32))
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.use_kernel = not fp32act
        lp = token_logprobs(model, windows)
        diff = (lp - ref_lp).abs()
        agree_next = (greedy_next(model, windows) == ref_next).float().mean().item()
        gen = [c.tokens for c in Decoder(model).generate(prompts, params)]
        same = [sum(x == y for x, y in zip(g, r)) / len(r) for g, r in zip(gen, ref_gen)]
        first = [next((i for i, (x, y) in enumerate(zip(g, r)) if x != y), len(r)) for g, r in zip(gen, ref_gen)]
        row = {"quantized": describe(model), "mb_per_token": quantized_bytes(model) / 1e6,
               "perplexity": math.exp(-lp.mean().item()), "logprob_abs_diff_mean": diff.mean().item(),
               "logprob_abs_diff_max": diff.max().item(), "greedy_next_agreement": agree_next,
               "decode_token_agreement": statistics.mean(same), "decode_tokens_before_first_difference":
               statistics.mean(first)}
        results[name] = row
        print(f"{name:>9}: perplexity {row['perplexity']:.3f} | |Δ log p| mean {row['logprob_abs_diff_mean']:.4f} "
              f"max {row['logprob_abs_diff_max']:.3f} | greedy next token = fp32 {agree_next:.1%} | decoded "
              f"tokens = fp32 {row['decode_token_agreement']:.1%}, first difference after "
              f"{row['decode_tokens_before_first_difference']:.1f} of {a.new_tokens} | "
              f"{row['mb_per_token']:.0f} MB per token ({describe(model)})")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
