"""The pretraining corpus of the built-in world (Llama 2 §2.1, at toy scale).

Short documents of several kinds, each teaching what later stages need:
  bio, place, nature  encyclopedic facts, each fact in several phrasings
  qa                  "Q: … A: …" documents: the question form a chat model will be asked in
  story               short stories whose details agree with the facts
  dialog              example dialogs in plain text ("User: … Assistant: …"), training split only
  worked              worked arithmetic, unit, word and list examples (never an eval instance)
  safety              borderline prompts answered helpfully, risks and safe answers (safety.py)
Facts of *every* person and place are in the corpus, eval ones included: evaluation asks whether
the chat model carries pretraining knowledge to entities it never saw in SFT (calibration).
Everything else an eval prompt contains stays out.
"""
from __future__ import annotations

import random
from typing import Callable, Iterator

from llama2.world import facts as F
from llama2.world import safety
from llama2.world import tasks as T
from llama2.world.universe import PRONOUNS, UNITS, Person, Universe, article

# kind -> share of the corpus characters. Facts (bio, place, nature, most of qa, story) get
# about 40%: each person fact is then stated ~50 times, which a 3M model memorises in ~1,500
# steps (held-out people's facts included). Procedural skills (arithmetic, copying, reversing,
# sorting) are harder for it and get the rest: dialogs, worked examples and Q/A.
DOC_SHARES = {
    "bio": 0.12, "place": 0.04, "nature": 0.04, "qa": 0.22, "story": 0.08,
    "dialog": 0.20, "worked": 0.22, "safety": 0.08,
}
# Characters of pretraining text per world size (~4 characters per token of the tiny tokenizer).
CORPUS_CHARS = {"tiny": 6_000_000, "small": 30_000_000, "medium": 100_000_000}
QA_FORMATS = (("Q: ", "A: "), ("Question: ", "Answer: "))


class Deck:
    """Deal items in shuffled rounds, so every person and place is covered equally often."""

    def __init__(self, items: list, rng: random.Random):
        self.items, self.rng, self.pile = list(items), rng, []

    def draw(self):
        if not self.pile:
            self.pile = self.items[:]
            self.rng.shuffle(self.pile)
        return self.pile.pop()


def _verb(p: Person, s_form: str, base: str) -> str:
    """Agreement for a pronoun subject: "she walks", "they walk"."""
    return base if p.pronoun == "they" else s_form


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _statement(rng: random.Random, fact: F.Fact) -> str:
    """Mostly the canonical phrasing (the one SFT answers use), often another one."""
    return fact.statements[0] if rng.random() < 0.4 else rng.choice(fact.statements)


# -- encyclopedic documents -----------------------------------------------------------------------

def bio_doc(rng: random.Random, u: Universe, p: Person) -> str:
    facts = F.person_facts(p, u)
    rng.shuffle(facts)
    sents = [_statement(rng, f) for f in facts[:rng.randint(5, 8)]]
    home = u.get(p.home)
    if rng.random() < 0.5:
        sents.append(f"{p.home} is {article(home.kind)} {home.kind} near {home.near}.")
    if rng.random() < 0.3:
        s = PRONOUNS[p.pronoun][0]
        sents.append(f"{_cap(s)} {_verb(p, 'is', 'are')} {p.age} years old and {_verb(p, 'lives', 'live')} in {p.home}.")
    return " ".join(sents)


def place_doc(rng: random.Random, u: Universe, place) -> str:
    sents = [_statement(rng, f) for f in F.place_facts(place, u)]
    rng.shuffle(sents)
    people = u.residents(place.name)
    if people:
        some = rng.sample(people, min(len(people), rng.randint(1, 4)))
        names = some[0].name if len(some) == 1 else ", ".join(x.name for x in some[:-1]) + f" and {some[-1].name}"
        sents.append(f"{names} {'lives' if len(some) == 1 else 'live'} in {place.name}.")
        q = rng.choice(some)
        sents.append(f"In {place.name}, {q.name} works as {article(q.job)} {q.job}.")
    return " ".join(sents)


def nature_doc(rng: random.Random, u: Universe) -> str:
    if rng.random() < 0.6:
        a = rng.choice(u.animals)
        sents = [_statement(rng, f) for f in F.animal_facts(a)]
        if a.name in ("cat", "dog", "rabbit", "fish", "hamster", "parrot", "turtle", "mouse"):
            sents.append(f"Many people keep {article(a.name)} {a.name} as a pet.")
    else:
        t = rng.choice(u.things)
        sents = [_statement(rng, f) for f in F.thing_facts(t)]
        sents.append(f"You can find {article(t.name)} {t.name} in many homes.")
    rng.shuffle(sents)
    return " ".join(sents)


# -- question/answer documents -----------------------------------------------------------------

def _train_examples(rng: random.Random, u: Universe, family: str) -> T.Example:
    """A task example from the train split (test instances are held out for SFT's test set)."""
    return T.FAMILIES[family].generate(rng, u, "train")


QA_FAMILIES = ("arithmetic", "arithmetic", "string", "units", "counting", "list", "creative")


def qa_pair(rng: random.Random, u: Universe, people: Deck, places: Deck) -> tuple[str, str]:
    r = rng.random()
    if r < 0.45:
        fact = rng.choice(F.person_facts(people.draw(), u))
    elif r < 0.57:
        fact = rng.choice(F.place_facts(places.draw(), u))
    elif r < 0.7:
        fact = rng.choice(F.animal_facts(rng.choice(u.animals)) + F.thing_facts(rng.choice(u.things)))
    else:
        ex = _train_examples(rng, u, rng.choice(QA_FAMILIES))
        return ex.messages[-1]["content"], ex.answer
    return rng.choice(fact.questions), _statement(rng, fact)


def qa_doc(rng: random.Random, u: Universe, people: Deck, places: Deck) -> str:
    q_tag, a_tag = rng.choice(QA_FORMATS)
    pairs = [qa_pair(rng, u, people, places) for _ in range(rng.randint(4, 8))]
    return "\n\n".join(f"{q_tag}{q}\n{a_tag}{a}" for q, a in pairs)


# -- stories -------------------------------------------------------------------------------------

def story_doc(rng: random.Random, u: Universe, p: Person) -> str:
    """A short story about p (and a neighbour), every detail consistent with the facts."""
    s, _, pp = PRONOUNS[p.pronoun]
    S = _cap(s)
    home = u.get(p.home)
    friends = [x for x in u.residents(p.home) if x.name != p.name] or [x for x in u.people if x.name != p.name]
    q = rng.choice(friends)

    def v(s_form: str, base: str) -> str:  # verb agreeing with p's pronoun
        return _verb(p, s_form, base)

    openings = (
        f"{p.name} lives in {p.home}, {article(home.kind)} {home.kind} near {home.near}.",
        f"In the {home.kind} of {p.home} there lives {article(p.job)} {p.job} called {p.name}.",
        f"Every morning in {p.home}, {p.name} wakes up early.",
    )
    middles = (
        f"{p.name} works as {article(p.job)} {p.job}. After work, {s} {v('goes', 'go')} home to {pp} pet {p.pet}.",
        f"{p.name} is {p.age} years old and loves {p.hobby}. On free days {s} {v('spends', 'spend')} hours {p.hobby}.",
        f"{p.name} has {article(p.thing_colour)} {p.thing_colour} {p.thing}. {S} {v('takes', 'take')} it everywhere.",
        f"For lunch, {p.name} {v('eats', 'eat')} {p.food}, because {p.food} is {pp} favourite food.",
        f"{p.name}'s favourite colour is {p.colour}, so {pp} door is painted {p.colour}.",
        f"{p.name} has a pet {p.pet}. The {p.pet} waits by the door when {s} {v('is', 'are')} at work.",
    )
    meetings = (
        f"One day, {p.name} met {q.name} in {q.home}. {q.name} is {article(q.job)} {q.job} and likes {q.hobby}.",
        f"Later, {p.name} visited {q.name}, who lives in {q.home} and has a pet {q.pet}.",
        f"At the market, {p.name} saw {q.name}, who was buying {q.food}. {q.name} loves {q.food}.",
    )
    endings = (
        f"In the evening, {p.name} went home to {p.home} and smiled.",
        f"It was a good day for {p.name}.",
        f"Then {p.name} went back to {p.home}, tired and happy.",
    )
    parts = [rng.choice(openings)] + rng.sample(middles, rng.randint(2, 3)) + [rng.choice(meetings), rng.choice(endings)]
    return " ".join(parts)


# -- dialogs and worked examples ---------------------------------------------------------------

DIALOG_FAMILIES = ("fact", "fact", "arithmetic", "string", "list", "units", "counting", "creative", "multiturn")


def _safety_dialog(rng: random.Random) -> list[dict]:
    if rng.random() < 0.5:
        rec = safety.borderline_prompts(rng, 1, "train")[0]
    else:
        rec = safety.adversarial_prompts(rng, 1, "train")[0]
    return rec["messages"] + [T.assistant(safety.gold_answer(rec, rng))]


def dialog_doc(rng: random.Random, u: Universe) -> str:
    """One to three example chats in plain text (training split only)."""
    names = {"user": "User", "assistant": "Assistant"}
    chats = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.15:
            msgs = _safety_dialog(rng)
        else:
            ex = _train_examples(rng, u, rng.choice(DIALOG_FAMILIES))
            msgs = ex.messages + [T.assistant(ex.answer)]
        chats.append("\n".join(f"{names[m['role']]}: {m['content']}" for m in msgs))
    return "\n\n".join(chats)


def worked_doc(rng: random.Random, u: Universe) -> str:
    kind = rng.choice(("arith", "arith", "word", "word", "units", "sort"))
    if kind == "arith":  # a drill of equations, or of questions answered by restating them
        lines, n, asked = [], rng.randint(5, 10), rng.random() < 0.5
        while len(lines) < n:
            key, (op, a, b) = T.arith_instance(rng)
            if u.split_of(key) == "train":
                eq = f"{a} {T.OPS[op]} {b} = {T.apply_op(op, a, b)}"
                lines.append(f"{rng.choice(T.ARITH_PROMPTS[op]).format(a=a, b=b)} {eq}." if asked else eq)
        return "\n".join(lines)
    if kind == "word":
        # Each sentence is one task instance; only training instances are spelled out.
        out = []
        while len(out) < 3:
            w = rng.choice(u.words)
            facts = (
                ("count:letters", f'The word "{w}" has {len(w)} letters: {", ".join(w)}.'),
                ("string:reverse", f'Backwards, "{w}" is "{w[::-1]}".'),
                ("string:first", f'"{w}" starts with the letter "{w[0]}".'),
                ("string:last", f'"{w}" ends with the letter "{w[-1]}".'),
                ("string:upper", f'In capital letters, "{w}" is "{w.upper()}".'),
                ("string:spell", f'With dashes, "{w}" is "{"-".join(w)}".'),
            )
            sents = [text for op, text in facts if u.split_of(f"{op}:{w}") == "train"]
            if sents:
                out.append(" ".join(sents))
        return "\n".join(out)
    if kind == "units":
        big, bigs, small, factor = rng.choice(UNITS)
        unit = "a dozen" if big == "dozen" else f"{article(big)} {big}"
        lines = [f"There are {factor} {small} in {unit}."]
        for k in rng.sample(range(2, 16), 4):
            way = rng.choice(("down", "up"))
            if u.split_of(f"units:{big}:{way}:{k}") != "train":
                continue
            lines.append(f"{k} {bigs} is {k * factor} {small}." if way == "down" else
                         f"{k * factor} {small} is {k} {bigs}.")
        return " ".join(lines)
    lines = []
    for _ in range(rng.randint(2, 4)):
        ex = _train_examples(rng, u, "list")
        lines.append(f"{ex.messages[-1]['content']}\n{ex.answer}")
    return "\n\n".join(lines)


def safety_doc(rng: random.Random, u: Universe) -> str:
    q_tag, a_tag = rng.choice(QA_FORMATS)
    return safety.corpus_documents(rng, 1, qa_format=q_tag + "{q}\n" + a_tag + "{a}")[0]


# -- the corpus ------------------------------------------------------------------------------------

def documents(u: Universe, seed: int, n_chars: int | None = None,
              progress: Callable[[int], None] | None = None) -> Iterator[dict]:
    """Pretraining records {"text", "source"} until `n_chars` characters (default: by size)."""
    n_chars = CORPUS_CHARS[u.size] if n_chars is None else n_chars
    rng = random.Random(f"corpus:{seed}")
    people, places = Deck(u.people, rng), Deck(u.places, rng)
    makers = {
        "bio": lambda: bio_doc(rng, u, people.draw()),
        "place": lambda: place_doc(rng, u, places.draw()),
        "nature": lambda: nature_doc(rng, u),
        "qa": lambda: qa_doc(rng, u, people, places),
        "story": lambda: story_doc(rng, u, people.draw()),
        "dialog": lambda: dialog_doc(rng, u),
        "worked": lambda: worked_doc(rng, u),
        "safety": lambda: safety_doc(rng, u),
    }
    kinds, shares = list(DOC_SHARES), list(DOC_SHARES.values())
    # Keep each kind's share of *characters* on target: draw the kind furthest behind its share.
    written = dict.fromkeys(kinds, 0)
    total = 0
    while total < n_chars:
        kind = min(kinds, key=lambda k: (written[k] - shares[kinds.index(k)] * total, kinds.index(k)))
        text = makers[kind]()
        written[kind] += len(text)
        total += len(text)
        if progress:
            progress(len(text))
        yield {"text": text, "source": f"world:{kind}"}
