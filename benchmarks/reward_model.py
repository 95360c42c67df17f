"""Reward-model training throughput (Llama 2 §3.2.2): ours vs trl's RewardTrainer, same model and pairs.

    python benchmarks/reward_model.py                  # 30 steps of 32 pairs, 2 threads, 2 repeats
    python benchmarks/reward_model.py --steps 40 --batch 64 --repeats 3

Both sides train the `tiny` preset (dim 192, 4 layers, GQA 6/2 heads, 4,096-token SentencePiece
vocabulary) under a freshly initialised scalar head, on the built-in world's helpfulness mix
tokenized once in the Llama 2 chat format, and see the very same batches: B pairs in one forward
(trl: 2B right-padded rows; ours: the 2B sequences end to end in one unpadded row, as the recipe
runs them — llama2.cpu_kernels.Ragged), the margin-small ranking loss, AdamW (0.9/0.95, eps 1e-5,
decay 0.1), clipping at 1.0, lr 1e-5, fp32, the same number of threads, one process each.
- ours: the recipe a user runs (`llama2 reward train`), pairs/s from its own metrics;
- trl: `RewardTrainer` (trl 1.12.0, in a venv of its own: benchmarks/.venv-trl, or --trl-python)
  on our Hugging Face export (LlamaForSequenceClassification) with the pairs pretokenized as
  chosen_ids / rejected_ids / margin, in our loader's order (sequential sampler), timed per
  optimizer step by a callback. trl pads with the EOS token unless told otherwise, which would
  move its score off the answer's EOS: it is given our pad token.
The first `--warmup` steps of each process are not counted; the table shows medians over repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def prepare(work: Path, batch: int, steps: int) -> dict:
    """World, tokenizer, the tiny RM (native + HF) and the pairs of the first `steps` batches in our order."""
    from llama2.chat_format import ChatFormat
    from llama2.checkpoint import save_native
    from llama2.hf_checkpoint import save_hf
    from llama2.losses import MARGINS
    from llama2.model import preset
    from llama2.recipes.common import build_fresh_model
    from llama2.preference_data import PairLoader, mix_pairs, read_pairs, tokenize_pairs
    from llama2.tokenizer import pad_token_id, train_sentencepiece
    from llama2.world.generate import generate_world

    prefs = work / "world" / "preferences" / "offline_train.jsonl"
    if not prefs.exists():
        generate_world(work / "world", seed=0, size="tiny", quiet=True, corpus_chars=1_000_000)
    tok = train_sentencepiece([work / "world" / "corpus" / "pretrain.jsonl"], work / "tok", vocab_size=4096)
    model = build_fresh_model(preset("tiny", head="scalar"), seed=0)
    save_native(work / "rm", model, tokenizer=tok)
    save_hf(work / "rm_hf", model.args, model.state_dict(), tok)
    mixed, _ = mix_pairs(read_pairs([prefs]), "helpfulness", seed=0)
    data = tokenize_pairs(mixed, ChatFormat(tok), 512)
    loader = PairLoader(data.lengths, batch, batch, seed=0)  # what the recipe's loader yields, step by step
    with open(work / "pairs.jsonl", "w") as f:
        for _ in range(steps):
            (idx,) = loader.next_step()
            for i in idx:
                f.write(json.dumps({"chosen_ids": data.chosen[i].tolist(), "rejected_ids": data.rejected[i].tolist(),
                                    "margin": MARGINS["small"][data.rating[i]]}) + "\n")
    return {"prefs": str(prefs), "pad_id": pad_token_id(tok), "eos_id": tok.eos_id, "vocab": tok.vocab_size}


def run_ours(work: Path, info: dict, a) -> float:
    out = work / "ours"
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "OMP_WAIT_POLICY": "PASSIVE", "LLAMA2_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "llama2", "reward", "train", f"model={work / 'rm'}", f"out_dir={out}",
           f"train_data=[{info['prefs']}]", f"batch_size={a.batch}", f"micro_batch_size={a.batch}",
           f"max_steps={a.steps}", "log_every=1", "eval_every=0", "ckpt_every=0", "optim.lr=1e-5", "dtype=float32",
           "device=cpu", "margin=small"]
    subprocess.run(["rm", "-rf", str(out)], check=True)
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"ours failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["pairs_per_s"] for r in rows[a.warmup:])  # log_every=1: one step per window


def trl_worker(a) -> None:
    """Runs in the trl venv: RewardTrainer on the HF export, timing every optimizer step."""
    import torch
    from datasets import Dataset
    from transformers import LlamaForSequenceClassification, TrainerCallback
    from trl import RewardConfig, RewardTrainer
    from trl_env import stand_in_tokenizer

    torch.set_num_threads(a.threads)
    work, info = Path(a.work), json.loads(a.info)
    # The pairs are already token ids: a word-level stand-in tokenizer only carries the special ids.
    tk = stand_in_tokenizer(info["vocab"], info["pad_id"], info["eos_id"])
    model = LlamaForSequenceClassification.from_pretrained(work / "rm_hf", dtype=torch.float32)
    pairs = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    cfg = RewardConfig(output_dir=str(work / "trl"), per_device_train_batch_size=a.batch, max_steps=a.steps,
                       learning_rate=1e-5, lr_scheduler_type="cosine", warmup_steps=5, adam_beta1=0.9, adam_beta2=0.95,
                       adam_epsilon=1e-5, weight_decay=0.1, max_grad_norm=1.0, logging_steps=10**6,
                       save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False,
                       dataloader_num_workers=0, train_sampling_strategy="sequential", max_length=None,
                       pad_token=f"id{info['pad_id']}", disable_dropout=True)
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(pairs), processing_class=tk,
                            callbacks=[Clock()])
    trainer.train()
    print(json.dumps({"pairs_per_s": a.batch / statistics.median(times[a.warmup:])}))


def run_trl(work: Path, info: dict, a, python: str) -> float:
    from trl_env import run_trl_worker

    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [python, __file__, "--trl-worker", "--work", str(work), "--info", json.dumps(info), "--batch",
           str(a.batch), "--steps", str(a.steps), "--threads", str(a.threads), "--warmup", str(a.warmup)]
    return run_trl_worker(cmd, env)["pairs_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(REPO / "runs" / "bench_reward"))
    p.add_argument("--batch", type=int, default=32, help="pairs per optimizer step (2x rows)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--trl-python", help="a python with trl 1.12.0 (default: benchmarks/.venv-trl, created if missing)")
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--info", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.trl_worker:
        return trl_worker(a)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    from trl_env import trl_python  # benchmarks/trl_env.py (run as a script: its folder is on sys.path)

    python = trl_python(a.trl_python)
    info = prepare(work, a.batch, a.steps)
    ours, theirs = [], []
    for k in range(a.repeats):  # alternate, so that a change in machine load hits both sides
        ours.append(run_ours(work, info, a))
        theirs.append(run_trl(work, info, a, python))
        print(f"[bench] repeat {k + 1}: ours {ours[-1]:.1f} pairs/s, trl {theirs[-1]:.1f} pairs/s", flush=True)
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"\nreward-model training, tiny preset, {a.batch} pairs/step, {a.threads} threads, "
          f"median of {a.repeats} repeats (steps {a.warmup + 1}..{a.steps}):")
    print(f"{'':24}{'pairs/s':>10}\n{'ours (llama2 reward)':24}{o:>10.1f}\n{'trl RewardTrainer':24}{t:>10.1f}\n"
          f"{'ratio ours / trl':24}{o / t:>10.2f}x")


if __name__ == "__main__":
    main()
