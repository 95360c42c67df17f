"""Offline contrastive preference pairs: gold answers against corrupted ones, no model needed.

The recipe's real preference batches come from sampling the latest model and annotating
(Llama 2 §3.2.1). These offline pairs let reward-model code be built and tested before any model
exists, and they have the property the calibration asked for: every pair differs in a quality a
small reward model can see (a wrong value, a cut-off or repeated answer, a wrong format, an
unnecessary refusal, compliance with a harmful request, rambling). The simulated annotators of
annotators.py pick and rate each pair from the graders' score gap seen through noise, so
"significantly better" pairs differ most and agree best with the noiseless grader.
"""
from __future__ import annotations

import random

from llama2.world import safety
from llama2.world.annotators import AnnotatorConfig, annotate_pair, annotator_pool
from llama2.world.corrupt import rephrase
from llama2.world.tasks import FAMILIES

SOURCE = "world:offline-gold-vs-corrupted"


def _helpful_candidates(rng: random.Random, record: dict) -> tuple[str, str]:
    """Two different answers to a helpfulness prompt: mostly good vs corrupted."""
    gold = record["reference"]["gold"]
    r = rng.random()
    if r < 0.15:  # two correct answers: the annotator can only be unsure
        return gold, rephrase(rng, record)
    good = gold if rng.random() < 0.7 else rephrase(rng, record)
    corrupt = FAMILIES[record["task"]].corrupt
    if r < 0.3:  # two flawed answers of different kinds
        k1, a = corrupt(rng, record)
        for _ in range(10):
            k2, b = corrupt(rng, record)
            if k2 != k1 and b != a:
                return a, b
    return good, corrupt(rng, record)[1]


def _safety_candidates(rng: random.Random, record: dict) -> tuple[str, str]:
    gold = safety.gold_answer(record, rng)
    if rng.random() < 0.2:
        a, b = safety.bad_answer(record, rng), safety.bad_answer(record, rng)
        if a != b:
            return a, b
    return gold, safety.bad_answer(record, rng)


def offline_preference_pairs(rng: random.Random, records: list[dict], n: int, split: str = "train",
                             batch: int = 0, id_prefix: str = "offline",
                             config: AnnotatorConfig | None = None) -> list[dict]:
    """`n` preference records from prompt `records` (helpfulness tasks of tasks.py, and the
    `adversarial`/`borderline` tasks of safety.py), annotated by a simulated annotator pool.
    Adversarial prompts give safety-axis pairs with the three-way safety label (pairs whose
    chosen answer is unsafe and the other safe are dropped, §3.2.1); borderline prompts give
    pairs on both axes, so the safety RM also learns that helping with a benign prompt is safe."""
    usable = [r for r in records if r["task"] in ("adversarial", "borderline")
              or (r["task"] in FAMILIES and FAMILIES[r["task"]].corrupt is not None)]
    if not usable:
        raise ValueError("no prompt records of a task that offline pairs can be made for")
    config = config or AnnotatorConfig()
    pool = annotator_pool(rng, config)
    out: list[dict] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 20 * n + 100:
            raise RuntimeError(f"could only make {len(out)} of {n} distinct pairs")
        rec = rng.choice(usable)
        task = rec["task"]
        a, b = _safety_candidates(rng, rec) if task in ("adversarial", "borderline") else _helpful_candidates(rng, rec)
        if not a.strip() or not b.strip() or a.strip() == b.strip():
            continue
        axis = "safety" if task == "adversarial" or (task == "borderline" and rng.random() < 0.5) else "helpfulness"
        j = annotate_pair(rec, a, b, axis, rng, config, rng.choice(pool))
        if j.dropped:
            continue
        out.append({
            "id": f"{id_prefix}-{split}-{len(out):06d}", "messages": rec["messages"], "chosen": j.chosen,
            "rejected": j.rejected, "rating": j.rating, "axis": axis, "safety_label": j.safety_label,
            "source": SOURCE, "batch": batch, "split": split, "task": task,
        })
    return out
