"""`llama2 world generate`: write the built-in world's data files.

  OUT/world.json                   seed, size, counts and the universe's entities with their split
  OUT/manifest.json                every file: kind, records, bytes, sha256, what it is for
  OUT/corpus/pretrain.jsonl        pretraining text (corpus.py)
  OUT/sft/train.jsonl, test.jsonl  gold demonstrations: helpfulness tasks, safe answers to
                                   adversarial prompts, helpful answers to borderline prompts
  OUT/prompts/train.jsonl          RLHF prompts (rejection sampling, PPO, preference batches);
                                   `batch` says which weekly batch a prompt belongs to (§3.2.1)
  OUT/prompts/test_batch{k}.jsonl  the held-out test prompts of batch k
  OUT/prompts/eval.jsonl           evaluation prompts: entities and instances never trained on
  OUT/prompts/adversarial_multi_turn_eval.jsonl  escalating three-turn attacks (eval templates;
                                   `user_turns`), about two per harmful request (§4.4, Figure 17)
  OUT/preferences/offline_{train,test}.jsonl  gold-vs-corrupted pairs (pairs.py), for testing
                                   reward-model code before any model exists
  OUT/gatt/train.jsonl, eval.jsonl multi-turn dialogs under a system instruction (gatt.py, §3.3):
                                   the instruction's user turns for GAtt sampling, gold answers
                                   that keep it, and (eval) the turns to check it on
The same seed and size give byte-identical files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

from tqdm import tqdm

from llama2 import progress_bars
from llama2.formats import write_jsonl
from llama2.world import corpus, gatt, safety
from llama2.world.pairs import offline_preference_pairs
from llama2.world.safety_data import HARMS
from llama2.world.tasks import FAMILIES, HELPFULNESS_TASKS, Example
from llama2.world.universe import SIZES, Universe, build_universe

# Record counts per world size. tiny: SFT of a ~3M model for a couple of CPU minutes; four weekly
# preference batches of 1,000 prompts (+250 held out each); >= 1,000 evaluation prompts.
PLAN = {
    "tiny": {"sft_train": 4000, "sft_test": 400, "batches": 4, "batch_prompts": 1000, "batch_test": 250,
             "eval": 1200, "offline_train": 3000, "offline_test": 600, "gatt_train": 600, "gatt_eval": 100},
    "small": {"sft_train": 12000, "sft_test": 1000, "batches": 6, "batch_prompts": 2000, "batch_test": 500,
              "eval": 2000, "offline_train": 10000, "offline_test": 1000, "gatt_train": 2000, "gatt_eval": 200},
    "medium": {"sft_train": 30000, "sft_test": 2000, "batches": 10, "batch_prompts": 3000, "batch_test": 1000,
               "eval": 3000, "offline_train": 20000, "offline_test": 2000, "gatt_train": 5000, "gatt_eval": 300},
}
# GAtt dialog lengths in turns: short in training (the tiny model's context is 512 tokens),
# longer in evaluation, where the question is whether the instruction still holds late.
GATT_TURNS = {"train": (2, 4), "eval": (3, 6)}
# No string tasks: a language constraint rewrites their answers ("apple" in capitals is wrong).
GATT_FAMILIES = ("fact", "fact", "arithmetic", "list", "units", "counting")
# Share of safety prompts in SFT data and prompt sets. Borderline prompts are benign: without
# them in SFT a tiny model refuses anything that sounds dangerous (calibration).
ADVERSARIAL_SHARE = 0.12
BORDERLINE_SHARE = 0.10
# A few SFT dialogs open with a system message, so the chat format's system slot is trained.
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a helpful, honest and careful assistant.",
                  "Answer briefly and correctly.", "You are a friendly assistant. Keep answers short.")
SYSTEM_SHARE = 0.08
# Escalating multi-turn attacks per harmful request in the evaluation file (§4.4).
MULTI_TURN_PER_HARM = 2


def _rng(seed: int, part: str) -> random.Random:
    """An independent stream per output, so that changing one file never changes another."""
    return random.Random(f"world:{seed}:{part}")


def _prompt_record(ex: Example, split: str, batch: int | None) -> dict:
    return {"id": "", "messages": ex.messages, "split": split, "batch": batch, "is_safety": False,
            "risk_category": None, "attack_vector": None, "task": ex.task, "reference": ex.reference}


def _helpful_examples(rng: random.Random, u: Universe, split: str, n: int, seen: set) -> list[Example]:
    """n examples drawn by family weight; exact repeats of a prompt are avoided where possible."""
    names = list(HELPFULNESS_TASKS)
    weights = [FAMILIES[f].weight for f in names]
    out = []
    while len(out) < n:
        fam = rng.choices(names, weights)[0]
        for _ in range(20):
            ex = FAMILIES[fam].generate(rng, u, split)
            text = json.dumps(ex.messages)
            if text not in seen:
                break
        seen.add(text)
        out.append(ex)
    return out


def prompt_set(rng: random.Random, u: Universe, split: str, n: int, batch: int | None, seen: set) -> list[dict]:
    """n prompt records of `split`: helpfulness tasks, adversarial and borderline prompts, shuffled."""
    n_adv, n_border = round(n * ADVERSARIAL_SHARE), round(n * BORDERLINE_SHARE)
    recs = [_prompt_record(ex, split, batch) for ex in _helpful_examples(rng, u, split, n - n_adv - n_border, seen)]
    recs += safety.adversarial_prompts(rng, n_adv, split, batch=batch)
    recs += safety.borderline_prompts(rng, n_border, split, batch=batch)
    rng.shuffle(recs)
    return recs


def _number(records: list[dict], prefix: str) -> list[dict]:
    for i, r in enumerate(records):
        r["id"] = f"{prefix}-{i:06d}"
    return records


def sft_set(rng: random.Random, u: Universe, split: str, n: int) -> list[dict]:
    """n gold demonstrations (§3.1) of `split`, in the SFT dialog format."""
    out = []
    for rec in prompt_set(rng, u, split, n, None, set()):
        if rec["task"] in FAMILIES:
            answer = rec["reference"]["gold"]
        else:
            answer = safety.gold_answer(rec, rng)
        msgs = list(rec["messages"])
        if rng.random() < SYSTEM_SHARE:
            msgs = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + msgs
        out.append({"id": "", "messages": msgs + [{"role": "assistant", "content": answer}],
                    "source": "world:gold", "split": split, "task": rec["task"]})
    return out


def gatt_set(rng: random.Random, u: Universe, split: str, n: int) -> list[dict]:
    """n GAtt dialogs (§3.3): a random instruction (language, figure, hobby; short form half the
    time) over several single-turn questions of `split`, every answer rewritten to keep it."""
    lo, hi = GATT_TURNS[split]
    out = []
    for i in range(n):
        turns, asked, n_turns = [], set(), rng.randint(lo, hi)
        while len(turns) < n_turns:
            ex = FAMILIES[rng.choice(GATT_FAMILIES)].generate(rng, u, split)
            if ex.messages[-1]["content"] not in asked:  # no question twice in one dialog
                asked.add(ex.messages[-1]["content"])
                turns.append((ex.messages[-1]["content"], ex.answer))
        out.append(gatt.gold_dialog(rng, turns, pid=f"gatt-{split}-{i:06d}", split=split))
    return out


def _file_info(path: Path, kind: str, n: int, about: str, root: Path) -> dict:
    data = path.read_bytes()
    return {"path": str(path.relative_to(root)), "kind": kind, "records": n, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "about": about}


def generate_world(out, seed: int = 0, size: str = "tiny", quiet: bool = False,
                   corpus_chars: int | None = None) -> dict:
    """Write the world for (seed, size) under `out`; returns the manifest. `corpus_chars`
    overrides the size's corpus length (tests use a short corpus)."""
    if size not in PLAN:
        raise ValueError(f"unknown world size {size!r} (choose from {', '.join(SIZES)})")
    out = Path(out)
    plan = PLAN[size]
    say = (lambda *a: None) if quiet else (lambda msg: print(f"world: {msg}", file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    files: list[dict] = []

    def write(rel: str, kind: str, records: list[dict], about: str) -> None:
        path = out / rel
        n = write_jsonl(path, records)
        files.append(_file_info(path, kind, n, about, out))
        say(f"{rel}: {n} records ({time.perf_counter() - t0:.1f}s)")

    u = build_universe(seed, size)
    say(f"universe seed={seed} size={size}: {len(u.people)} people, {len(u.places)} places")

    # -- pretraining corpus (streamed: the medium corpus is ~100 MB)
    n_chars = corpus.CORPUS_CHARS[size] if corpus_chars is None else corpus_chars
    bar = None
    if not quiet and progress_bars():
        bar = tqdm(total=n_chars, unit="char", unit_scale=True, desc="world: corpus", file=sys.stderr)
    path = out / "corpus" / "pretrain.jsonl"
    n_docs = write_jsonl(path, corpus.documents(u, seed, n_chars, progress=bar.update if bar else None))
    if bar:
        bar.close()
    files.append(_file_info(path, "pretrain", n_docs, "pretraining text: facts, Q/A, stories, dialogs, "
                            "worked examples, safety and borderline text", out))
    corpus_chars = sum(len(json.loads(line)["text"]) for line in path.open(encoding="utf-8"))
    say(f"corpus/pretrain.jsonl: {n_docs} documents, {corpus_chars:,} characters ({time.perf_counter() - t0:.1f}s)")

    # -- supervised fine-tuning data
    write("sft/train.jsonl", "sft", _number(sft_set(_rng(seed, "sft-train"), u, "train", plan["sft_train"]), "sft-train"),
          "gold demonstrations for SFT")
    write("sft/test.jsonl", "sft", _number(sft_set(_rng(seed, "sft-test"), u, "test", plan["sft_test"]), "sft-test"),
          "held-out demonstrations (test entities and instances) for SFT's held-out loss")

    # -- prompts: weekly batches for RLHF, their held-out test sets, and the evaluation split
    rng = _rng(seed, "prompts")
    seen: set = set()
    train = []
    for b in range(1, plan["batches"] + 1):
        train += prompt_set(rng, u, "train", plan["batch_prompts"], b, seen)
    write("prompts/train.jsonl", "prompts", _number(train, "prompt-train"),
          "RLHF prompts; `batch` is the weekly preference batch (rejection sampling and PPO use all)")
    test_seen: set = set()
    for b in range(1, plan["batches"] + 1):
        recs = _number(prompt_set(rng, u, "test", plan["batch_test"], b, test_seen), f"prompt-test{b}")
        write(f"prompts/test_batch{b}.jsonl", "prompts", recs, f"held-out test prompts of batch {b}")
    eval_recs = _number(prompt_set(_rng(seed, "eval"), u, "eval", plan["eval"], None, set()), "prompt-eval")
    write("prompts/eval.jsonl", "prompts", eval_recs,
          "evaluation prompts: held-out people, places and task instances, never used in training")
    write("prompts/adversarial_multi_turn_eval.jsonl", "prompts",
          safety.multi_turn_prompts(_rng(seed, "adversarial-multi-turn-eval"), MULTI_TURN_PER_HARM * len(HARMS),
                                    "eval"),
          "escalating multi-turn attacks (innocuous question, framing, request): `user_turns`, eval only")

    # -- offline contrastive preference pairs from gold vs corrupted answers
    test_prompts = [r for b in range(1, plan["batches"] + 1)
                    for r in map(json.loads, (out / f"prompts/test_batch{b}.jsonl").open(encoding="utf-8"))]
    write("preferences/offline_train.jsonl", "preferences",
          offline_preference_pairs(_rng(seed, "offline-train"), train, plan["offline_train"], "train"),
          "gold-vs-corrupted preference pairs from train prompts (no model needed)")
    write("preferences/offline_test.jsonl", "preferences",
          offline_preference_pairs(_rng(seed, "offline-test"), test_prompts, plan["offline_test"], "test"),
          "gold-vs-corrupted preference pairs from test prompts")

    # -- Ghost Attention dialogs
    write("gatt/train.jsonl", "sft", gatt_set(_rng(seed, "gatt-train"), u, "train", plan["gatt_train"]),
          "GAtt dialogs: system instruction, user turns, answers that keep it (sampling seeds and SFT)")
    write("gatt/eval.jsonl", "sft", gatt_set(_rng(seed, "gatt-eval"), u, "eval", plan["gatt_eval"]),
          "GAtt evaluation dialogs (eval instances): does each later answer keep the instruction?")

    world = {"seed": seed, "size": size, "counts": u.counts() | {"corpus_documents": n_docs,
                                                                 "corpus_characters": corpus_chars},
             "universe": u.to_dict()}
    (out / "world.json").write_text(json.dumps(world, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    manifest = {
        "name": "llama2 built-in world", "seed": seed, "size": size,
        "command": f"llama2 world generate --out DIR --seed {seed} --size {size}",
        "formats": "see docs/data.md and docs/world.md; check any file with `llama2 data validate FILE`",
        "splits": "train: SFT and RLHF; test: SFT held-out loss and per-batch reward-model test sets; "
                  "eval: final evaluation only (its people, places and instances never appear in "
                  "train or test data; their facts are in the corpus)",
        "files": files + [_file_info(out / "world.json", "world", 1, "seed, size, counts and the universe", out)],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    say(f"done in {time.perf_counter() - t0:.1f}s: {out}")
    return manifest


def world_cli(argv: list[str]) -> int:
    """`llama2 world generate --out DIR --seed S [--size tiny|small|medium]`."""
    ap = argparse.ArgumentParser(prog="llama2 world", description="The built-in world (data, prompts, graders).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write the world's data files")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--size", choices=SIZES, default="tiny")
    g.add_argument("--corpus-chars", type=int, default=None,
                   help="characters of pretraining text (default: by size, tiny = 6M)")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    args = ap.parse_args(argv)
    generate_world(args.out, args.seed, args.size, args.quiet, args.corpus_chars)
    return 0
