"""Facts of the universe, each with its questions and its many correct phrasings.

One `Fact` feeds three consumers with the same words: the pretraining corpus (statements and
"Q: … A: …" documents), the fact-question task (a question and a gold statement) and its grader
(the value to find, the words that also show it, and the values that would be wrong). Stating a
fact in several phrasings and in question/answer form is what lets a tiny model carry pretraining
knowledge into chat (calibration).
"""
from __future__ import annotations

from functools import cache
from typing import NamedTuple

from llama2.world.universe import (ANIMALS, COLOURS, FAMOUS_FOR, FOODS, HOBBIES, JOBS, MATERIALS, PLACE_KINDS,
                                   PLACE_NEAR, PRONOUNS, REGIONS, THINGS, Animal, Person, Place, Thing, Universe,
                                   article)


class Fact(NamedTuple):
    key: str  # instance key, e.g. "person:Tom:home"
    subject: str
    attribute: str
    value: str  # "Oakton", "34"
    accept: tuple[str, ...]  # words that show the right value ("sea" for "the sea")
    wrong: tuple[str, ...]  # values of the same kind that would be a wrong answer
    numeric: bool  # graded as a number
    questions: tuple[str, ...]  # with the subject named
    statements: tuple[str, ...]  # correct phrasings; statements[0] is the gold answer


def _person_forms(p: Person, pronoun: bool) -> dict[str, str]:
    """Placeholders for question templates, naming the person or referring back by pronoun."""
    subj, _, poss = PRONOUNS[p.pronoun]
    plural = pronoun and p.pronoun == "they"
    return {"n": subj if pronoun else p.name, "np": poss if pronoun else f"{p.name}'s", "pp": poss,
            "does": "do" if plural else "does", "is": "are" if plural else "is"}


# attribute -> question templates; {n} subject, {np} possessive, {pp} later possessive, {does}/{is}
PERSON_QUESTIONS: dict[str, tuple[str, ...]] = {
    "home": ("Where {does} {n} live?", "In which town {does} {n} live?", "Where is {np} home?",
             "What is the name of the place where {n} lives?"),
    "age": ("How old {is} {n}?", "What is {np} age?", "What age {is} {n}?"),
    "job": ("What is {np} job?", "What {does} {n} do for work?", "What {does} {n} work as?"),
    "pet": ("What pet {does} {n} have?", "What kind of pet {does} {n} keep?", "What animal is {np} pet?"),
    "hobby": ("What is {np} hobby?", "What {does} {n} like to do in {pp} free time?",
              "What {does} {n} enjoy doing?"),
    "colour": ("What is {np} favourite colour?", "Which colour {does} {n} like best?"),
    "food": ("What is {np} favourite food?", "What food {does} {n} like best?"),
    "thing": ("What colour is {np} {t}?", "What is the colour of {np} {t}?"),
}


def person_questions(p: Person, attribute: str, pronoun: bool = False) -> list[str]:
    forms = _person_forms(p, pronoun) | {"t": p.thing}
    out = []
    for q in PERSON_QUESTIONS[attribute]:
        if pronoun and "lives" in q and p.pronoun == "they":
            q = q.replace("lives", "live")
        out.append(q.format(**forms))
    return out


def _hobby_words(h: str) -> tuple[str, ...]:
    return (h, HOBBIES[h])


def person_facts(p: Person, u: Universe) -> list[Fact]:
    """The eight facts of a person, in a fixed order (a fresh list; built once per universe)."""
    key = ("person_facts", p.name)
    if key not in u.cache:
        u.cache[key] = _person_facts(p, u)
    return list(u.cache[key])


def _person_facts(p: Person, u: Universe) -> list[Fact]:
    n, pp = p.name, PRONOUNS[p.pronoun][2]
    home = u.get(p.home)
    same_split_places = tuple(x.name for x in u.places if x.split == p.split and x.name != p.home)
    a_job, a_pet = article(p.job), article(p.pet)
    rows = [
        ("home", p.home, (p.home,), same_split_places, False,
         (f"{n} lives in {p.home}.", f"{n}'s home is in {p.home}.", f"{n} has a house in {p.home}.",
          f"{p.home} is where {n} lives.", f"{n} lives in the {home.kind} of {p.home}.")),
        ("age", str(p.age), (str(p.age),), (), True,
         (f"{n} is {p.age} years old.", f"{n}'s age is {p.age}.", f"{n} is {p.age}.",
          f"{n} turned {p.age} this year.")),
        ("job", p.job, (p.job,), tuple(j for j in JOBS if j != p.job), False,
         (f"{n} is {a_job} {p.job}.", f"{n} works as {a_job} {p.job}.", f"By trade, {n} is {a_job} {p.job}.",
          f"{n} earns a living as {a_job} {p.job}.")),
        ("pet", p.pet, (p.pet, p.pet + "s"), tuple(a.name for a in ANIMALS if a.name != p.pet), False,
         (f"{n} has a pet {p.pet}.", f"{n}'s pet is {a_pet} {p.pet}.", f"{n} keeps {a_pet} {p.pet} as a pet.",
          f"At home, {n} looks after a pet {p.pet}.")),
        ("hobby", p.hobby, _hobby_words(p.hobby),
         tuple(w for h in HOBBIES if h != p.hobby for w in _hobby_words(h)), False,
         (f"{n}'s hobby is {p.hobby}.", f"{n} likes {p.hobby}.", f"In {pp} free time, {n} enjoys {p.hobby}.",
          f"{n} loves {p.hobby}.")),
        ("colour", p.colour, (p.colour,) + (("gray",) if p.colour == "grey" else ()),
         tuple(c for c in COLOURS if c != p.colour), False,
         (f"{n}'s favourite colour is {p.colour}.", f"{n} likes the colour {p.colour} best.",
          f"The colour {n} loves most is {p.colour}.")),
        ("food", p.food, (p.food,), tuple(f for f in FOODS if f != p.food), False,
         (f"{n}'s favourite food is {p.food}.", f"{n} loves to eat {p.food}.",
          f"Of all foods, {n} likes {p.food} best.")),
        ("thing", p.thing_colour, (p.thing_colour,) + (("gray",) if p.thing_colour == "grey" else ()),
         tuple(c for c in COLOURS if c != p.thing_colour), False,
         (f"{n}'s {p.thing} is {p.thing_colour}.", f"{n} has {article(p.thing_colour)} {p.thing_colour} {p.thing}.",
          f"{n} owns {article(p.thing_colour)} {p.thing_colour} {p.thing}.")),
    ]
    return [Fact(f"person:{n}:{attr}", n, attr, value, accept, wrong, numeric,
                 tuple(person_questions(p, attr)), statements)
            for attr, value, accept, wrong, numeric, statements in rows]


def place_facts(pl: Place, u: Universe) -> list[Fact]:
    """Four facts of a place: its kind, what it is near, its region, what it is famous for."""
    return list(_place_facts(pl))


@cache
def _place_facts(pl: Place) -> tuple[Fact, ...]:
    n, k = pl.name, pl.kind
    return (
        Fact(f"place:{n}:kind", n, "kind", k, (k,), tuple(x for x in PLACE_KINDS if x != k), False,
             (f"Is {n} a town, a village or a city?", f"What kind of place is {n}?"),
             (f"{n} is {article(k)} {k}.", f"{n} is {article(k)} {k} in the {pl.region}.")),
        Fact(f"place:{n}:near", n, "near", pl.near, (pl.near_core,),
             tuple(c for _, c in PLACE_NEAR if c != pl.near_core), False,
             (f"What is {n} near?", f"What is close to {n}?", f"What lies near the {k} of {n}?"),
             (f"{n} is near {pl.near}.", f"{n} lies close to {pl.near}.", f"The {k} of {n} is near {pl.near}.")),
        Fact(f"place:{n}:region", n, "region", pl.region, (pl.region,),
             tuple(r for r in REGIONS if r != pl.region), False,
             (f"In which part of the land is {n}?", f"Which part of the land is {n} in?"),
             (f"{n} is in the {pl.region}.", f"{n} lies in the {pl.region} of the land.")),
        Fact(f"place:{n}:famous", n, "famous", pl.famous, (pl.famous,),
             tuple(f for f in FAMOUS_FOR if f != pl.famous), False,
             (f"What is {n} famous for?", f"What is {n} known for?"),
             (f"{n} is famous for its {pl.famous}.", f"People know {n} for its {pl.famous}.")),
    )


def animal_facts(a: Animal) -> list[Fact]:
    """Legs, sound, home and food of an animal (skipping what the animal lacks)."""
    return list(_animal_facts(a))


@cache
def _animal_facts(a: Animal) -> tuple[Fact, ...]:
    x, the = a.name, f"{article(a.name)} {a.name}"
    cap = the[0].upper() + the[1:]
    out = []
    if a.legs:
        out.append(Fact(f"animal:{x}:legs", x, "legs", str(a.legs), (str(a.legs),), (), True,
                        (f"How many legs does {the} have?", f"How many legs has {the} got?"),
                        (f"{cap} has {a.legs} legs.", f"{cap} walks on {a.legs} legs.")))
    if a.sound:
        others = tuple(sorted({b.sound for b in ANIMALS if b.sound and b.sound != a.sound}))
        out.append(Fact(f"animal:{x}:sound", x, "sound", a.sound, (a.sound,), others, False,
                        (f"What sound does {the} make?", f"What does {the} say?"),
                        (f"{cap} says {a.sound}.", f"The sound {the} makes is {a.sound}.")))
    habitats = tuple(sorted({b.habitat_core for b in ANIMALS if b.habitat_core != a.habitat_core}))
    out.append(Fact(f"animal:{x}:habitat", x, "habitat", a.habitat, (a.habitat_core,), habitats, False,
                    (f"Where does {the} live?", f"Where can you find {the}?"),
                    (f"{cap} lives {a.habitat}.", f"You can find {the} {a.habitat}.")))
    foods = tuple(sorted({b.food for b in ANIMALS if b.food != a.food}))
    out.append(Fact(f"animal:{x}:food", x, "food", a.food, (a.food,), foods, False,
                    (f"What does {the} eat?", f"What food does {the} eat?"),
                    (f"{cap} eats {a.food}.", f"The food {the} eats is {a.food}.")))
    return tuple(out)


def thing_facts(t: Thing) -> list[Fact]:
    """What a thing is used for and what it is made of."""
    return list(_thing_facts(t))


@cache
def _thing_facts(t: Thing) -> tuple[Fact, ...]:
    the = f"{article(t.name)} {t.name}"
    cap = the[0].upper() + the[1:]
    uses = tuple(sorted({o.use_words[0] for o in THINGS if o.use_words[0] not in t.use_words}))
    mats = tuple(m for m in MATERIALS if m != t.material)
    return (
        Fact(f"thing:{t.name}:use", t.name, "use", t.use, t.use_words, uses, False,
             (f"What is {the} used for?", f"What do people use {the} for?"),
             (f"{cap} is used for {t.use}.", f"People use {the} for {t.use}.")),
        Fact(f"thing:{t.name}:material", t.name, "material", t.material, (t.material,), mats, False,
             (f"What is {the} made of?", f"What material is {the} made from?"),
             (f"{cap} is made of {t.material}.", f"Most often, {the} is made of {t.material}.")),
    )


def all_facts(u: Universe) -> list[Fact]:
    """Every fact of the universe (people, places, animals, things), in a fixed order."""
    out = []
    for p in u.people:
        out += person_facts(p, u)
    for pl in u.places:
        out += place_facts(pl, u)
    for a in u.animals:
        out += animal_facts(a)
    for t in u.things:
        out += thing_facts(t)
    return out
