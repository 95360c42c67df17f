"""One PPO iteration (Llama 2 §3.2.3): ours vs trl's PPOTrainer, same tiny model, batch and answer length.

    python benchmarks/ppo_step.py                        # batch 64, mini-batch 16, 64-token answers
    python benchmarks/ppo_step.py --repeats 5 --batch 32 --response-length 128

trl removed PPO in 1.13, so its side runs `trl==1.12.0`'s `trl.experimental.ppo` in a venv of its
own (benchmarks/.venv-trl, created on first use with the same torch build as ours, then trl), in a
subprocess of this same script (`--trl-worker`). Both sides get:
- the `tiny` preset model (dim 192, 4 layers, GQA 6/2 heads, 4,096 SentencePiece vocabulary),
  randomly initialised; the reference policy is a frozen copy; reward and value models share its
  trunk under one scalar head;
- the same prompts of the built-in world as token ids in the Llama 2 chat format;
- the no-grad passes (reward, reference, values) over the whole batch at once (trl's
  local_rollout_forward_batch_size, our forward_batch_size and reward_batch_size);
- temperature-1 sampling of `--response-length` tokens (a random model almost never samples EOS,
  so both sides generate full-length answers), β 0.01, clip 0.2, γ 1, λ 0.95, lr 1e-5, one PPO epoch;
- the same threads (`--threads`), one process each, alternating ours / trl `--repeats` times;
- the same OpenMP wait policy: OpenMP's default (idle threads spin a few ms, then sleep), which is
  what each gets alone on the cores; `--omp-wait-policy passive` gives both PASSIVE, the setting
  for processes that share cores (measurements before 2026-11-27 used it: 1.82-2.04x).

The split of an iteration: generation (sampling), scoring (reward model and the no-grad passes:
reference log-probs, values, and for us the old log-probs, which trl takes from generation's
logits), training (the PPO updates). Ours reads it from the recipe's own metrics (the same run a
user gets: `llama2 rlhf ppo`); trl's is measured around its `batch_generation` call, its first
training forward and the end of its step. The first `--warmup` iterations of each process are
not counted; the table shows medians over the remaining iterations of all repeats, and the last
line the ratio of each repeat (its two processes ran one after the other) and their median.
Difference in semantics (not in work): with per_device_train_batch_size = mini-batch and
gradient_accumulation_steps = batch / mini-batch, trl's `accelerator.accumulate` steps the
optimizer once per batch, we once per mini-batch (§3.2.3); both run the same forward/backward passes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHASES = ("generation", "scoring", "training", "total")


def prepare(work: Path, n_prompts: int, max_prompt_tokens: int) -> dict:
    """The shared assets: world prompts, tokenizer, policy (native + HF), reward/value head."""
    import torch

    from llama2.chat_format import ChatFormat
    from llama2.checkpoint import save_native
    from llama2.hf_checkpoint import save_hf
    from llama2.model import Transformer, preset
    from llama2.tokenizer import load_tokenizer, train_sentencepiece
    from llama2.formats import read_records, write_jsonl
    from llama2.world.generate import generate_world

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "world" / "prompts" / "train.jsonl").is_file():
        generate_world(work / "world", seed=0, size="tiny", quiet=True)
    tok_dir = work / "tokenizer"
    tok = load_tokenizer(tok_dir) if tok_dir.is_dir() else train_sentencepiece(
        [work / "world" / "corpus" / "pretrain.jsonl"], tok_dir, vocab_size=4096)
    args = preset("tiny", vocab_size=tok.vocab_size)
    policy = Transformer(args)
    policy.init_weights(generator=torch.Generator().manual_seed(0))
    save_native(work / "policy", policy, tokenizer=tok)
    save_hf(work / "policy_hf", args, policy.state_dict())
    # Reward model = value model init: the policy's trunk under a small random scalar head.
    head = torch.randn(1, args.dim, generator=torch.Generator().manual_seed(1)) / args.dim
    rm_args = preset("tiny", vocab_size=tok.vocab_size, head="scalar")
    rm_state = {**{k: v for k, v in policy.state_dict().items() if k != "output.weight"}, "output.weight": head}
    save_native(work / "reward", rm_state, rm_args, tokenizer=tok)
    torch.save(head, work / "head.pt")
    # The prompts both sides sample for: token ids in the Llama 2 chat format.
    fmt = ChatFormat(tok, "llama2")
    records = [r for r in read_records(work / "world" / "prompts" / "train.jsonl", "prompts")
               if len(fmt.prompt_ids(r["messages"])) <= max_prompt_tokens][:n_prompts]
    write_jsonl(work / "prompts.jsonl", records)
    ids = [fmt.prompt_ids(r["messages"]) for r in records]
    (work / "prompt_ids.json").write_text(json.dumps(ids))
    return {"vocab": tok.vocab_size, "prompts": len(ids), "mean_prompt_tokens": sum(map(len, ids)) / len(ids)}


def run_ours(work: Path, a, out: Path, env: dict) -> list[dict]:
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl is appended to: start clean
    iterations = a.warmup + a.iterations
    cmd = [sys.executable, "-m", "llama2.recipes.ppo", f"out_dir={out}", f"policy={work / 'policy'}",
           f"prompts=[{work / 'prompts.jsonl'}]", f"helpfulness_rm={work / 'reward'}", f"safety_rm={work / 'reward'}",
           f"batch_size={a.batch}", f"mini_batch_size={a.mini_batch}", f"micro_batch_size={a.mini_batch}",
           f"generation_batch_size={a.batch}", f"reward_batch_size={a.batch}", f"max_prompt_tokens={a.max_prompt_tokens}",
           f"forward_batch_size={a.batch}",  # the no-grad passes, as trl's local_rollout_forward_batch_size
           f"max_new_tokens={a.response_length}", f"iterations={iterations}", "eval_every=0", "ckpt_every=0",
           "kl_coef=0.01", "optim.lr=1e-5", "value_optim.lr=1e-5", "temperature=1.0", "device=cpu", "dtype=float32"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ours failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{"generation": m["time_generation"], "scoring": m["time_scoring"], "training": m["time_training"],
             "total": m["time_generation"] + m["time_scoring"] + m["time_training"],
             "response_len": m["response_len"]} for m in rows[a.warmup:]]


def run_trl(python: Path, work: Path, a, env: dict) -> list[dict]:
    from trl_env import run_trl_worker

    cmd = [str(python), str(Path(__file__).resolve()), "--trl-worker", "--work", str(work),
           "--batch", str(a.batch), "--mini-batch", str(a.mini_batch), "--response-length", str(a.response_length),
           "--iterations", str(a.iterations), "--warmup", str(a.warmup), "--threads", str(a.threads)]
    return run_trl_worker(cmd, env)[a.warmup:]


def trl_worker(a) -> None:
    """Runs in benchmarks/.venv-trl: trl 1.12.0's PPOTrainer, timed around its phases."""
    import torch
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl_env import stand_in_tokenizer

    torch.set_num_threads(a.threads)
    work = Path(a.work)
    ids = json.loads((work / "prompt_ids.json").read_text())
    hf_dir = str(work / "policy_hf")
    vocab = AutoModelForCausalLM.from_pretrained(hf_dir).config.vocab_size
    # trl only pads and reads the pad/EOS ids: a word-level vocabulary with our ids is enough
    # (<unk>=0 pads, as it never occurs in a prompt; <s>=1, </s>=2 as in our SentencePiece model).
    tokenizer = stand_in_tokenizer(vocab, pad_id=0, eos_id=2, bos_id=1, padding_side="left")
    head = torch.load(work / "head.pt")

    def scalar_model():
        m = AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=1, dtype=torch.float32)
        m.score.weight.data.copy_(head)
        m.config.pad_token_id = 0
        return m

    policy = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    iterations = a.warmup + a.iterations
    data = Dataset.from_dict({"input_ids": ids[: a.batch * iterations]})
    cfg = PPOConfig(output_dir=str(work / "trl_out"), per_device_train_batch_size=a.mini_batch,
                    gradient_accumulation_steps=a.batch // a.mini_batch, num_mini_batches=a.batch // a.mini_batch,
                    num_ppo_epochs=1, total_episodes=a.batch * iterations, local_rollout_forward_batch_size=a.batch,
                    response_length=a.response_length, temperature=1.0, kl_coef=0.01, cliprange=0.2,
                    cliprange_value=0.2, gamma=1.0, lam=0.95, learning_rate=1e-5, lr_scheduler_type="constant",
                    stop_token=None, missing_eos_penalty=None, num_sample_generations=0, report_to=[],
                    save_strategy="no", logging_steps=1, use_cpu=True, seed=0, disable_tqdm=True,
                    dataloader_num_workers=0)

    marks: list[dict] = []
    generate = ppo_module.batch_generation
    forward = ppo_module.forward

    def timed_generation(*args, **kw):
        t = time.perf_counter()
        out = generate(*args, **kw)
        marks.append({"start": t, "generated": time.perf_counter()})
        return out

    def timed_forward(model, *args, **kw):
        # the first forward of the policy+value wrapper in an update is where training starts
        if hasattr(model, "value_model") and "training" not in marks[-1]:
            marks[-1]["training"] = time.perf_counter()
        return forward(model, *args, **kw)

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks[-1]["end"] = time.perf_counter()

    ppo_module.batch_generation, ppo_module.forward = timed_generation, timed_forward
    trainer = PPOTrainer(args=cfg, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=scalar_model(),
                         value_model=scalar_model(), train_dataset=data, eval_dataset=data, callbacks=[StepEnd()])
    trainer.train()
    rows = [{"generation": m["generated"] - m["start"], "scoring": m["training"] - m["generated"],
             "training": m["end"] - m["training"], "total": m["end"] - m["start"],
             "response_len": float(a.response_length)} for m in marks]
    print(json.dumps(rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="prompts (= rollouts) per PPO iteration")
    p.add_argument("--mini-batch", type=int, default=16, help="rollouts per gradient step")
    p.add_argument("--response-length", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--iterations", type=int, default=2, help="timed iterations per process")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per process (first-call costs)")
    p.add_argument("--repeats", type=int, default=3, help="alternating ours/trl process pairs")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--omp-wait-policy", choices=["default", "passive"], default="default",
                   help="OpenMP wait policy of both sides (default: OpenMP's own, each side being alone on the cores)")
    p.add_argument("--work", default=str(REPO / "runs" / "bench_ppo_step"))
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.trl_worker:
        trl_worker(a)
        return 0

    work = Path(a.work)
    from trl_env import trl_python  # benchmarks/trl_env.py (run as a script: its folder is on sys.path)

    python = trl_python(probe="trl.experimental.ppo")
    info = prepare(work, a.batch * (a.warmup + a.iterations), a.max_prompt_tokens)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "LLAMA2_NO_PROGRESS": "1",
           "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    # Each side runs alone on the cores, as `llama2 rlhf ppo` or a trl script would: OpenMP's default
    # wait policy for both, unless --omp-wait-policy passive (what runs beside other jobs use).
    env.pop("OMP_WAIT_POLICY", None)
    if a.omp_wait_policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    print(f"[bench] tiny preset, vocab {info['vocab']}, batch {a.batch}, mini-batch {a.mini_batch}, "
          f"{a.response_length}-token answers, {info['mean_prompt_tokens']:.0f}-token prompts on average, "
          f"{a.threads} threads, OpenMP wait policy {a.omp_wait_policy}; "
          f"{a.repeats} x ({a.warmup} + {a.iterations}) iterations per side", flush=True)
    ours, trl, ratios = [], [], []
    for rep in range(a.repeats):  # alternate, so that a slow spell of a shared machine hits both sides
        mine, theirs = run_ours(work, a, work / f"ours-{rep}", env), run_trl(python, work, a, env)
        ours, trl = ours + mine, trl + theirs
        # the pair's ratio: both sides ran within the same minute (robust to the machine's slow drift)
        ratios.append(statistics.median(r["total"] for r in theirs) / statistics.median(r["total"] for r in mine))
        print(f"[bench] repeat {rep + 1}/{a.repeats}: ours {statistics.median(r['total'] for r in mine):.2f} s, "
              f"trl {statistics.median(r['total'] for r in theirs):.2f} s per iteration, ratio {ratios[-1]:.2f}x",
              flush=True)
    med = {side: {k: statistics.median(r[k] for r in rows) for k in PHASES + ("response_len",)}
           for side, rows in (("ours", ours), ("trl", trl))}
    print(f"\n{'phase':<12}{'ours (s)':>10}{'trl (s)':>10}{'trl / ours':>12}")
    for k in PHASES:
        print(f"{k:<12}{med['ours'][k]:>10.3f}{med['trl'][k]:>10.3f}{med['trl'][k] / med['ours'][k]:>11.2f}x")
    print(f"{'answer len':<12}{med['ours']['response_len']:>10.1f}{med['trl']['response_len']:>10.1f}")
    print(f"\ntotal, trl / ours per repeat: {' '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x")
    import torch

    result = {"settings": {**vars(a), **info}, "torch": torch.__version__, "median": med,
              "repeat_ratios": ratios, "iterations": {"ours": ours, "trl": trl}}
    (work / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n[bench] {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
