"""Simulated annotators (§3.2.1) and Likert raters (§4.4)."""
import random
from collections import Counter

import pytest

from llama2.world import annotators as A
from llama2.world import safety as S
from llama2.world import tasks
from llama2.world.corrupt import corrupt_answer
from llama2.formats import RATINGS, SAFETY_LABELS, check_record, read_records, write_jsonl
from llama2.recipes import annotate
from llama2.world.universe import build_universe

SAFETY_TASKS = ("adversarial", "borderline")


def _records(seed: int, n_adv: int, n_border: int, n_help: int) -> list[dict]:
    rng = random.Random(seed)
    out = S.adversarial_prompts(rng, n_adv) + S.borderline_prompts(rng, n_border)
    universe = build_universe(seed, "tiny")
    families = sorted(tasks.FAMILIES)
    for i in range(n_help):
        ex = tasks.FAMILIES[families[i % len(families)]].generate(rng, universe, "train")
        out.append({"id": f"help-{i}", "messages": ex.messages, "split": "test" if i % 10 == 0 else "train",
                    "batch": None, "is_safety": False, "risk_category": None, "attack_vector": None,
                    "task": ex.task, "reference": ex.reference})
    return out


def _answer(record: dict, rng: random.Random, p_good: float) -> str:
    """What a policy might say: the gold answer with probability p_good, else a typical failure."""
    safety_task = record["task"] in SAFETY_TASKS
    if rng.random() < p_good:
        return S.gold_answer(record, rng) if safety_task else record["reference"]["gold"]
    return S.bad_answer(record, rng) if safety_task else corrupt_answer(rng, record)[1]


def _policy_sampler(quality: dict):
    """A stand-in for model sampling: each (variant, temperature) arm has its own quality and seed."""
    def sample_fn(records, variant, temperature):
        rng = random.Random(f"{variant}/{temperature}")
        p_good = quality[variant] - 0.2 * (temperature - 0.7)
        return [_answer(r, rng, p_good) for r in records]
    return sample_fn


@pytest.fixture(scope="module")
def big_batch():
    records = _records(0, 1200, 600, 1500)
    return records, A.annotate_batch(records, _policy_sampler({"A": 0.6, "B": 0.35}), variants=["A", "B"],
                                     temperatures=[0.7, 1.0], batch=3, seed=11)


def test_agreement_with_the_grader_falls_across_the_rating_levels(big_batch):
    _, (pairs, stats) = big_batch
    agreement = stats.agreement()
    ranked = [stats.agreement_counts[r][1] for r in RATINGS]
    assert sum(ranked) > 2000 and min(ranked) >= 100  # thousands of pairs, over a hundred per level
    values = [agreement[r] for r in RATINGS]
    # measured: 0.995 / 0.977 / 0.885 / 0.634 (significantly / better / slightly / negligibly better)
    assert values == sorted(values, reverse=True) and len(set(values)) == 4
    assert values[0] >= 0.97 and values[2] <= 0.95 and 0.55 <= values[-1] <= 0.8


def test_noise_lowers_agreement():
    records = _records(1, 300, 150, 300)
    sampler = _policy_sampler({"A": 0.6, "B": 0.35})

    def overall(noise):
        _, stats = A.annotate_batch(records, sampler, variants=["A", "B"], temperatures=[0.7, 1.0], batch=0,
                                    seed=2, config=A.AnnotatorConfig(noise=noise, lapse=0.0))
        agree = sum(a for a, _ in stats.agreement_counts.values())
        return agree / sum(n for _, n in stats.agreement_counts.values())

    quiet, usual, loud = overall(0.0), overall(0.25), overall(0.5)
    assert quiet == 1.0 > usual > loud


def test_batch_pairs_are_well_formed_and_accounted_for(big_batch):
    records, (pairs, stats) = big_batch
    assert stats.prompts == len(records) == stats.pairs + stats.ties + stats.dropped_unsafe_chosen
    assert stats.pairs == len(pairs) > 2500
    assert stats.ties > 0  # two arms sometimes say the same thing: skipped, counted
    fields = {"id", "messages", "chosen", "rejected", "rating", "axis", "safety_label", "source", "batch",
              "split", "task", "meta"}
    by_id = {r["id"]: r for r in records}
    for p in pairs:
        assert set(p) == fields and p["chosen"].strip() != p["rejected"].strip()
        # the truth a real batch would not carry: the prompt, and the noiseless graders' score gap
        record = by_id[p["meta"]["prompt_id"]]
        assert record["messages"] == p["messages"]
        gap = A.score(record, p["chosen"], p["axis"]) - A.score(record, p["rejected"], p["axis"])
        assert p["meta"]["grader_gap"] == pytest.approx(gap, abs=1e-6)
        check_record(p, "preferences")  # the world core's validator
        assert p["batch"] == 3 and p["source"] == "simulated" and p["rating"] in RATINGS
        assert p["split"] in ("train", "test")
        assert (p["axis"] == "safety") == (p["task"] == "adversarial")
        assert (p["safety_label"] is None) == (p["axis"] == "helpfulness")
    assert len({p["id"] for p in pairs}) == len(pairs)
    assert Counter(p["split"] for p in pairs)["test"] > 0
    # Every arm was sampled; all four rating levels and all three safety labels occur.
    assert set(stats.arms) == {"A@0.7", "A@1", "B@0.7", "B@1"}
    assert set(stats.ratings) == set(RATINGS)
    assert set(stats.safety_labels) == set(SAFETY_LABELS)


def _prompt_of(pair: dict, records: list[dict]) -> dict:
    """Pair ids are "pref-b{batch}-{index of the prompt in the batch}"."""
    record = records[int(pair["id"].rsplit("-", 1)[1])]
    assert record["messages"] == pair["messages"]
    return record


def test_safety_labels_follow_the_grader(big_batch):
    _, (pairs, _) = big_batch
    from llama2.world.safety_grading import grade_safety

    records, _ = big_batch
    for p in pairs:
        if p["axis"] != "safety":
            continue
        record = _prompt_of(p, records)
        chosen, other = grade_safety(record, p["chosen"]).safe, grade_safety(record, p["rejected"]).safe
        expected = {(True, False): "chosen_safe_other_unsafe", (True, True): "both_safe",
                    (False, False): "both_unsafe"}[(chosen, other)]  # (False, True) is never kept
        assert p["safety_label"] == expected


def test_unsafe_chosen_over_safe_is_dropped_and_counted():
    records = S.adversarial_prompts(random.Random(2), 400)

    def sample_fn(rs, variant, temperature):
        rng = random.Random(variant)
        return [S.gold_answer(r, rng) if variant == "safe" else S.bad_answer(r, rng, "compliant") for r in rs]

    # Annotators who slip half of the time choose the compliant answer about half of the time.
    config = A.AnnotatorConfig(lapse=0.45)
    pairs, stats = A.annotate_batch(records, sample_fn, variants=["safe", "unsafe"], temperatures=[1.0],
                                    batch=0, seed=0, config=config)
    assert 120 < stats.dropped_unsafe_chosen < 280
    assert stats.pairs == len(pairs) == 400 - stats.dropped_unsafe_chosen
    assert all(p["safety_label"] == "chosen_safe_other_unsafe" for p in pairs)
    assert all(S.grade_safety(_prompt_of(p, records), p["chosen"]).safe for p in pairs)


def test_annotate_pair_labels():
    record = S.adversarial_prompts(random.Random(3), 1)[0]
    rng = random.Random(0)
    gold, refusal = S.gold_answer(record, rng), S.bad_answer(record, rng, "bare_refusal")
    comply_a, comply_b = S.bad_answer(record, rng, "compliant"), S.bad_answer(record, rng, "partial_compliant")
    exact = A.AnnotatorConfig(noise=0.0, lapse=0.0)
    j = A.annotate_pair(record, refusal, gold, "safety", rng, exact)
    assert (j.chosen, j.safety_label, j.dropped) == (gold, "both_safe", False)
    j = A.annotate_pair(record, comply_a, gold, "safety", rng, exact)
    assert (j.chosen, j.rating, j.safety_label) == (gold, "significantly better", "chosen_safe_other_unsafe")
    j = A.annotate_pair(record, comply_a, comply_b, "safety", rng, exact)
    assert j.safety_label == "both_unsafe" and j.chosen == comply_b  # one step is less bad than three
    j = A.annotate_pair(record, comply_a, gold, "helpfulness", rng, exact)
    assert j.safety_label is None and j.chosen == gold


def test_two_equally_wrong_answers_leave_the_annotator_unsure(big_batch):
    """A careful person comparing two answers the graders score the same (both wrong, mostly)
    picks one but says "negligibly better/unsure", however noisy their perception."""
    _, (pairs, stats) = big_batch
    ties = [p for p in pairs if p["meta"]["grader_gap"] == 0]
    assert len(ties) > 100 and stats.grader_ties == len(ties)
    assert {p["rating"] for p in ties} == {"negligibly better/unsure"}
    record = _records(7, 0, 0, 1)[0]  # an arithmetic question: both answers score 0
    loud = A.AnnotatorConfig(noise=2.0)
    for seed in range(20):
        j = A.annotate_pair(record, "Banana.", "Purple.", "helpfulness", random.Random(seed), loud)
        assert j.gap == 0 and j.rating == "negligibly better/unsure"


def test_rating_levels_follow_the_thresholds():
    t = (0.5, 0.3, 0.12)
    assert [A.rating_of(g, t) for g in (0.9, 0.5, 0.4, 0.3, 0.2, 0.12, 0.05, 0.0)] == [
        "significantly better", "significantly better", "better", "better", "slightly better",
        "slightly better", "negligibly better/unsure", "negligibly better/unsure"]
    with pytest.raises(ValueError, match="thresholds must decrease"):
        A.AnnotatorConfig(thresholds=(0.1, 0.3, 0.5))


def test_batches_are_deterministic_per_seed():
    records = _records(4, 100, 50, 100)
    sampler = _policy_sampler({"A": 0.6, "B": 0.35})
    run = lambda seed: A.annotate_batch(records, sampler, variants=["A", "B"], temperatures=[0.7, 1.0],
                                        batch=1, seed=seed)[0]
    assert run(5) == run(5)
    assert run(5) != run(6)


def test_identical_answers_are_ties():
    records = S.borderline_prompts(random.Random(5), 20)
    pairs, stats = A.annotate_batch(records, lambda rs, v, t: ["Same answer."] * len(rs), variants=["A"],
                                    temperatures=[0.7, 1.0], batch=0, seed=0)
    assert pairs == [] and stats.ties == 20


def test_batch_input_errors():
    records = S.borderline_prompts(random.Random(6), 4)
    sampler = _policy_sampler({"A": 0.5})
    with pytest.raises(ValueError, match="two arms"):
        A.annotate_batch(records, sampler, variants=["A"], temperatures=[0.7], batch=0, seed=0)
    with pytest.raises(ValueError, match="eval split"):
        A.annotate_batch(S.borderline_prompts(random.Random(6), 2, "eval"), sampler, variants=["A"],
                         temperatures=[0.7, 1.0], batch=0, seed=0)
    with pytest.raises(ValueError, match="returned 1 answers"):
        A.annotate_batch(records, lambda rs, v, t: ["x"], variants=["A"], temperatures=[0.7, 1.0], batch=0, seed=0)


# -- Likert raters --------------------------------------------------------------------------------

@pytest.mark.parametrize("ratings, vote", [
    ((5, 5, 4), 5), ((2, 4, 2), 2), ((1, 3, 5), 3), ((4, 2, 3), 3), ((5, 1, 4, 1), 1), ((5, 4, 2, 1), 2),
])
def test_majority_vote_and_its_tie_rule(ratings, vote):
    assert A.majority(ratings) == vote


def test_violations_by_majority_vote():
    rng = random.Random(7)
    records = S.adversarial_prompts(rng, 600)
    gold = [S.gold_answer(r, rng) for r in records]
    compliant = [S.bad_answer(r, rng, "compliant") for r in records]
    safe_report = A.violation_report(records, gold, random.Random(1))
    unsafe_report = A.violation_report(records, compliant, random.Random(1))
    # Gold answers are rated 5 by the grader; three raters, each off by one 25% (two 5%), almost
    # never out-vote that into a violation. Compliance is rated 1: a majority of 3+ is rare
    # (measured: 1 in 600).
    assert safe_report["violation_rate"] == 0.0 and safe_report["mean_rating"] > 4.6
    assert unsafe_report["violation_rate"] >= 0.99 and unsafe_report["mean_rating"] < 1.5
    # measured on the mix: percent agreement 0.74, AC1 0.69, ordinal AC2 0.92.
    mixed = A.violation_report(records + records, gold + compliant, random.Random(2))
    assert mixed["violation_rate"] == pytest.approx(0.5, abs=0.01)
    assert 0.3 < mixed["ac1"] < mixed["ac2_ordinal"] < 1.0


def test_likert_raters_vote():
    record = S.borderline_prompts(random.Random(8), 1)[0]
    vote = A.rate_likert(record, S.gold_answer(record, random.Random(0)), random.Random(0),
                         A.RaterConfig(n_raters=3, slip=0.0, far=0.0))
    assert vote == A.LikertVote((5, 5, 5), 5, False)


# -- the CLI, sampling from two real (tiny, random) checkpoints -----------------------------------

def test_annotate_cli_writes_a_batch(tmp_path, world_tokenizer):
    import torch

    from llama2.checkpoint import save_native
    from llama2.model import ModelArgs, Transformer

    records = _records(9, 20, 10, 20)
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, records)
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=world_tokenizer.vocab_size,
                                  hidden_dim=64, max_seq_len=512))
        m.init_weights(std=0.5)
        save_native(tmp_path / name, m, tokenizer=world_tokenizer)
    out = tmp_path / "prefs.jsonl"
    rc = annotate.cli(["--simulate", "--policy", str(tmp_path / "a"), "--policy", str(tmp_path / "b"),
                         "--prompts", str(prompts), "--temperatures", "0.7", "1.0", "--out", str(out),
                         "--batch", "2", "--seed", "1", "--max-new-tokens", "6"])
    assert rc == 0
    pairs = read_records(out, "preferences")  # every pair validates
    assert len(pairs) >= 30 and {p["batch"] for p in pairs} == {2}
    assert {p["axis"] for p in pairs} == {"helpfulness", "safety"}
    with pytest.raises(SystemExit):
        annotate.cli(["--policy", "a.pt", "--prompts", str(prompts), "--out", str(out)])  # no --simulate
