"""Plausible worse answers (corruptions) and harmless rewordings of a gold answer.

Corruptions are the failure modes a small sampled model shows — a wrong value, an answer cut off,
an answer said twice, the wrong format, a refusal of a benign request — and make the rejected side
of contrastive preference pairs (calibration: pairs must differ in qualities a small reward model
can see). Rewordings check that graders accept a correct answer phrased differently.
"""
from __future__ import annotations

import random

from llama2.world.checks import mentions, numbers, prompt_text

CORRUPTIONS = ("wrong_value", "truncated", "repeated", "wrong_format", "refusal", "rambling")

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I cannot answer that question, as it could be harmful.",
    "As an AI, I am not able to provide that information.",
    "I'm sorry, I won't do that. Is there anything else I can help you with?",
    "I apologize, but I must decline this request.",
)
FILLER = (
    "This is a question that many people ask.",
    "There are many ways to think about it.",
    "It is always good to check your work carefully.",
    "Let me know if you would like to hear more about it.",
    "Some people find this easy and some find it hard.",
)


def _replace_last(text: str, old: str, new: str) -> str:
    i = text.rfind(old)
    return text if i < 0 else text[:i] + new + text[i + len(old):]


def _answer_text(ref: dict, gold: str) -> str | None:
    """The part of the gold answer that carries the answer (where truncation cuts in)."""
    check = ref["check"]
    if check == "number":
        return str(ref["answer"])
    if check == "value":
        return next((a for a in ref["accept"] if mentions(gold, a)), None)
    if check in ("string", "choice"):
        return ref["answer"]
    if check == "letter":
        return f'"{ref["answer"]}"'
    if check == "sequence":
        return str(ref["answer"][-1])
    if check == "sentence":
        return ref["must_include"][-1]
    return None


def _wrong_value(rng: random.Random, record: dict) -> str | None:
    ref, gold = record["reference"], record["reference"]["gold"]
    check = ref["check"]
    if check == "number":
        ans = int(ref["answer"])
        given = set(numbers(prompt_text(record)))
        for _ in range(50):
            wrong = ans + rng.choice((-10, -2, -1, 1, 2, 10)) if rng.random() < 0.8 else int(str(ans)[::-1] or 0)
            if wrong != ans and wrong >= 0 and wrong not in given:
                return _replace_last(gold, str(ans), str(wrong))
        return None
    if check == "value":
        hit = _answer_text(ref, gold)
        pool = [w for w in ref["wrong"] if not mentions(gold, w)]
        return _replace_last(gold, hit, rng.choice(pool)) if hit and pool else None
    if check == "string":
        ans = ref["answer"]
        for _ in range(20):  # swap two neighbouring letters (a typical near miss)
            i = rng.randrange(max(1, len(ans) - 1))
            cand = ans[:i] + ans[i + 1:i + 2] + ans[i] + ans[i + 2:]
            if cand.lower() != ans.lower():
                return _replace_last(gold, ans, cand)
        return _replace_last(gold, ans, ans[:-1] or "x")
    if check == "letter":
        ans = ref["answer"]
        other = rng.choice([c for c in "bcdefghklmnoprstuw" if c != ans.lower()])
        return _replace_last(gold, f'"{ans}"', f'"{other}"')
    if check == "sequence":
        ans = [str(x) for x in ref["answer"]]
        wrong = ans[:]
        i = rng.randrange(len(wrong) - 1)
        wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
        return ", ".join(wrong)
    if check == "choice":
        others = [o for o in ref["options"] if o != ref["answer"]]
        return _replace_last(gold, ref["answer"], rng.choice(others))
    if check == "lines":
        sep = ", " if ref["format"] == "commas" else "\n"
        parts = gold.split(sep)
        allowed = {a.lower() for a in ref["allowed"]}
        word = rng.choice([w for w in ("table", "happy", "river", "seven", "window", "summer") if w not in allowed])
        i = rng.randrange(len(parts))
        prefix = parts[i].split(". ", 1)[0] + ". " if ref["format"] == "numbered" else ""
        parts[i] = prefix + (word.upper() if ref.get("upper") else word)
        return sep.join(parts)
    if check == "sentence":
        for word, other in zip(ref["must_include"], ("river", "cloud")):
            gold = _replace_last(gold, word, other)
        return gold
    return None


def _truncated(rng: random.Random, record: dict) -> str | None:
    ref, gold = record["reference"], record["reference"]["gold"]
    if ref.get("check") == "lines":
        sep = ", " if ref["format"] == "commas" else "\n"
        parts = gold.split(sep)
        return sep.join(parts[:max(1, len(parts) // 2)]) if len(parts) > 1 else None
    hit = _answer_text(ref, gold)
    i = gold.rfind(hit) if hit else -1
    if i < 0:
        words = gold.split(" ")
        return " ".join(words[:max(1, len(words) // 2)]) if len(words) > 1 else None
    # Cut just before the answer, as a generation that ran out of tokens would; an answer that
    # opens the gold text is cut inside itself instead (when it is long enough to cut).
    cut = gold[:i].rstrip()
    if not cut:
        cut = gold[:len(hit) // 2] if len(hit) >= 2 else ""
    return cut if cut and cut != gold else None


def _wrong_format(rng: random.Random, record: dict) -> str | None:
    ref, gold = record["reference"], record["reference"]["gold"]
    if ref.get("check") == "lines":
        if ref.get("upper"):
            return gold.lower()
        items = [ln.split(". ", 1)[-1] for ln in gold.split("\n")] if ref["format"] != "commas" else gold.split(", ")
        return "\n".join(items) if ref["format"] == "commas" else ", ".join(items)
    if ref.get("check") == "string" and ref.get("case_sensitive"):
        return gold.replace(ref["answer"], ref["answer"].lower())
    return None


def corrupt(rng: random.Random, record: dict, kind: str) -> str | None:
    """A worse answer of the given kind for a helpfulness record, or None where it does not apply."""
    gold = record["reference"]["gold"]
    if kind == "wrong_value":
        out = _wrong_value(rng, record)
    elif kind == "truncated":
        out = _truncated(rng, record)
    elif kind == "repeated":
        out = gold + ("\n" if "\n" in gold else " ") + gold
    elif kind == "wrong_format":
        out = _wrong_format(rng, record)
    elif kind == "refusal":
        out = rng.choice(REFUSALS)
    elif kind == "rambling":
        filler = " ".join(rng.sample(FILLER, 4) + ["I hope this answer is useful to you in some way."])
        lists = record["reference"]["check"] in ("lines", "sequence")
        out = gold + ("\n\n" if lists else " ") + filler
    else:
        raise ValueError(f"unknown corruption {kind!r} (known: {', '.join(CORRUPTIONS)})")
    return out if out and out.strip() != gold.strip() else None


def corrupt_answer(rng: random.Random, record: dict) -> tuple[str, str]:
    """(kind, worse answer) with a random applicable corruption kind (for contrastive pairs)."""
    kinds = list(CORRUPTIONS)
    rng.shuffle(kinds)
    for kind in kinds:
        out = corrupt(rng, record, kind)
        if out is not None:
            return kind, out
    raise ValueError(f"record {record.get('id', '?')}: no corruption applies")


def rephrase(rng: random.Random, record: dict) -> str:
    """A harmless variation of the gold answer that a fair grader must still accept."""
    ref, gold = record["reference"], record["reference"]["gold"]
    check = ref["check"]
    options = ["Sure! " + gold]
    if check in ("number", "choice"):
        options += [f"The answer is {ref['answer']}.", f"{ref['answer']}"]
    elif check == "value":
        options += [f"The answer is {ref['answer']}.", f"It is {ref['answer']}.", gold + " I hope this helps!"]
    elif check == "string":
        options += [f'It is "{ref["answer"]}".', ref["answer"]]
    elif check == "letter":
        options += [f"The answer is {ref['answer']}.", f'It is the letter "{ref["answer"]}".']
    elif check == "sequence":
        options += [f"Here they are: {gold}.", "\n".join(gold.split(", "))]
    elif check == "lines":
        lines = gold.split("\n") if ref["format"] != "commas" else None
        options = [f"Here is the list:\n{gold}"]
        if lines and ref["format"] == "lines" and not ref.get("upper") and not ref.get("expected"):
            options += ["\n".join(f"- {x.capitalize()}" for x in lines)]
        if ref["format"] == "commas":
            options += [gold.capitalize() + "."]
    return rng.choice(options)
