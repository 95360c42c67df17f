"""SFT training throughput (Llama 2 §3.1): ours vs trl's SFTTrainer, same model, same packed rows.

    python benchmarks/sft.py                         # 15 steps of 8 x 256 packed rows, 1 thread, 3 repeats
    python benchmarks/sft.py --steps 20 --batch 16 --threads 2 --repeats 3 --trl-variants stock,nll,plain

Both sides train the `tiny` preset (dim 192, 4 layers, GQA 6/2 heads, 4,096-token SentencePiece
vocabulary, untied head), freshly initialised with the same weights, on the built-in world's SFT
dialogs (WORLD/sft/train.jsonl) in the Llama 2 chat format with the loss on answer tokens only,
and see the very same batches: the rows our recipe's loader packs (best-fit decreasing, whole
dialogs, `--batch` rows of `--seq-len` positions per optimizer step, one forward per step),
each dialog attending only to itself; AdamW (0.9/0.95, eps 1e-5, decay 0.1), clipping at 1.0,
lr 1e-3 cosine with 3% warmup, fp32, the same number of threads, one process each.
- ours: the recipe a user runs (`llama2 sft`, packing on); step time from its own metrics
  (log_every=1: the wall time between two steps' logs, i.e. one whole loop iteration: batch
  collation, forward, masked CE, backward, clipping, AdamW, logging).
- trl: `SFTTrainer` (trl 1.12.0, in a venv of its own: benchmarks/.venv-trl, or --trl-python) on
  our Hugging Face export (LlamaForCausalLM, sdpa attention). trl's own packing (`packing=True`,
  bfd) would flatten each batch into one padding-free sequence, whose attention on CPU (no flash
  attention) costs (B·T)² instead of B·T²; so it is given our packed rows pre-built instead
  (`skip_prepare_dataset`, a collator that stacks them): input_ids, position_ids restarting at 0
  for each dialog and for the padding tail (transformers turns that into the same block-diagonal
  causal mask as our doc ids, with no attention_mask), and `shift_labels` equal to our targets
  (-100 off the answers), so the loss covers exactly our answer tokens. Sequential sampler, our
  loader's order. Step time: the wall time between two `on_step_end` callbacks (the same whole
  iteration as ours: collation, forward, loss, backward, clipping, its default fused AdamW).
  Variants (`--trl-variants`):
    stock  SFTTrainer's default `loss_type="chunked_nll"`: log-softmax over the full vocabulary in
           checkpointed chunks of 256 answer tokens (recomputed in backward), plus per-token entropy
           and argmax accuracy over the full vocabulary for its metrics;
    nll    `loss_type="nll"`: the model's own cross-entropy on full logits, but SFTTrainer still
           computes entropy and accuracy over the full vocabulary (no_grad) every step;
    plain  `loss_type="nll"` and `compute_loss` overridden by transformers' `Trainer.compute_loss`
           (the public Trainer hook), which drops those metrics: the model's own cross-entropy only.
tokens/s = non-padding tokens per optimizer step (positions of the packed rows that hold a dialog
token; the same count on both sides) / step wall time. The first `--warmup` steps of each process
are not counted; each process gives the median over its remaining steps, the table the median
over `--repeats` alternating repeats. The first step's loss (before any update) is printed for
each side: equal losses show that both train on the same tokens, masks and weights.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("stock", "nll", "plain")
LR = 1e-3  # the tiny pipeline's SFT lr (configs/pipeline/tiny.yaml)


def trl_example(batch: dict, b: int) -> dict:
    """Row `b` of one of our loader's batches as the example trl is given (lists of ints)."""
    return {"input_ids": batch["tokens"][b].tolist(), "position_ids": batch["positions"][b].tolist(),
            "shift_labels": batch["targets"][b].tolist()}


def non_padding(batch: dict) -> int:
    """Positions holding a dialog token. A row's padding tail is its last document, the only one without
    answer tokens (tokenize_dialogs drops dialogs that have none); a row filled to the end has no tail."""
    from llama2.losses import IGNORE

    n = batch["tokens"].numel()
    for doc, tgt in zip(batch["doc_ids"], batch["targets"]):
        tail = doc == doc[-1]
        if bool((tgt[tail] == IGNORE).all()):
            n -= int(tail.sum())
    return n


def recipe_loader(examples, seq_len: int, batch: int, pad_id: int):
    """The loader `llama2 sft` builds for one process (seed 0, packed, micro batch = batch)."""
    from llama2.dialog_data import DialogLoader

    return DialogLoader(examples, seq_len, batch, rank=0, world_size=1, seed=0, packed=True, pad_id=pad_id)


def prepare(work: Path, a) -> dict:
    """World, tokenizer, the tiny LM (native + HF) and the rows of the first `steps` steps in our order."""
    from llama2.chat_format import ChatFormat
    from llama2.checkpoint import save_native
    from llama2.hf_checkpoint import save_hf
    from llama2.dialog_data import tokenize_dialogs
    from llama2.model import preset
    from llama2.recipes.common import build_fresh_model
    from llama2.recipes.sft import load_dialogs
    from llama2.tokenizer import train_sentencepiece
    from llama2.world.generate import generate_world

    dialogs = work / "world" / "sft" / "train.jsonl"
    if not dialogs.exists():
        generate_world(work / "world", seed=0, size="tiny", quiet=True, corpus_chars=1_000_000)
    tok = train_sentencepiece([work / "world" / "corpus" / "pretrain.jsonl"], work / "tok", vocab_size=4096)
    model = build_fresh_model(preset("tiny", vocab_size=tok.vocab_size), seed=0)
    save_native(work / "lm", model, tokenizer=tok)
    save_hf(work / "lm_hf", model.args, model.state_dict(), tok)
    examples = tokenize_dialogs(load_dialogs([str(dialogs)]), ChatFormat(tok), a.seq_len)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    loader = recipe_loader(examples, a.seq_len, a.batch, pad)
    per_epoch = loader.steps_per_epoch()
    tokens = []
    with open(work / "rows.jsonl", "w") as f:
        for _ in range(a.steps):
            batch = next(loader)
            tokens.append(non_padding(batch))
            f.writelines(json.dumps(trl_example(batch, b)) + "\n" for b in range(a.batch))
    return {"dialogs": str(dialogs), "pad_id": pad, "eos_id": tok.eos_id, "vocab": tok.vocab_size,
            "steps_per_epoch": per_epoch, "tokens": tokens}


def rates(tokens: list[int], step_times: list[float], warmup: int) -> float:
    return statistics.median(n / t for n, t in list(zip(tokens, step_times))[warmup:])


def run_ours(work: Path, info: dict, a) -> tuple[float, float]:
    out = work / "ours"
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "OMP_WAIT_POLICY": "PASSIVE", "LLAMA2_NO_PROGRESS": "1"}
    # `epochs` is the recipe's only length knob: total steps = ceil(epochs x steps per epoch) = a.steps.
    epochs = (a.steps - 0.5) / info["steps_per_epoch"]
    cmd = [sys.executable, "-m", "llama2", "sft", f"model={work / 'lm'}", f"out_dir={out}",
           f"train_data=[{info['dialogs']}]", f"seq_len={a.seq_len}", f"batch_size={a.batch}",
           f"micro_batch_size={a.batch}", f"epochs={epochs!r}", "packed=true", "log_every=1", "eval_every=0",
           "ckpt_every=0", f"optim.lr={LR}", "dtype=float32", "device=cpu"]
    subprocess.run(["rm", "-rf", str(out)], check=True)
    r = subprocess.run(cmd, check=False, env=env, cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"ours failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if len(rows) != a.steps:
        sys.exit(f"ours ran {len(rows)} steps, expected {a.steps}")
    times = [a.batch * a.seq_len / r["tokens_per_s"] for r in rows]  # log_every=1: one step per window
    return rates(info["tokens"], times, a.warmup), rows[0]["loss"]


def trl_worker(a) -> None:
    """Runs in the trl venv: SFTTrainer on the HF export and our packed rows, timing every optimizer step."""
    import torch
    from datasets import Dataset
    from transformers import (
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
    )
    from trl import SFTConfig, SFTTrainer
    from trl_env import stand_in_tokenizer

    torch.set_num_threads(a.threads)
    work, info = Path(a.work), json.loads(a.info)
    # The rows are already token ids: a word-level stand-in tokenizer only carries the special ids.
    tk = stand_in_tokenizer(info["vocab"], info["pad_id"], info["eos_id"])
    model = LlamaForCausalLM.from_pretrained(work / "lm_hf", dtype=torch.float32, attn_implementation="sdpa")
    rows = [json.loads(line) for line in (work / "rows.jsonl").read_text().splitlines()]
    check_packed_attention(model, rows[0])
    ends: list[float] = []
    first_loss: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and not first_loss:
                first_loss.append(logs["loss"])

    def collate(examples):
        return {"input_ids": torch.tensor([e["input_ids"] for e in examples]),
                "position_ids": torch.tensor([e["position_ids"] for e in examples]),
                "labels": torch.tensor([e["shift_labels"] for e in examples]),  # only `is not None` is read
                "shift_labels": torch.tensor([e["shift_labels"] for e in examples])}

    class PlainSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False  # as SFTTrainer does: with a cache, transformers ignores the packing
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    cfg = SFTConfig(output_dir=str(work / "trl"), per_device_train_batch_size=a.batch, max_steps=a.steps,
                    learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=max(1, round(0.03 * a.steps)),
                    adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-5, weight_decay=0.1, max_grad_norm=1.0,
                    logging_steps=10**6, logging_first_step=True, save_strategy="no", report_to=[], use_cpu=True,
                    bf16=False, fp16=False, dataloader_num_workers=0, train_sampling_strategy="sequential",
                    max_length=a.seq_len, packing=False, padding_free=False, remove_unused_columns=False,
                    dataset_kwargs={"skip_prepare_dataset": True},
                    loss_type="chunked_nll" if a.variant == "stock" else "nll")
    cls = PlainSFTTrainer if a.variant == "plain" else SFTTrainer
    trainer = cls(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tk,
                  data_collator=collate, callbacks=[Clock()])
    trainer.train()
    times = [t1 - t0 for t0, t1 in itertools.pairwise(ends)]
    if len(times) != a.steps:
        sys.exit(f"trl ran {len(times)} steps, expected {a.steps}")
    print(json.dumps({"times": times, "tokens_per_s": rates(info["tokens"], times, a.warmup),
                      "first_loss": first_loss[0] if first_loss else float("nan")}))


def check_packed_attention(model, row: dict) -> None:
    """The packed row's logits must equal each dialog's logits on its own (no attention across dialogs)."""
    import torch

    ids, pos = torch.tensor([row["input_ids"]]), torch.tensor([row["position_ids"]])
    starts = [0] + [i for i in range(1, len(row["position_ids"])) if pos[0, i] != pos[0, i - 1] + 1] + [ids.shape[1]]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        worst = max((model(input_ids=ids[:, s:e], use_cache=False).logits[0] - packed[s:e]).abs().max().item()
                    for s, e in itertools.pairwise(starts))
    if len(starts) < 3 or worst > 1e-4:
        sys.exit(f"packed attention check failed: {len(starts) - 1} segments, max logit difference {worst:.2e}")


def run_trl(work: Path, info: dict, a, python: str, variant: str) -> tuple[float, float]:
    from trl_env import run_trl_worker

    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [python, __file__, "--trl-worker", "--variant", variant, "--work", str(work), "--info", json.dumps(info),
           "--batch", str(a.batch), "--seq-len", str(a.seq_len), "--steps", str(a.steps), "--threads",
           str(a.threads), "--warmup", str(a.warmup)]
    out = run_trl_worker(cmd, env, f"trl ({variant})")
    return out["tokens_per_s"], out["first_loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(REPO / "runs" / "bench_sft"))
    p.add_argument("--batch", type=int, default=8, help="packed rows per optimizer step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trl-variants", default="stock,plain", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--trl-python", help="a python with trl 1.12.0 (default: benchmarks/.venv-trl, created if missing)")
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="stock", help=argparse.SUPPRESS)
    p.add_argument("--info", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.trl_worker:
        return trl_worker(a)
    variants = [v for v in a.trl_variants.split(",") if v]
    if not variants or any(v not in VARIANTS for v in variants):
        p.error(f"--trl-variants: choose from {', '.join(VARIANTS)}")
    if a.warmup >= a.steps:
        p.error("--warmup must be smaller than --steps")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    from trl_env import trl_python  # benchmarks/trl_env.py (run as a script: its folder is on sys.path)

    python = trl_python(a.trl_python)
    info = prepare(work, a)
    ours: list[float] = []
    theirs: dict[str, list[float]] = {v: [] for v in variants}
    losses: dict[str, float] = {}
    for k in range(a.repeats):  # alternate, so that a change in machine load hits every side
        tps, losses["ours"] = run_ours(work, info, a)
        ours.append(tps)
        line = f"[bench] repeat {k + 1}: ours {tps:.0f}"
        for v in variants:
            tps, losses[v] = run_trl(work, info, a, python, v)
            theirs[v].append(tps)
            line += f", trl-{v} {tps:.0f}"
        print(line + " tokens/s", flush=True)
    o = statistics.median(ours)
    mean_tokens = sum(info["tokens"]) / len(info["tokens"])
    print(f"\nSFT training, tiny preset, {a.batch} packed rows x {a.seq_len} per step "
          f"({mean_tokens:.0f} non-padding tokens on average), {a.threads} thread(s), "
          f"median of {a.repeats} repeats (steps {a.warmup + 1}..{a.steps}):")
    print(f"{'':28}{'tokens/s':>10}{'ours / it':>11}{'step-1 loss':>13}")
    print(f"{'ours (llama2 sft)':28}{o:>10.0f}{'':>11}{losses['ours']:>13.6f}")
    names = {"stock": "trl SFTTrainer (stock)", "nll": "trl SFTTrainer (nll)", "plain": "trl SFTTrainer (plain CE)"}
    for v in variants:
        t = statistics.median(theirs[v])
        print(f"{names[v]:28}{t:>10.0f}{o / t:>10.2f}x{losses[v]:>13.6f}")
    if any(not math.isclose(losses["ours"], losses[v], rel_tol=1e-5) for v in variants):
        print("warning: the first-step losses differ: the two sides do not train on the same thing", flush=True)


if __name__ == "__main__":
    main()
