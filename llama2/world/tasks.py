"""Helpfulness task families: a generator and a grader each, and the registry all families share.

A generator `(rng, universe, split) -> Example` writes one prompt (a dialog ending with a user
turn), its gold answer and the reference its grader reads. It only uses entities and instances of
the requested split, so evaluation prompts are never seen in training (see universe.py).
A grader `(record, response) -> Grade` plays the annotator of Llama 2 §3.2.1.

Graders register in `llama2.world.grading` (shared with the safety tasks `adversarial` and
`borderline`); `grade_helpfulness` dispatches on `record["task"]`. Generators register here in
`FAMILIES`, which `generate.py` mixes into SFT data and prompt sets.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, NamedTuple

from llama2.world import facts as F
from llama2.world.checks import grade_reference
from llama2.world.corrupt import corrupt_answer
from llama2.world.grading import Grade, grade_helpfulness, register_grader  # noqa: F401 (re-exported)
from llama2.world.universe import ANIMALS, COLOURS, FOODS, HOBBIES, JOBS, THINGS, UNITS, Universe, article


class Example(NamedTuple):
    """One generated task instance: what a prompt record and an SFT dialog are made from."""
    task: str
    messages: list[dict]  # [{"role", "content"}, …] ending with a user turn
    answer: str  # the gold assistant answer
    reference: dict  # what the grader needs; always "gold", and "instances": the keys splits are made of


MakeExample = Callable[[random.Random, Universe, str], Example]
Grader = Callable[[dict, str], Grade]


@dataclass(frozen=True)
class Family:
    name: str
    generate: MakeExample
    grade: Grader
    weight: float = 1.0  # relative share in generated SFT data and prompt sets
    # (rng, record) -> (kind, worse answer): the rejected side of offline contrastive pairs
    corrupt: Callable[[random.Random, dict], tuple[str, str]] | None = None


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> None:
    """Add a task family: its generator feeds generate.py, its grader `grade_helpfulness`."""
    FAMILIES[family.name] = family
    register_grader(family.name)(family.grade)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _draw(rng: random.Random, u: Universe, split: str, make: Callable[[], tuple[str, object]]):
    """Draw instances until one's key falls in `split` (~1 in 5 tries for eval)."""
    for _ in range(10_000):
        key, inst = make()
        if u.split_of(key) == split:
            return key, inst
    raise RuntimeError(f"no {split} instance found")  # only if the instance space were tiny


WORD_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

# ---------------------------------------------------------------------------------------------
# arithmetic
OPS = {"add": "+", "sub": "-", "mul": "*"}
ARITH_PROMPTS = {
    "add": ("What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.", "Calculate {a} + {b}.",
            "What do you get if you add {a} and {b}?"),
    "sub": ("What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}.",
            "Take {b} away from {a}. What is left?"),
    "mul": ("What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}.",
            "Calculate {a} * {b}."),
}


def arith_instance(rng: random.Random) -> tuple[str, tuple[str, int, int]]:
    """An arithmetic instance from three tiers of difficulty: one-digit operands (a table a tiny
    model memorises), two digits with one, and two digits with two (which it mostly cannot do
    after pretraining: room for RLHF to show progress)."""
    op, tier = rng.choice(("add", "add", "sub", "sub", "mul")), rng.random()
    if op == "add":
        if tier < 0.4:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
        elif tier < 0.7:
            a, b = rng.randint(10, 99), rng.randint(1, 9)
            a, b = (a, b) if rng.random() < 0.5 else (b, a)
        else:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
    elif op == "sub":
        while True:
            if tier < 0.4:
                b = rng.randint(1, 9)
                a = b + rng.randint(1, 9)
            elif tier < 0.7:
                a, b = rng.randint(10, 99), rng.randint(1, 9)
            else:
                a = rng.randint(20, 99)
                b = rng.randint(10, a - 1)
            if 2 * b != a:  # the answer never repeats an operand
                break
    else:
        a, b = (rng.randint(2, 9), rng.randint(2, 9)) if tier < 0.7 else (rng.randint(2, 12), rng.randint(2, 12))
    return f"arith:{op}:{a}:{b}", (op, a, b)


def apply_op(op: str, a: int, b: int) -> int:
    return a + b if op == "add" else a - b if op == "sub" else a * b


def gen_arithmetic(rng: random.Random, u: Universe, split: str) -> Example:
    key, (op, a, b) = _draw(rng, u, split, lambda: arith_instance(rng))
    c = apply_op(op, a, b)
    gold = f"{a} {OPS[op]} {b} = {c}."
    prompt = rng.choice(ARITH_PROMPTS[op]).format(a=a, b=b)
    return Example("arithmetic", [user(prompt)], gold, {"check": "number", "answer": c, "instances": [key], "gold": gold})


# ---------------------------------------------------------------------------------------------
# fact questions


def fact_reference(fact: F.Fact, gold: str) -> dict:
    if fact.numeric:
        return {"check": "number", "answer": int(fact.value), "instances": [fact.key], "gold": gold}
    return {"check": "value", "answer": fact.value, "accept": list(fact.accept), "wrong": list(fact.wrong),
            "instances": [fact.key], "gold": gold}


def draw_fact(rng: random.Random, u: Universe, split: str) -> F.Fact:
    """A fact of the split: people and places by their own split, animals/things by instance key."""
    r = rng.random()
    if r < 0.65:
        return rng.choice(F.person_facts(rng.choice(u.people_in(split)), u))
    if r < 0.8:
        return rng.choice(F.place_facts(rng.choice(u.places_in(split)), u))
    kind = "animal" if r < 0.92 else "thing"
    key = ("fact_pool", kind, split)
    if key not in u.cache:
        pool = [f for a in u.animals for f in F.animal_facts(a)] if kind == "animal" else \
            [f for t in u.things for f in F.thing_facts(t)]
        u.cache[key] = [f for f in pool if u.split_of(f.key) == split] or pool
    return rng.choice(u.cache[key])


def gen_fact(rng: random.Random, u: Universe, split: str) -> Example:
    fact = draw_fact(rng, u, split)
    gold = fact.statements[0]
    return Example("fact", [user(rng.choice(fact.questions))], gold, fact_reference(fact, gold))


# ---------------------------------------------------------------------------------------------
# string manipulation
STRING_PROMPTS = {
    "reverse": ('Reverse the word "{w}".', 'Write "{w}" backwards.', 'What is "{w}" spelled backwards?'),
    "upper": ('Write the word "{w}" in capital letters.', 'Convert "{w}" to uppercase.'),
    "first": ('What is the first letter of the word "{w}"?', 'Which letter does "{w}" start with?'),
    "last": ('What is the last letter of the word "{w}"?', 'Which letter does "{w}" end with?'),
    "spell": ('Spell "{w}" with a dash between the letters.', 'Write "{w}" with dashes between its letters.'),
}


def string_answer(op: str, w: str) -> tuple[str, dict]:
    """Gold answer and reference for a string operation on the word w."""
    if op == "reverse":
        r = w[::-1]
        return f'"{w}" backwards is "{r}".', {"check": "string", "answer": r, "case_sensitive": False}
    if op == "upper":
        return f'In capital letters, "{w}" is "{w.upper()}".', {"check": "string", "answer": w.upper(),
                                                               "case_sensitive": True}
    if op == "first":
        return f'The first letter of "{w}" is "{w[0]}".', {"check": "letter", "answer": w[0]}
    if op == "last":
        return f'The last letter of "{w}" is "{w[-1]}".', {"check": "letter", "answer": w[-1]}
    spelled = "-".join(w)
    return f'"{w}" with dashes is "{spelled}".', {"check": "string", "answer": spelled, "case_sensitive": False}


def gen_string(rng: random.Random, u: Universe, split: str) -> Example:
    def make():
        op, w = rng.choice(list(STRING_PROMPTS)), rng.choice(u.words)
        return f"string:{op}:{w}", (op, w)

    while True:
        key, (op, w) = _draw(rng, u, split, make)
        if not (op == "reverse" and w == w[::-1]):
            break
    gold, ref = string_answer(op, w)
    prompt = rng.choice(STRING_PROMPTS[op]).format(w=w)
    return Example("string", [user(prompt)], gold, ref | {"instances": [key], "gold": gold})


# ---------------------------------------------------------------------------------------------
# list manipulation
# Words that belong to exactly one category (so "which of these is an animal" has one answer).
CATEGORIES = {
    "animal": [a.name for a in ANIMALS if a.name != "fish"],
    "colour": [c for c in COLOURS if c not in ("orange", "gold")],
    "food": [f for f in FOODS if f not in ("corn", "honey", "bread", "cheese", "apples", "plums", "pie")],
    "job": [j for j in JOBS if j not in ("cook",)],
}


def _join(items) -> str:
    return ", ".join(str(x) for x in items)


def _distinct_numbers(rng: random.Random, k: int) -> list[int]:
    while True:
        xs = rng.sample(range(1, 100), k)
        if xs != sorted(xs) and xs != sorted(xs, reverse=True):
            return xs


def gen_list(rng: random.Random, u: Universe, split: str) -> Example:
    kind = rng.choice(("sort_num", "sort_num", "sort_words", "extreme", "pick", "position"))

    def make():
        if kind == "sort_num":
            xs, desc = _distinct_numbers(rng, rng.choice((3, 3, 4, 5))), rng.random() < 0.4
            return f"list:sort_num:{int(desc)}:{_join(xs)}", (xs, desc)
        if kind == "sort_words":
            while True:
                ws = rng.sample(u.words, rng.randint(3, 5))
                if ws != sorted(ws):
                    return f"list:sort_words:{_join(ws)}", (ws, False)
        if kind == "extreme":
            xs = rng.sample(range(1, 100), rng.randint(3, 5))
            return f"list:extreme:{_join(xs)}", (xs, rng.random() < 0.5)
        if kind == "pick":
            cat = rng.choice(list(CATEGORIES))
            others = [w for c, ws in CATEGORIES.items() if c != cat for w in ws]
            opts = [rng.choice(CATEGORIES[cat])] + rng.sample(others, rng.randint(2, 3))
            ans = opts[0]
            rng.shuffle(opts)
            return f"list:pick:{cat}:{_join(opts)}", (opts, (cat, ans))
        ws = rng.sample(u.words, rng.randint(3, 5))
        return f"list:position:{_join(ws)}", (ws, rng.random() < 0.5)

    key, (xs, opt) = _draw(rng, u, split, make)
    if kind in ("sort_num", "sort_words"):
        ans = sorted(xs, reverse=bool(opt))
        if kind == "sort_num":
            prompt = rng.choice(("Sort these numbers from {d}: {xs}.", "Put these numbers in order from {d}: {xs}."))
            prompt = prompt.format(d="largest to smallest" if opt else "smallest to largest", xs=_join(xs))
        else:
            prompt = rng.choice(("Put these words in alphabetical order: {xs}.", "Sort these words from A to Z: {xs}."))
            prompt = prompt.format(xs=_join(xs))
        gold = _join(ans)
        ref = {"check": "sequence", "kind": "number" if kind == "sort_num" else "word",
               "answer": ans, "input": xs}
    elif kind == "extreme":
        word = "largest" if opt else "smallest"
        ans = max(xs) if opt else min(xs)
        prompt = rng.choice((f"Which number is the {word}: {_join(xs)}?", f"What is the {word} number in this list: {_join(xs)}?"))
        gold = f"{ans} is the {word}."
        ref = {"check": "choice", "answer": str(ans), "options": [str(x) for x in xs]}
    elif kind == "pick":
        cat, ans = opt
        prompt = f"Which of these is {article(cat)} {cat}: {_join(xs)}?"
        gold = f"{article(ans).capitalize()} {ans} is {article(cat)} {cat}."
        ref = {"check": "choice", "answer": ans, "options": xs}
    else:
        pos = "last" if opt else "first"
        ans = xs[-1] if opt else xs[0]
        prompt = f"What is the {pos} item in this list: {_join(xs)}?"
        gold = f"The {pos} item is {ans}."
        ref = {"check": "choice", "answer": ans, "options": xs}
    return Example("list", [user(prompt)], gold, ref | {"instances": [key], "gold": gold})


# ---------------------------------------------------------------------------------------------
# unit conversion
UNIT_PROMPTS = {
    "down": ("How many {small} are in {k} {bigs}?", "Convert {k} {bigs} to {small}.", "{k} {bigs} is how many {small}?"),
    "up": ("How many {bigs} is {m} {small}?", "Convert {m} {small} to {bigs}.", "{m} {small} is how many {bigs}?"),
}


def gen_units(rng: random.Random, u: Universe, split: str) -> Example:
    def make():
        row, way, k = rng.choice(UNITS), rng.choice(("down", "up")), rng.randint(2, 15)
        return f"units:{row[0]}:{way}:{k}", (row, way, k)

    key, ((_, bigs, small, factor), way, k) = _draw(rng, u, split, make)
    m = k * factor
    prompt = rng.choice(UNIT_PROMPTS[way]).format(k=k, m=m, bigs=bigs, small=small)
    if way == "down":
        gold, ans = f"{k} {bigs} is {m} {small}.", m
    else:
        gold, ans = f"{m} {small} is {k} {bigs}.", k
    return Example("units", [user(prompt)], gold, {"check": "number", "answer": ans, "instances": [key], "gold": gold})


# ---------------------------------------------------------------------------------------------
# counting


def gen_counting(rng: random.Random, u: Universe, split: str) -> Example:
    kind = rng.choice(("letters", "letter", "items", "category"))

    def make():
        if kind == "letters":
            w = rng.choice(u.words)
            return f"count:letters:{w}", (w, None)
        if kind == "letter":
            w = rng.choice(u.words)
            return f"count:letter:{w}", (w, rng.choice(sorted(set(w))))
        if kind == "items":
            ws = rng.sample(u.words, rng.randint(2, 5))
            return f"count:items:{_join(ws)}", (ws, None)
        cat = rng.choice(list(CATEGORIES))
        others = [w for c, ws in CATEGORIES.items() if c != cat for w in ws]
        ws = rng.sample(CATEGORIES[cat], rng.randint(1, 4)) + rng.sample(others, rng.randint(1, 3))
        rng.shuffle(ws)
        return f"count:category:{cat}:{_join(ws)}", (ws, cat)

    key, (x, opt) = _draw(rng, u, split, make)
    if kind == "letters":
        n = len(x)
        prompt = rng.choice(('How many letters are in the word "{w}"?', 'How many letters does "{w}" have?')).format(w=x)
        gold = f'The word "{x}" has {n} letters.'
    elif kind == "letter":
        n = x.count(opt)
        prompt = f'How many times does the letter "{opt}" appear in "{x}"?'
        gold = f'The letter "{opt}" appears {n} {"time" if n == 1 else "times"} in "{x}".'
    elif kind == "items":
        n = len(x)
        prompt = rng.choice(("How many items are in this list: {xs}?", "Count the items in this list: {xs}.")).format(xs=_join(x))
        gold = f"There are {n} items in the list."
    else:
        n = sum(w in CATEGORIES[opt] for w in x)
        plural = {"animal": "animals", "colour": "colours", "food": "foods", "job": "jobs"}[opt]
        prompt = f"How many {plural} are in this list: {_join(x)}?"
        gold = f"There {'is' if n == 1 else 'are'} {n} {plural if n != 1 else opt} in the list."
    return Example("counting", [user(prompt)], gold, {"check": "number", "answer": n, "instances": [key], "gold": gold})


# ---------------------------------------------------------------------------------------------
# short structured creative requests
LIST_CATEGORIES = {  # label in prompts -> the words that count
    "animals": [a.name for a in ANIMALS],
    "colours": list(COLOURS),
    "foods": list(FOODS),
    "jobs": list(JOBS),
    "hobbies": list(HOBBIES),
    "objects": [t.name for t in THINGS],
}
LIST_PROMPTS = {
    "lines": ("Name {k} {cat}, one per line.", "List {k} {cat}. Put each one on its own line."),
    "numbered": ("Give me a numbered list of {k} {cat}.", "Write a numbered list of {k} {cat}."),
    "commas": ("Name {k} {cat} in one line, separated by commas.", "List {k} {cat} on one line with commas between them."),
    "upper": ("Name {k} {cat} in capital letters, one per line.",),
    "letter": ('Name {k} {cat} that start with the letter "{c}", one per line.',),
}
SENTENCE_TEMPLATES = ("The {a} sat next to the {t}.", "A {a} found a {t} in the garden.", "I saw a {a} with a {t}.",
                      "The {a} looked at the {t} for a long time.", "My {a} likes to sleep by the {t}.")


def format_items(items: list[str], fmt: str) -> str:
    if fmt == "commas":
        return ", ".join(items)
    if fmt == "numbered":
        return "\n".join(f"{i}. {x}" for i, x in enumerate(items, 1))
    if fmt == "upper":
        return "\n".join(x.upper() for x in items)
    return "\n".join(items)


def gen_creative(rng: random.Random, u: Universe, split: str) -> Example:
    if rng.random() < 0.3:
        def make():
            a, t = rng.choice(ANIMALS).name, rng.choice(THINGS).name
            return f"creative:sentence:{a}:{t}", (a, t)

        key, (a, t) = _draw(rng, u, split, make)
        prompt = rng.choice((f'Write one short sentence that uses the words "{a}" and "{t}".',
                             f"Write a single sentence about {article(a)} {a} and {article(t)} {t}."))
        gold = rng.choice(SENTENCE_TEMPLATES).format(a=a, t=t)
        gold = gold.replace(f"A {a}", f"{article(a).capitalize()} {a}").replace(f"a {a}", f"{article(a)} {a}")
        ref = {"check": "sentence", "must_include": [a, t], "max_words": 15}
        return Example("creative", [user(prompt)], gold, ref | {"instances": [key], "gold": gold})

    def make():
        cat, fmt, k = rng.choice(list(LIST_CATEGORIES)), rng.choice(list(LIST_PROMPTS)), rng.randint(2, 5)
        letter = None
        if fmt == "letter":  # a first letter that at least k words of the category share
            counts = Counter(w[0] for w in LIST_CATEGORIES[cat])
            letters = sorted(c for c, n in counts.items() if n >= k)
            letter = rng.choice(letters) if letters else None
            fmt = fmt if letter else "lines"
        return f"creative:list:{cat}:{k}:{fmt}:{letter}", (cat, fmt, k, letter)

    key, inst = _draw(rng, u, split, make)
    cat, fmt, k, letter = inst
    pool = [w for w in LIST_CATEGORIES[cat] if not letter or w.startswith(letter)]
    items = rng.sample(pool, k)
    prompt = rng.choice(LIST_PROMPTS[fmt]).format(k=WORD_NUMBERS[k], cat=cat, c=letter)
    gold = format_items(items, fmt)
    layout = fmt if fmt in ("commas", "numbered") else "lines"  # "upper" and "letter" are one per line
    ref = {"check": "lines", "count": k, "format": layout, "allowed": LIST_CATEGORIES[cat], "upper": fmt == "upper",
           "letter": letter}
    return Example("creative", [user(prompt)], gold, ref | {"instances": [key], "gold": gold})


# ---------------------------------------------------------------------------------------------
# multi-turn follow-ups: a second user turn that refers to the first answer


def gen_multiturn(rng: random.Random, u: Universe, split: str) -> Example:
    kind = rng.choice(("arith", "arith", "fact", "fact", "string", "list", "creative"))
    if kind == "arith":
        first = gen_arithmetic(rng, u, split)
        msgs, value = list(first.messages) + [assistant(first.answer)], first.reference["answer"]
        given = set()
        for _ in range(rng.choice((1, 1, 2))):  # sometimes a third turn builds on the second
            given |= {int(x) for x in re.findall(r"\d+", "\n".join(m["content"] for m in msgs))}
            while True:
                op, k = rng.choice(("add", "sub", "double")), rng.choice((rng.randint(1, 9), rng.randint(10, 20)))
                if op == "sub" and k >= value:
                    continue
                new = value + k if op == "add" else value - k if op == "sub" else 2 * value
                if new not in given and new != k:
                    break
            if op == "add":
                text, gold = rng.choice((f"Now add {k} to that.", f"Add {k} to the result.")), f"{value} + {k} = {new}."
            elif op == "sub":
                text, gold = rng.choice((f"Now subtract {k} from it.", f"Take {k} away from that.")), f"{value} - {k} = {new}."
            else:
                text, gold = rng.choice(("Now double it.", "What is twice that?")), f"Twice {value} is {new}."
            msgs += [user(text), assistant(gold)]
            value = new
        msgs.pop()  # the last answer is the one to give
        ref = {"check": "number", "answer": value, "instances": first.reference["instances"], "gold": gold}
        return Example("multiturn", msgs, gold, ref)
    if kind == "fact":
        p = rng.choice(u.people_in(split))
        f1, f2 = rng.sample(F.person_facts(p, u), 2)
        q2 = rng.choice(F.person_questions(p, f2.attribute, pronoun=True))
        if rng.random() < 0.5:
            q2 = "And " + q2[0].lower() + q2[1:]
        msgs = [user(rng.choice(f1.questions)), assistant(f1.statements[0]), user(q2)]
        gold = f2.statements[0]
        ref = fact_reference(f2, gold) | {"instances": [f1.key, f2.key]}
        return Example("multiturn", msgs, gold, ref)
    if kind == "string":
        first = gen_string(rng, u, split)
        while first.reference["check"] != "string" or first.reference["answer"].isupper():
            first = gen_string(rng, u, split)
        word = first.reference["answer"]
        gold = f'In capital letters, it is "{word.upper()}".'
        msgs = list(first.messages) + [assistant(first.answer), user("Now write that in capital letters.")]
        ref = {"check": "string", "answer": word.upper(), "case_sensitive": True, "instances": first.reference["instances"], "gold": gold}
        return Example("multiturn", msgs, gold, ref)
    if kind == "list":
        first = gen_list(rng, u, split)
        while first.reference["check"] != "sequence" or first.reference["kind"] != "number":
            first = gen_list(rng, u, split)
        xs, prev = first.reference["input"], first.reference["answer"]
        msgs = list(first.messages) + [assistant(first.answer)]
        if rng.random() < 0.5:
            ans = list(reversed(prev))
            msgs.append(user("Now sort them the other way round."))
            gold = _join(ans)
            ref = {"check": "sequence", "kind": "number", "answer": ans, "input": xs}
        else:
            word = rng.choice(("largest", "smallest"))
            ans = max(xs) if word == "largest" else min(xs)
            msgs.append(user(f"Which of them is the {word}?"))
            gold = f"{ans} is the {word}."
            ref = {"check": "choice", "answer": str(ans), "options": [str(x) for x in xs]}
        return Example("multiturn", msgs, gold, ref | {"instances": first.reference["instances"], "gold": gold})
    first = gen_creative(rng, u, split)
    while first.reference["check"] != "lines" or first.reference["format"] != "lines" or first.reference["upper"]:
        first = gen_creative(rng, u, split)
    items = first.answer.split("\n")
    if rng.random() < 0.5:
        follow, expected, fmt = "Now write them in capital letters.", [x.upper() for x in items], "upper"
    else:
        follow, expected, fmt = "Now put them in alphabetical order.", sorted(items), "lines"
    gold = format_items(expected, "lines")
    msgs = list(first.messages) + [assistant(first.answer), user(follow)]
    ref = {"check": "lines", "count": len(items), "format": "lines", "allowed": first.reference["allowed"],
           "upper": fmt == "upper", "letter": None, "expected": expected, "ordered": True,
           "instances": first.reference["instances"], "gold": gold}
    return Example("multiturn", msgs, gold, ref)


HELPFULNESS_TASKS = ("arithmetic", "fact", "string", "list", "units", "counting", "creative", "multiturn")


def _register_builtin() -> None:
    weights = {"arithmetic": 1.0, "fact": 2.5, "string": 1.0, "list": 1.0, "units": 0.7, "counting": 0.8,
               "creative": 1.0, "multiturn": 1.2}
    for name in HELPFULNESS_TASKS:
        register_family(Family(name, globals()[f"gen_{name}"], grade_reference, weights[name], corrupt_answer))


_register_builtin()
